"""Training-step throughput and memory of the LVM against transformers' LlamaForCausalLM, in one run.

    python bench/train_step.py [--repeats 3] [--threads 2] [--compile]

One step = forward + cross-entropy + backward + AdamW step, on the same config, weights and batch:
ours through LVM.loss (the fused linear + cross-entropy of lvm/fused.py, what LVMModule trains with),
HF's LlamaForCausalLM (sdpa attention) through its logits and F.cross_entropy in fp32, the way its own
loss is computed; both with torch.optim.AdamW(fused=True). Cases:
    demo     `vqlm_demo` preset, batch 8 x 256, fp32                       -> ratio_vs_hf, peak_memory_vs_hf
    h1024    vqlm_300m's layer shape (hidden 1024, vocab 8292), 2 layers, 2 x 512, fp32
                                                                          -> ratio_vs_hf_h1024, fraction_of_matmul_peak
    bf16     the demo case with both models under bf16 autocast (where the CPU has bf16 instructions)
                                                                          -> ratio_vs_hf_bf16
Measurements are interleaved (ours, HF, ours, ..) and the best of `repeats` kept, so machine noise
hits both alike. FLOPs: model.flops_per_token(L) x tokens, with flops_per_token = 6 x non-embedding
parameters + 12 x layers x hidden x L (PaLM appendix B; attention counted in full although causal
kernels skip about half); the matmul peak is the best fp32 FLOP/s of a 2048^3 matmul measured before
and after the cases. Peak memory: the most bytes held by tensors allocated during a step (the
parameters are not counted; gradients, optimizer state, activations and logits are), read from the
profiler's allocation events. --compile compiles our blocks (LVM.compile_blocks); the compile time
is printed. The last line is JSON.
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


class Trainee:
    """A model, its optimizer and its loss: step(ids) runs one training step."""

    def __init__(self, model, loss, autocast: bool):
        self.model, self.loss, self.autocast = model.train(), loss, autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(self, ids: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.model, ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def ours_loss(model: LVM, ids: torch.Tensor) -> torch.Tensor:
    return model.loss(ids, ids[:, 1:])


def hf_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def peak_bytes(fn) -> int:
    """Most bytes held at once by CPU tensors allocated while fn runs (from the profiler's events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    held = peak = 0
    for event in events:
        held += event.cpu_memory_usage
        peak = max(peak, held)
    return peak


def compare(config: LVMConfig, batch: int, length: int, repeats: int, autocast: bool, compile: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LVM(config)
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config, torch.float32)))
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(model.state_dict())
    ids = torch.randint(0, config.codebook_size, (batch, length))
    compile_s = None
    if compile:
        model.compile_blocks()
    trainees = {"ours": Trainee(model, ours_loss, autocast), "hf": Trainee(hf, hf_loss, autocast)}
    start = time.perf_counter()
    trainees["ours"].step(ids)  # warm-up (and compile), then the warm-up time of an eager step
    compile_s = time.perf_counter() - start if compile else None
    trainees["hf"].step(ids)
    best = {name: float("inf") for name in trainees}
    for _ in range(repeats):
        for name, trainee in trainees.items():
            start = time.perf_counter()
            trainee.step(ids)
            best[name] = min(best[name], time.perf_counter() - start)
    tokens = batch * length
    result = {
        "tokens_per_s": tokens / best["ours"],
        "hf_tokens_per_s": tokens / best["hf"],
        "ratio_vs_hf": best["hf"] / best["ours"],
        "flops_per_s": model.flops_per_token(length) * tokens / best["ours"],
        "compile_s": compile_s,
    }
    if not autocast:
        result["peak_bytes"] = {name: peak_bytes(lambda t=t: t.step(ids)) for name, t in trainees.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile our blocks (LVM.compile_blocks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    demo_config = LVMConfig.from_name("vqlm_demo")
    print(f"torch threads {torch.get_num_threads()}, compile used: {args.compile}", flush=True)
    demo = compare(demo_config, 8, 256, args.repeats, autocast=False, compile=args.compile)
    print(f"demo: {demo}", file=sys.stderr, flush=True)  # progress: a case takes minutes on a busy machine
    h1024 = compare(LVMConfig.from_name("vqlm_300m", num_layers=2), 2, 512, args.repeats, False, args.compile)
    print(f"h1024: {h1024}", file=sys.stderr, flush=True)
    bf16 = None
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = compare(demo_config, 8, 256, args.repeats, autocast=True, compile=args.compile)
    peak = max(peak, matmul_peak())  # before and after: the best the machine managed during the run
    fraction = h1024["flops_per_s"] / peak

    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    cases = (("vqlm_demo B8 x L256 fp32", demo), ("hidden 1024, 2 layers, B2 x L512 fp32", h1024))
    for name, result in (*cases, ("vqlm_demo B8 x L256 bf16 autocast", bf16)):
        if result is None:
            print(f"{name}: skipped, this CPU has no bf16 instructions")
            continue
        print(
            f"{name}: ours {result['tokens_per_s']:.0f} tok/s, HF {result['hf_tokens_per_s']:.0f} tok/s, "
            f"ratio {result['ratio_vs_hf']:.2f}, ours {result['flops_per_s'] / 1e9:.1f} GFLOP/s"
            + (f", compile {result['compile_s']:.0f} s" if result["compile_s"] else "")
        )
        if "peak_bytes" in result:
            mib = {k: v / 2**20 for k, v in result["peak_bytes"].items()}
            print(f"  peak step memory: ours {mib['ours']:.0f} MiB, HF {mib['hf']:.0f} MiB")
    print(f"hidden 1024: {fraction:.2f} of the fp32 matmul peak")
    summary = {
        "bench": "train_step",
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "ratio_vs_hf": round(demo["ratio_vs_hf"], 3),
        "ratio_vs_hf_h1024": round(h1024["ratio_vs_hf"], 3),
        "ratio_vs_hf_bf16": None if bf16 is None else round(bf16["ratio_vs_hf"], 3),
        "fraction_of_matmul_peak": round(fraction, 3),
        "peak_memory_vs_hf": round(demo["peak_bytes"]["ours"] / demo["peak_bytes"]["hf"], 3),
        "peak_memory_vs_hf_h1024": round(h1024["peak_bytes"]["ours"] / h1024["peak_bytes"]["hf"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
