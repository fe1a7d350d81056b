"""Encode / decode speed of our VQGAN tokenizer against plain taming-transformers, same weights.

Measures images/s of `VQGAN.encode` and `VQGAN.decode` at 256x256 with the `vqgan_f16_8192` preset
(the released LVM tokenizer's shape) against the same weights run through taming's `Encoder`,
`Decoder` and `VectorQuantizer2` as a plain module (contiguous fp32 parameters, `torch.no_grad`), in
the same process. Ours also runs under bf16 autocast, timed against the same fp32 taming peer.

The first round warms every path up and checks it: codes must equal taming's (fp32), decoded pixels
are compared with taming's, and the bf16 codes with the fp32 ones. The timed rounds then run the
paths in alternating order and keep each path's fastest time, because the CPU is shared and noisy.

Weights are random (seeded): PyTorch's default init for the convolutions; the codebook is drawn
from the latents' per-channel mean and std, where a trained codebook lives (taming's +-1/8192 init
puts every code at nearly the same distance from a latent, which would make code agreement
meaningless). Inputs are the embedded photos (`data.photos`), fitted to 256x256.

    python bench/tokenizer.py [--threads 2] [--batch 2] [--repeats 2]

Prints progress on stderr, then a table and, as the last line, one JSON object:
{"bench": "tokenizer", "threads": .., "compile": false, "encode_ratio": .., "decode_ratio": ..,
 "bf16_encode_ratio": .., "bf16_decode_ratio": .., "bf16_code_agreement": ..}
Ratios are taming's best time over ours; the bf16 code agreement is the fraction of codes equal to
ours in fp32. Exits with status 1 when our fp32 codes differ from taming's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# the repository root before bench/, where this file would shadow the `tokenizer` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: E402
from torch import nn  # noqa: E402

from data.photos import embedded_photos  # noqa: E402
from tokenizer import VQGAN, VQGANConfig, to_tensor  # noqa: E402
from tokenizer.model import taming_encoder_decoder  # noqa: E402

PRESET = "vqgan_f16_8192"
RESOLUTION = 256


class TamingVQGAN(nn.Module):
    """taming's VQModel without the loss: its encoder, quantizer and decoder, used the plain way."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.encoder, self.decoder = taming_encoder_decoder(config)  # plain taming modules, same shape
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer2(
            config.codebook_size, config.embed_dim, beta=config.commitment, legacy=False
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        _, _, (_, _, indices) = self.quantize(self.quant_conv(self.encoder(pixels)))
        return indices.view(pixels.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        side = round(codes.shape[1] ** 0.5)
        shape = (codes.shape[0], side, side, self.quantize.e_dim)
        return self.decoder(self.post_quant_conv(self.quantize.get_codebook_entry(codes.reshape(-1), shape)))


def realistic_codebook(vq: VQGAN, images: torch.Tensor, generator: torch.Generator) -> None:
    """Redraw the codebook from a Gaussian with the per-channel mean and std of the images' latents."""
    with torch.inference_mode():
        latents = vq.quant_conv(vq.encoder(vq.to_model_range(images)))
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    weight = vq.quantize.embedding.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * std + mean)


def bf16(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x)

    return run


def timed(
    label: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Run fn(x) once; (seconds, output), the time printed on stderr as progress."""
    start = time.perf_counter()
    out = fn(x)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=2, help="images per encode / decode call (2: under 5 minutes here)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    photos = embedded_photos()
    images = to_tensor([photos[i % len(photos)] for i in range(args.batch)], RESOLUTION)
    torch.manual_seed(args.seed)
    ours = VQGAN.from_name(PRESET).eval()
    assert ours.config.pixel_range == (0.0, 1.0), "the peer takes the [0, 1] images as its pixels"
    realistic_codebook(ours, images[:1], torch.Generator().manual_seed(args.seed))
    peer = TamingVQGAN(ours.config).eval()
    peer.load_state_dict({k: v.detach().contiguous().clone() for k, v in ours.state_dict().items()})

    encoders = {"taming fp32": peer.encode, "ours fp32": ours.encode, "ours bf16": bf16(ours.encode)}
    decoders = {"taming fp32": peer.decode, "ours fp32": ours.decode, "ours bf16": bf16(ours.decode)}
    # Warm-up round, whose outputs are checked; every path then decodes taming's codes of the images.
    encoded = {name: timed(f"warm-up: encode {name}", fn, images)[1] for name, fn in encoders.items()}
    codes = encoded["taming fp32"]
    decoded = {name: timed(f"warm-up: decode {name}", fn, codes)[1] for name, fn in decoders.items()}

    paths = {("encode", name): (fn, images) for name, fn in encoders.items()}
    paths |= {("decode", name): (fn, codes) for name, fn in decoders.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in paths}
    for round_ in range(1, args.repeats + 1):
        for key in reversed(paths) if round_ % 2 else paths:  # alternate the order, against drifts in load
            fn, x = paths[key]
            times[key].append(timed(f"round {round_}/{args.repeats}: {key[0]} {key[1]}", fn, x)[0])

    code_agreement = (encoded["ours fp32"] == codes).float().mean().item()
    bf16_code_agreement = (encoded["ours bf16"] == encoded["ours fp32"]).float().mean().item()
    pixel_diff = (decoded["ours fp32"] - decoded["taming fp32"].clamp(0, 1)).abs().max().item()
    bf16_pixel_diff = (decoded["ours bf16"] - decoded["ours fp32"]).abs().max().item()

    def ratio(step: str, name: str) -> float:
        return min(times[step, "taming fp32"]) / min(times[step, name])

    print(
        f"\n{PRESET} at {RESOLUTION}x{RESOLUTION}, batch {args.batch}, {args.threads} threads, "
        f"best of {args.repeats} (median alongside)"
    )
    print(f"{'step':<7} {'path':<12} {'best s':>7} {'median s':>9} {'images/s':>9} {'vs taming':>10}")
    for (step, name), seconds in times.items():
        best = min(seconds)
        print(
            f"{step:<7} {name:<12} {best:>7.2f} {statistics.median(seconds):>9.2f} "
            f"{args.batch / best:>9.3f} {ratio(step, name):>9.2f}x"
        )
    print(f"codes ours fp32 == taming:       {code_agreement:.4f} of {codes.numel()}")
    print(f"codes ours bf16 == ours fp32:    {bf16_code_agreement:.4f}")
    print(f"pixels |ours fp32 - taming| max: {pixel_diff:.2e}")
    print(f"pixels |ours bf16 - fp32| max:   {bf16_pixel_diff:.2e}")
    result = {
        "bench": "tokenizer",
        "threads": torch.get_num_threads(),
        "compile": False,  # inductor with frozen weights gave the same codes at 0.95x eager's speed (README)
        "encode_ratio": round(ratio("encode", "ours fp32"), 3),
        "decode_ratio": round(ratio("decode", "ours fp32"), 3),
        "bf16_encode_ratio": round(ratio("encode", "ours bf16"), 3),
        "bf16_decode_ratio": round(ratio("decode", "ours bf16"), 3),
        "bf16_code_agreement": round(bf16_code_agreement, 4),
    }
    print(json.dumps(result))
    if code_agreement < 1:
        sys.exit("ours fp32 codes differ from taming's")


if __name__ == "__main__":
    main()
