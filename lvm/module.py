"""LVM training as a LightningModule: next-token cross entropy on packed rows, optional distillation.

Recipe (LVM, arXiv 2312.00785): AdamW betas (0.9, 0.95), weight decay 0.1 on Linear weights only,
linear warmup then cosine to a minimum lr, stepped every optimiser step. Gradient clipping,
precision, accumulation, DDP / FSDP and the number of nodes are the Trainer's (see configs/lvm/).

Distillation (DeLVM, arXiv 2402.04841): a frozen teacher LVM with the same vocabulary adds
T^2 * KL(teacher || student) on temperature-T softened distributions, scaled by `distill_weight`.
The teacher is loaded from `teacher_path` and never written into checkpoints.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from data.packing import IGNORE_INDEX
from lvm import LVM, LVMConfig
from lvm.training import PretrainingModule

TEACHER = "teacher."  # state-dict prefix of the distillation teacher


def next_token_targets(labels: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """labels [B, L] -> targets [B, L-1] for logits[:, :-1]: the next token, IGNORE_INDEX where it is
    padding or belongs to another document (a sentence's first token is not predictable from the last one)."""
    targets = labels[:, 1:].clone()
    targets[document_ids[:, 1:] != document_ids[:, :-1]] = IGNORE_INDEX
    return targets


class LVMModule(PretrainingModule):
    def __init__(
        self,
        model: str = "vqlm_demo",
        model_overrides: dict | None = None,
        init_from: str | None = None,
        learning_rate: float = 1.5e-4,
        min_learning_rate: float = 3e-5,
        warmup_steps: int = 8000,
        decay_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        teacher_path: str | None = None,
        distill_temperature: float = 1.0,
        distill_weight: float = 1.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
        peak_flops_per_device: float = 989e12,
        export_dir: str | None = None,
    ):
        """`model`: a preset name (lvm.LVMConfig.from_name) with `model_overrides` applied (e.g.
        attn_backend, num_layers); `init_from` starts from a saved LVM instead.
        `activation_checkpointing` (recompute each block in backward) and `compile` (torch.compile) are
        training switches: they trade memory and speed, the model and its checkpoints stay the same.
        `decay_steps`: where the cosine reaches `min_learning_rate` (default: trainer.max_steps).
        `peak_flops_per_device`: the accelerator's peak FLOP/s for MFU (989e12: H100 SXM dense bf16).
        `export_dir` receives model.save_pretrained (HF Llama layout) at the end of fit."""
        super().__init__()
        self.save_hyperparameters()
        overrides = dict(model_overrides or {})
        if "activation_checkpointing" in overrides:  # where configs kept it before it became a training switch
            warnings.warn(
                "model_overrides.activation_checkpointing moved to model.activation_checkpointing",
                FutureWarning,
                stacklevel=2,
            )
            activation_checkpointing = overrides.pop("activation_checkpointing")
        self.model = LVM.from_pretrained(init_from, **overrides) if init_from else LVM(LVMConfig.from_name(model, **overrides))
        self.model.activation_checkpointing = activation_checkpointing
        self.teacher = None
        if teacher_path:
            self.teacher = LVM.from_pretrained(teacher_path).eval().requires_grad_(False)
            if self.teacher.config.vocab_size != self.config.vocab_size:
                raise ValueError(
                    f"teacher {teacher_path} has vocab {self.teacher.config.vocab_size}, the student "
                    f"{self.config.vocab_size}: distillation compares distributions over the same token ids"
                )
        self.val_loss = MeanMetric()

    def batch_tokens(self, batch: dict) -> tuple[int, int]:
        return batch["input_ids"].numel(), batch["input_ids"].shape[1]

    # -- checks before any compute -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if data is not None and hasattr(data, "tokenizer_info"):  # a TokenDataModule
            self.check_data(data.tokenizer_info["codebook_size"], data.seq_len)
        if self.hparams.compile:
            self.model.compile_blocks()

    def check_data(self, codebook_size: int, seq_len: int) -> None:
        """Raise if the token data does not fit this model: other image codes, or rows beyond its positions."""
        if codebook_size != self.config.codebook_size:
            raise ValueError(
                f"the token shards come from a tokenizer with {codebook_size} codes, the model "
                f"{self.config.name} expects {self.config.codebook_size}: token ids would mean different "
                "things. Tokenize with the model's tokenizer or set model_overrides.codebook_size/vocab_size."
            )
        for name, config in (("model", self.config), ("teacher", self.teacher and self.teacher.config)):
            if config is not None and seq_len > config.max_position_embeddings:
                raise ValueError(
                    f"seq_len {seq_len} is longer than the {name}'s max_position_embeddings "
                    f"{config.max_position_embeddings}: shorten data.seq_len or raise max_position_embeddings."
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Name every tensor that does not fit this model before Lightning tries to load it, and put the
        teacher (left out when saving) back so strict loading finds it."""
        self.check_checkpoint(checkpoint, skip_prefix=TEACHER)
        if self.teacher is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"].update({TEACHER + k: v for k, v in self.teacher.state_dict().items()})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for key in [k for k in checkpoint["state_dict"] if k.startswith(TEACHER)]:
            del checkpoint["state_dict"][key]

    # -- losses --------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss", "ce", and with a teacher "kl"}: means over the predictable target tokens."""
        targets = next_token_targets(batch["labels"], batch["document_ids"])
        if self.teacher is None:  # the fused loss: no [B, L, vocab] logits in memory
            ce = self.model.loss(
                batch["input_ids"], targets, batch["position_ids"], batch["document_ids"], ignore_index=IGNORE_INDEX
            )
            return {"loss": ce, "ce": ce}
        logits = self(batch)[:, :-1].float()  # fp32 softmax: bf16 log-probs are too coarse for the loss
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            teacher_logits = self.teacher(
                batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
            )[:, :-1].float()
        t, mask = self.hparams.distill_temperature, targets != IGNORE_INDEX
        teacher_logp = F.log_softmax(teacher_logits[mask] / t, dim=-1)
        student_logp = F.log_softmax(logits[mask] / t, dim=-1)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")  # KL(teacher || student)
        return {"loss": ce + self.hparams.distill_weight * t**2 * kl, "ce": ce, "kl": kl}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        self.log("train/loss", parts["loss"], prog_bar=True)
        self.log("train/ppl", parts["ce"].exp())
        if "kl" in parts:
            self.log_dict({"train/ce": parts["ce"], "train/kl": parts["kl"]})
        self.log_lr()
        return parts["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        parts = self.losses(batch)
        tokens = (next_token_targets(batch["labels"], batch["document_ids"]) != IGNORE_INDEX).sum()
        self.val_loss.update(parts["ce"], weight=tokens)  # a token-weighted mean over the whole split

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)  # compute() has already reduced over ranks
        self.log("val/ppl", loss.exp())
