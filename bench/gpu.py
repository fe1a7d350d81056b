"""GPU benchmark for the cluster: training MFU, decode speed against HF, tokenizer throughput.

    python bench/gpu.py [--parts train,decode,tokenizer] [--peak-tflops 989] [--compile]

Needs one CUDA GPU; exits with a message without one (nothing here runs on CPU).
    train      MFU of `vqlm_1b` on rows of 4096 tokens in bf16 (autocast over fp32 weights, fused AdamW,
               the fused linear + cross-entropy), once per attention backend (xformers where its
               kernels load, sdpa). MFU = model.flops_per_token(4096) x tokens/s / peak, with
               flops_per_token = 6 x non-embedding params + 12 x layers x hidden x 4096; peak = the GPU's
               dense bf16 FLOP/s (H100 / H200: 989 TFLOP/s; pass --peak-tflops for others).
    decode     LVM.generate(compile=True) (static cache, inductor, CUDA graphs) against transformers'
               LlamaForCausalLM.generate with its default cache, same bf16 weights, vqlm_1b, one
               256-token image after a 1792-token prompt, greedy; tokens/s and the ratio.
    tokenizer  images/s of VQGAN.encode / decode at 256x256 (the vqgan_f16_8192 shape), batch 32,
               fp32 and bf16 autocast, and the share of bf16 codes equal to the fp32 ones.
Timing: CUDA events around whole steps after warm-up, best of --repeats. The last line is JSON.
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
from lvm.attention import xformers_unavailable  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def best_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return best


def train_mfu(backend: str, batch: int, repeats: int, peak: float, compile: bool) -> dict:
    config = LVMConfig.from_name("vqlm_1b", attn_backend=backend)
    model = LVM(config).cuda().train()
    if compile:
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.codebook_size, (batch, 4096), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    seconds = best_seconds(step, repeats)
    tokens_per_s = batch * 4096 / seconds
    mfu = model.flops_per_token(4096) * tokens_per_s / peak
    result = {"tokens_per_s": round(tokens_per_s), "mfu": round(mfu, 3),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    return result


def decode(repeats: int, new_tokens: int = 256, prompt_length: int = 1792) -> dict:
    from transformers import LlamaForCausalLM

    config = LVMConfig.from_name("vqlm_1b")
    ours = LVM(config).to("cuda", torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as directory:
        ours.save_pretrained(directory)
        hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa")
    hf = hf.cuda().eval()
    prompt = torch.randint(0, config.codebook_size, (1, prompt_length), device="cuda")
    specials = list(range(config.codebook_size, config.vocab_size))

    def run_ours():
        return ours.generate(prompt, max_new_tokens=new_tokens, temperature=0, compile=True)

    @torch.inference_mode()
    def run_hf():
        return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           suppress_tokens=specials, pad_token_id=config.eos_id)[:, prompt_length:]

    start = time.perf_counter()
    run_ours()
    compile_s = time.perf_counter() - start
    same = torch.equal(run_ours(), run_hf())  # bf16: kernels differ, so equality is reported, not required
    ours_s, hf_s = best_seconds(run_ours, repeats, warmup=0), best_seconds(run_hf, repeats, warmup=0)
    return {"tokens_per_s": round(new_tokens / ours_s, 1), "hf_tokens_per_s": round(new_tokens / hf_s, 1),
            "ratio_vs_hf": round(hf_s / ours_s, 2), "first_call_s": round(compile_s, 1), "same_tokens": same}


def tokenizer(repeats: int, batch: int = 32) -> dict:
    from tokenizer import VQGAN

    vq = VQGAN.from_name("vqgan_f16_8192").cuda().eval()
    images = torch.rand(batch, 3, 256, 256, device="cuda")
    codes = vq.encode(images)
    result = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            encode_s = best_seconds(lambda: vq.encode(images), repeats)
            decode_s = best_seconds(lambda: vq.decode(codes), repeats)
            if autocast:
                result["bf16_code_agreement"] = round((vq.encode(images) == codes).float().mean().item(), 4)
        result[f"{name}_encode_images_per_s"] = round(batch / encode_s, 1)
        result[f"{name}_decode_images_per_s"] = round(batch / decode_s, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,decode,tokenizer")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    parser.add_argument("--train-batch", type=int, default=2, help="rows of 4096 tokens per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="train with compiled blocks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU; on CPU run bench/generate.py, train_step.py, tokenizer.py")
    name = torch.cuda.get_device_name()
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak_tflops is None:
        sys.exit(f"unknown peak FLOP/s for {name}: pass --peak-tflops (dense bf16)")
    torch.backends.cuda.matmul.allow_tf32 = True
    summary = {"bench": "gpu", "device": name, "peak_tflops": peak_tflops, "compile": args.compile,
               "date": time.strftime("%Y-%m-%d")}
    parts = args.parts.split(",")
    if "train" in parts:
        backends = ["sdpa"] + ([] if xformers_unavailable(torch.device("cuda")) else ["xformers"])
        for backend in backends:
            result = train_mfu(backend, args.train_batch, args.repeats, peak_tflops * 1e12, args.compile)
            torch.cuda.empty_cache()  # the model and optimizer of this backend are gone
            print(f"train vqlm_1b 4096 bf16 {backend}: {result}", flush=True)
            summary[f"mfu_{backend}"] = result["mfu"]
            summary[f"train_{backend}"] = result
    if "decode" in parts:
        result = decode(args.repeats)
        print(f"decode vqlm_1b bf16: {result}", flush=True)
        summary["decode_ratio_vs_hf"] = result["ratio_vs_hf"]
        summary["decode"] = result
    if "tokenizer" in parts:
        result = tokenizer(args.repeats)
        print(f"tokenizer vqgan_f16_8192 256x256: {result}", flush=True)
        summary["tokenizer"] = result
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
