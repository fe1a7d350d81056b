"""One model that reads and writes images (Janus-style), trained as a LightningModule: `UnifiedModule`.

The VLM stages' module (vlm.module.VLMModule) serves as is (parts and their learning rates, LoRA, the LVM's
warmup-cosine schedule, AdamW, export); what this adds:
    model       a VLM with a generation side (vlm/image_generation.py): built from `vlm` with `generation`, or
                `init_from` a VLM that only reads (e.g. a VLM stage's export) given one by `generation` (Janus
                starts from a trained understanding model too); token ids come from the text tokenizer
    parts       "generation" (gen_embed + gen_head) beside encoder / connector / llm; the VQ never trains
    batches     vlm.unified_data.UnifiedDataModule: understanding, generation and interleaved documents in one
                batch; the written images come as pixels and are encoded here with the model's VQ
    loss        text_loss (next-token CE over the text labels) + image_loss_weight x image_loss (CE of each
                written code, read at the position before it); each logged overall and per document kind

    python train.py fit --config configs/unified/demo.yaml
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvm.module import next_token_targets
from vlm.model import VLM
from vlm.module import PARTS, VLMModule, new_config
from vlm.splice import IGNORE_INDEX
from vlm.unified_data import KINDS


def generation_spec(spec: dict, tokenizer: str | None) -> dict:
    """The generation spec with the text tokenizer's ids (begin/end of image, code, BOS, pad) filled in."""
    if not tokenizer:
        return dict(spec)
    from vlm.text import generation_token_ids, load_text_tokenizer

    text = load_text_tokenizer(tokenizer)
    return {**spec, **generation_token_ids(text), "bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id}


class UnifiedModule(VLMModule):
    parts = (*PARTS, "generation")

    def __init__(
        self,
        vlm: dict | None = None,
        init_from: str | None = None,
        tokenizer: str | None = None,
        generation: dict | None = None,
        train_parts: list[str] = ("connector", "llm", "generation"),
        image_loss_weight: float = 1.0,
        learning_rate: float = 1e-3,
        part_lr: dict[str, float] | None = None,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 20,
        decay_steps: int | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        lora: dict | None = None,
        export_dir: str | None = None,
    ):
        """As VLMModule, plus generation: the generation side's spec (vlm/image_generation.py: tokenizer,
        embed_dim, ...; its token ids come from `tokenizer`) for a `vlm` or an `init_from` model without one
        (a model that has one keeps it). image_loss_weight scales the image loss against the text loss."""
        super().__init__(vlm=vlm, init_from=init_from, tokenizer=tokenizer, train_parts=train_parts,
                         learning_rate=learning_rate, part_lr=part_lr, min_lr_ratio=min_lr_ratio,
                         warmup_steps=warmup_steps, decay_steps=decay_steps, weight_decay=weight_decay, betas=betas,
                         lora=lora, export_dir=export_dir)  # fmt: skip

    def build_model(self) -> VLM:
        spec, tokenizer = self.hparams.generation, self.hparams.tokenizer
        if self.hparams.vlm is not None and spec is not None:
            return VLM(new_config({**self.hparams.vlm, "generation": generation_spec(spec, tokenizer)}, tokenizer))
        model = super().build_model()
        if model.config.generation is None:
            if spec is None:
                raise ValueError("the model has no generation side: give model.generation (a spec with tokenizer, "
                                 "embed_dim; see vlm/image_generation.py) to add one")
            model.add_generation(generation_spec(spec, tokenizer))
        return model

    def part(self, name: str) -> torch.nn.Module:
        if name == "generation":
            return torch.nn.ModuleList([self.model.gen_embed, self.model.gen_head])
        return super().part(name)

    def _freeze(self) -> None:
        super()._freeze()
        self.model.gen_tokenizer.requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.trainer.datamodule if self.trainer is not None else None
        if data is None or not hasattr(data, "set_generation"):
            return
        spec = self.model.config.generation
        if mismatched := {k: (v, spec[k]) for k, v in data.generation_ids.items() if spec[k] != v}:
            raise ValueError(f"the data's tokenizer and the model disagree on {mismatched} (data, model): train with "
                             "the tokenizer the model was built for")
        data.set_generation(self.model.gen_tokenizer.config.resolution, self.model.codes_per_image)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.model.gen_tokenizer.eval()

    # -- losses --------------------------------------------------------------------------------------
    def unified_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """-> per-target text losses [B, L-1] and their targets, per-code image losses [n_codes] and each
        code's document kind [n_codes], and the total loss."""
        with torch.no_grad():
            codes = self.model.encode_images(batch["gen_pixels"]) if batch["gen_pixels"].shape[0] else (
                torch.zeros(0, self.model.codes_per_image, dtype=torch.long, device=batch["input_ids"].device))
        out = self.model(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                         document_ids=batch["document_ids"], position_ids=batch["position_ids"], image_codes=codes)
        targets = next_token_targets(batch["labels"], batch["document_ids"])
        text = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view_as(targets)  # fmt: skip
        image = F.cross_entropy(out.image_logits.float().flatten(0, 1), codes.flatten(), reduction="none")
        code_kinds = batch["kind_ids"][batch["input_ids"] == self.model.config.generation["code_token_id"]]
        trained = targets != IGNORE_INDEX
        text_loss = text.sum() / trained.sum().clamp(min=1)
        image_loss = image.sum() / max(image.numel(), 1)
        loss = text_loss + self.hparams.image_loss_weight * image_loss
        return {"loss": loss, "text_loss": text_loss, "image_loss": image_loss, "text": text, "targets": targets,
                "image": image, "code_kinds": code_kinds}  # fmt: skip

    def _log_losses(self, split: str, losses: dict, batch: dict) -> None:
        trained = losses["targets"] != IGNORE_INDEX
        self.log(f"{split}/loss", losses["loss"], prog_bar=True, batch_size=int(trained.sum()) + losses["image"].numel())
        self.log(f"{split}/text_loss", losses["text_loss"], batch_size=max(int(trained.sum()), 1))
        self.log(f"{split}/image_loss", losses["image_loss"], batch_size=max(losses["image"].numel(), 1))
        text_kinds = batch["kind_ids"][:, 1:]
        for index, kind in enumerate(KINDS):
            mask = trained & (text_kinds == index)
            if mask.any():
                self.log(f"{split}/text_loss_{kind}", losses["text"][mask].mean(), batch_size=int(mask.sum()))
            codes = losses["code_kinds"] == index
            if codes.any():
                self.log(f"{split}/image_loss_{kind}", losses["image"][codes].mean(), batch_size=int(codes.sum()))
        self._log_sources(split, losses["text"], losses["targets"], batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.unified_losses(batch)
        self._log_losses("train", losses, batch)
        for group in self.optimizers().param_groups:
            self.log(f"train/lr_{group['name']}", group["lr"])
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._log_losses("val", self.unified_losses(batch), batch)
