"""Lightning CLI entry for every model family.

    python train.py fit --config configs/tokenizer/demo.yaml
    python train.py fit --config configs/tokenizer/demo.yaml --ckpt_path last   # resume

The config names the LightningModule (`model.class_path`) and LightningDataModule (`data.class_path`).
"""

import os

from lightning.pytorch.cli import LightningCLI

os.environ.setdefault("WANDB_MODE", "offline")  # WANDB_MODE=online syncs


def main(args=None) -> LightningCLI:
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
