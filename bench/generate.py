"""Generation speed of LVM.generate against transformers' LlamaForCausalLM.generate, in one run.

    python bench/generate.py [--repeats 5] [--new-tokens 256] [--prompt-images 7] [--threads 1]

The in-context prompting case: one 256-token image generated after a 3-pair analogy prompt
(7 images x 256 = 1792 tokens), greedy, only image codes allowed, fp32 on CPU, `vqlm_demo` preset
(positions extended to cover prompt + image). Both models hold the same random weights: HF loads
our save_pretrained directory, with sdpa attention, and suppresses the special ids like we do; the
bench checks that both produce the same tokens. Each call is timed twice: generating one token (the
prompt's prefill) and the whole image; decode tokens/s = (new tokens - 1) / (whole - prefill).
Runs are interleaved (ours, HF, ours, ..) and the best of `repeats` kept, so noise hits both alike.
One thread by default: a decode step of this model is a few hundred tiny ops, so a second thread
adds only synchronisation, and on a busy machine its barrier waits swamp both measurements alike.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvm import LVM, LVMConfig  # noqa: E402

TOKENS_PER_IMAGE = 256


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=TOKENS_PER_IMAGE)
    parser.add_argument("--prompt-images", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import LlamaForCausalLM

    prompt_length = args.prompt_images * TOKENS_PER_IMAGE
    config = LVMConfig.from_name("vqlm_demo")
    config.max_position_embeddings = max(config.max_position_embeddings, prompt_length + args.new_tokens)
    ours = LVM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        ours.save_pretrained(directory)
        hf = LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    prompt = torch.randint(0, config.codebook_size, (1, prompt_length))
    specials = list(range(config.codebook_size, config.vocab_size))

    def run_ours(new_tokens: int) -> torch.Tensor:
        return ours.generate(prompt, max_new_tokens=new_tokens, temperature=0)

    @torch.inference_mode()
    def run_hf(new_tokens: int) -> torch.Tensor:
        out = hf.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            suppress_tokens=specials,
            pad_token_id=config.eos_id,
        )
        return out[:, prompt_length:]

    runners = {"ours": run_ours, "transformers": run_hf}
    best = {name: {"prefill": float("inf"), "whole": float("inf")} for name in runners}
    tokens = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            prefill, _ = timed(run, 1)
            whole, tokens[name] = timed(run, args.new_tokens)
            best[name]["prefill"] = min(best[name]["prefill"], prefill)
            best[name]["whole"] = min(best[name]["whole"], whole)
    same = torch.equal(tokens["ours"], tokens["transformers"])

    print(f"vqlm_demo, prompt {prompt_length} tokens, {args.new_tokens} new, greedy, {args.threads} threads")
    print(f"{'':14}{'prefill s':>10}{'whole s':>10}{'decode tok/s':>14}{'overall tok/s':>15}")
    rate = {}
    for name, t in best.items():
        rate[name] = (args.new_tokens - 1) / (t["whole"] - t["prefill"])
        print(f"{name:14}{t['prefill']:10.3f}{t['whole']:10.3f}{rate[name]:14.1f}{args.new_tokens / t['whole']:15.1f}")
    print(f"same greedy tokens: {same}")
    ratio = rate["ours"] / rate["transformers"]
    print(json.dumps({"bench": "generate", "ratio_vs_hf": round(ratio, 2), "tokens_per_s": round(rate["ours"], 1)}))


if __name__ == "__main__":
    main()
