"""VLM training as a LightningModule: one class for every stage (VILA / LLaVA practice):

    align      connector only                      configs/vlm/align.yaml
    pretrain   connector + LLM                     configs/vlm/pretrain.yaml   (interleaved + caption data)
    sft        connector + LLM (+ vision tower)    configs/vlm/sft.yaml        (conversations + text-only remix)

Which parts train is `train_parts` (any of encoder, connector, llm), each with its own learning rate
(`part_lr`, default `learning_rate`); `lora` puts peft LoRA adapters on the LLM and/or the encoder instead
of training their weights (Idefics2), merged into the weights on export. A stage starts from the previous
stage's export (`init_from`), or from a VLMConfig (`vlm`). The loss is next-token cross entropy on the
labels the data gives (answers only), logged overall and per data source. The LVM's schedule (warmup then
cosine), AdamW, gradient-norm logging and checkpointing (AtomicCheckpointIO in the configs) serve as is.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import torch
import torch.nn.functional as F

from lvm.module import next_token_targets
from lvm.training import warmup_cosine
from vlm.model import VLM, VLMConfig
from vlm.splice import IGNORE_INDEX

log = logging.getLogger(__name__)

PARTS = ("encoder", "connector", "llm")
LORA_TARGETS = {  # module names LoRA adapts in each part: attention and MLP projections
    "llm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "qkv", "proj"],
}


def new_config(values: dict, tokenizer: str | None) -> VLMConfig:
    """VLMConfig fields, with the text side's ids and vocabulary taken from the tokenizer when one is given."""
    values = copy.deepcopy(values)
    if tokenizer:
        from vlm.text import END_OF_TURN, check_tokenizer, load_text_tokenizer

        text = load_text_tokenizer(tokenizer)
        values["image_token_id"] = check_tokenizer(text)
        values["eos_token_id"] = [text.convert_tokens_to_ids(END_OF_TURN), text.eos_token_id]
        values["pad_token_id"] = text.pad_token_id
        values["llm"]["config"]["vocab_size"] = len(text)
    return VLMConfig.from_dict(values)


class VLMModule(L.LightningModule):
    def __init__(
        self,
        vlm: dict | None = None,
        init_from: str | None = None,
        tokenizer: str | None = None,
        train_parts: list[str] = ("connector",),
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
        """vlm: VLMConfig fields (a new model) or init_from: a saved VLM directory (ours or an HF family).
        tokenizer: for a new model, the text tokenizer directory whose vocabulary, `<image>`, end-of-turn and
        pad ids the model takes (so configs need not repeat them).
        lora: {"parts": ["llm"], "r": 8, "alpha": 16, "dropout": 0.0}; a LoRA part trains its adapters only.
        decay_steps: where the cosine reaches min_lr_ratio x lr (default trainer.max_steps)."""
        super().__init__()
        self.save_hyperparameters()
        if (vlm is None) == (init_from is None):
            raise ValueError("give exactly one of model.vlm (a VLMConfig as a dict) and model.init_from (a saved VLM)")
        if unknown := set(train_parts) - set(self.parts):
            raise ValueError(f"unknown train_parts {sorted(unknown)}; valid parts: {', '.join(self.parts)}")
        self.model = self.build_model()
        self.lora_parts = list((lora or {}).get("parts", []))
        self._freeze()
        if lora:
            self._add_lora(lora)

    parts = PARTS  # what train_parts may name; a subclass with more parts extends it and `part`

    def build_model(self) -> VLM:
        """The VLM this stage trains, from hparams init_from or vlm (+ tokenizer)."""
        if self.hparams.init_from:
            return VLM.from_pretrained(self.hparams.init_from)
        return VLM(new_config(self.hparams.vlm, self.hparams.tokenizer))

    def part(self, name: str) -> torch.nn.Module:
        return getattr(self.model, name)

    def _freeze(self) -> None:
        for part in self.parts:
            self.part(part).requires_grad_(part in self.hparams.train_parts)

    def _add_lora(self, lora: dict) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        for part in self.lora_parts:
            if part not in ("llm", "encoder"):
                raise ValueError(f"LoRA applies to the llm and the encoder, not {part!r}")
            module = getattr(self.model, part)
            names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
            targets = sorted(names & set(LORA_TARGETS[part]))
            config = LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get("dropout", 0.0),
                                target_modules=targets)
            inject_adapter_in_model(config, module)  # adapters trainable, the base weights frozen
            for name, param in module.named_parameters():
                param.requires_grad_("lora_" in name)

    # -- checks before any compute -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self.trainer is not None else None
        if data is None or not hasattr(data, "set_processor"):
            return
        if data.image_token_id != self.model.config.image_token_id:
            raise ValueError(
                f"the data's tokenizer has <image> id {data.image_token_id}, the model expects "
                f"{self.model.config.image_token_id}: train with the tokenizer the model was built for"
            )
        if self.model.llm.kind != "lvm" and data.pack:
            raise ValueError("a transformers LLM takes one sample per row: set data.pack false")
        from vlm.processing import ImageProcessor

        data.set_processor(ImageProcessor.for_model(self.model, tiling=data.tiling, max_tiles=data.max_tiles))

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        part_lr = self.hparams.part_lr or {}
        groups = []
        for part in self.parts:
            params = [p for p in self.part(part).parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": part_lr.get(part, self.hparams.learning_rate), "name": part})
        if not groups:
            raise ValueError("nothing to train: train_parts and lora leave every parameter frozen")
        optimizer = torch.optim.AdamW(groups, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        total = self.hparams.decay_steps or self.trainer.max_steps
        if total is None or total < 0:
            raise ValueError("the cosine schedule needs a length: set trainer.max_steps or model.decay_steps")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        if "encoder" not in self.hparams.train_parts:  # a frozen tower keeps dropout and norm statistics fixed
            self.model.encoder.eval()

    # -- losses --------------------------------------------------------------------------------------
    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (mean loss, per-target losses [B, L-1], targets [B, L-1]) over the answer tokens."""
        out = self.model(
            input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
            document_ids=batch["document_ids"], position_ids=batch["position_ids"],
        )  # fmt: skip
        targets = next_token_targets(batch["labels"], batch["document_ids"])
        per_token = F.cross_entropy(
            out.logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
        trained = targets != IGNORE_INDEX
        return per_token.sum() / trained.sum().clamp(min=1), per_token, targets

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, per_token, targets = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        self._log_sources("train", per_token, targets, batch)
        for group in self.optimizers().param_groups:
            self.log(f"train/lr_{group['name']}", group["lr"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, per_token, targets = self.losses(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int((targets != IGNORE_INDEX).sum()))
        self._log_sources("val", per_token, targets, batch)

    def _log_sources(self, split: str, per_token: torch.Tensor, targets: torch.Tensor, batch: dict) -> None:
        sources = batch.get("source_ids")
        names = getattr(self.trainer.datamodule, "sources", None) if self.trainer is not None else None
        if sources is None or not names:
            return
        sources = sources[:, 1:]  # the source of each target token
        for index, name in enumerate(names):
            mask = (sources == index) & (targets != IGNORE_INDEX)
            if mask.any():
                self.log(f"{split}/loss_{name}", per_token[mask].mean(), batch_size=int(mask.sum()))

    # -- export ----------------------------------------------------------------------------------------
    def merged_model(self) -> VLM:
        """The trained VLM with any LoRA adapters merged into its weights (a copy; training is untouched)."""
        model = copy.deepcopy(self.model)
        if self.lora_parts:
            from peft.tuners.lora import LoraLayer

            for part in self.lora_parts:
                module = getattr(model, part)
                for name, layer in list(module.named_modules()):
                    if isinstance(layer, LoraLayer):
                        layer.merge()
                        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
        return model.requires_grad_(True)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.merged_model().save_pretrained(self.hparams.export_dir)
            log.info("saved the trained VLM to %s", self.hparams.export_dir)
