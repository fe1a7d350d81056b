"""Lightning training checkpoint (.ckpt) -> HF Llama directory (config.json + model.safetensors).

    python scripts/convert_checkpoint.py runs/lvm/last.ckpt exports/lvm [--preset vqlm_300m]

The config comes from the checkpoint's hyper-parameters unless --preset names one. The result loads
with `LVM.from_pretrained` and `transformers.LlamaForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lvm import LVM, LVMConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="Lightning .ckpt whose module holds the LVM as `self.model`")
    parser.add_argument("output", help="directory to write the HF checkpoint into")
    parser.add_argument("--preset", help="LVMConfig preset, if the checkpoint's hyper-parameters lack one")
    args = parser.parse_args(argv)
    config = LVMConfig.from_name(args.preset) if args.preset else None
    model = LVM.from_lightning_checkpoint(args.checkpoint, config)
    model.save_pretrained(args.output)
    print(f"wrote {args.output} ({model.config.name}, {model.num_params() / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
