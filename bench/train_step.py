"""Training-step throughput of the LVM against transformers' LlamaForCausalLM, measured in one run.

    python bench/train_step.py [--repeats 5]

Forward + cross-entropy + backward tokens/s of our model and of LlamaForCausalLM (sdpa attention)
with the same config, weights and batch, fp32 on CPU, at two sizes: the `vqlm_demo` preset and the
vqlm_300m layer shape (hidden 1024) with 2 layers. Measurements are interleaved (ours, HF, ours, ..)
and the best of `repeats` kept, so machine noise hits both alike. At hidden 1024 it also reports
achieved FLOP/s (model.flops_per_token: 6 x non-embedding params + attention) as a fraction of this
machine's fp32 matmul peak, the best of a few large matmuls in the same run. bf16 autocast is
reported too where the CPU has bf16 instructions. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvm import LVM, LVMConfig  # noqa: E402
from lvm.hf import config_to_hf  # noqa: E402


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a size^3 matmul: what this CPU's BLAS reaches at best."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def pair(config: LVMConfig):
    """Our model and an HF Llama holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = LVM(config)
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config, torch.float32)))
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(ours.state_dict())
    return ours.train(), hf.train()


def step_time(forward, model, ids: torch.Tensor, autocast: bool) -> float:
    """Seconds for forward + loss + backward; gradients dropped as an optimizer's zero_grad would."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = forward(model, ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.flatten()[1:])
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def compare(config: LVMConfig, batch: int, length: int, repeats: int, autocast: bool = False) -> dict:
    ours, hf = pair(config)
    ids = torch.randint(0, config.codebook_size, (batch, length))
    runners = {"ours": (lambda m, x: m(x), ours), "hf": (lambda m, x: m(input_ids=x).logits, hf)}
    best = {name: float("inf") for name in runners}
    for i in range(repeats + 1):  # the first round warms up allocators and kernels
        for name, (forward, model) in runners.items():
            elapsed = step_time(forward, model, ids, autocast)
            if i:
                best[name] = min(best[name], elapsed)
    tokens = batch * length
    return {
        "tokens_per_s": tokens / best["ours"],
        "hf_tokens_per_s": tokens / best["hf"],
        "ratio_vs_hf": best["hf"] / best["ours"],
        "flops_per_s": ours.flops_per_token(length) * tokens / best["ours"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    demo = compare(LVMConfig.from_name("vqlm_demo"), batch=8, length=256, repeats=args.repeats)
    h1024_config = LVMConfig.from_name("vqlm_300m", num_layers=2)
    h1024 = compare(h1024_config, batch=2, length=512, repeats=args.repeats)
    peak = max(peak, matmul_peak())  # before and after: the best the machine managed during the run
    fraction = h1024["flops_per_s"] / peak
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (torch threads {torch.get_num_threads()})")
    for name, result in (("vqlm_demo  B8 x L256", demo), ("hidden 1024, 2 layers, B2 x L512", h1024)):
        print(
            f"{name}: ours {result['tokens_per_s']:.0f} tok/s, HF {result['hf_tokens_per_s']:.0f} tok/s, "
            f"ratio {result['ratio_vs_hf']:.2f}, {result['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )
    print(f"hidden 1024: {fraction:.2f} of the fp32 matmul peak")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = compare(h1024_config, batch=2, length=512, repeats=max(2, args.repeats // 2), autocast=True)
        print(
            f"hidden 1024 bf16 autocast: ours {bf16['tokens_per_s']:.0f} tok/s "
            f"({bf16['tokens_per_s'] / h1024['tokens_per_s']:.2f}x our fp32), ratio vs HF {bf16['ratio_vs_hf']:.2f}"
        )
    else:
        print("bf16 autocast: skipped, this CPU has no bf16 instructions")
    summary = {
        "bench": "train_step",
        "ratio_vs_hf": round(demo["ratio_vs_hf"], 3),
        "ratio_vs_hf_h1024": round(h1024["ratio_vs_hf"], 3),
        "fraction_of_matmul_peak": round(fraction, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
