"""Lightning CLI entry for every model family.

    python train.py fit --config configs/tokenizer/demo.yaml
    python train.py fit --config configs/tokenizer/demo.yaml --ckpt_path last   # resume

The config names the LightningModule (`model.class_path`) and LightningDataModule (`data.class_path`).
"""

import logging
import os
import warnings

from lightning.pytorch.cli import LightningCLI

os.environ.setdefault("WANDB_MODE", "offline")  # WANDB_MODE=online syncs


def quiet_lightning_notices() -> None:
    """Drop messages about Lightning or torch themselves, not the run (each names what it drops; nothing else is
    filtered, so real warnings and errors still print):
    - a FutureWarning that newer torch raises inside Lightning's own pytree helper on every fit;
    - ModelCheckpoint's note (with a code sample) that a manual-optimisation module's checkpoint holds the
      weights after the step: the tokenizer saves exactly that on purpose (resume continues from it);
    - the note that modules are in eval mode when training starts: the VLM modules keep their frozen vision
      encoder and VQ tokenizer in eval mode on purpose;
    - the model summary's note that it sizes a bf16-mixed model in fp32 (the demo LVM trains in bf16-mixed);
    - the advert for Lightning's cloud logger;
    - torch's note, when compiling with a CUDA build of torch on a machine without a GPU, that it found no
      CUDA runtime (the demo LVM compiles its blocks on the CPU)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip")
    )
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found")
    )


def quiet_wandb_when_silent() -> None:
    """WANDB_SILENT=true (the demo sets it) silences wandb from the start: wandb applies it only inside
    wandb.init, after it has printed a deprecation notice about a setting Lightning's WandbLogger passes."""
    if os.environ.get("WANDB_SILENT", "").lower() in ("true", "1"):
        import wandb
        from wandb.errors.term import termsetup

        termsetup(wandb.Settings(silent=True), logging.getLogger("wandb"))  # to a logger, not the terminal


def main(args=None) -> LightningCLI:
    quiet_lightning_notices()
    quiet_wandb_when_silent()
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
