"""The VLM's language model behind one interface: the project's LVM transformer (lvm/model.py, with a text
vocabulary) or any transformers causal LM. The VLM splices image tokens into the embeddings, so both
take `inputs_embeds`; generation goes through a KV cache either way (vlm/generation.py).

    llm = build_llm({"kind": "lvm", "config": LVMConfig fields})      # ours: Llama-shaped, fastest here
    llm = build_llm({"kind": "hf", "config": Qwen2Config.to_dict()})  # any AutoModelForCausalLM config
    llm.embed(ids) [B, L, C];  llm(embeds, attention_mask) -> logits [B, L, V]
    llm.hidden(embeds, attention_mask) -> final-norm hidden states [B, L, C];  llm.head(hidden) -> logits
    cache = llm.new_cache(pad, length);  llm.step(embeds, cache, start) -> logits [B, V] of the last slot
    llm.step_hidden(embeds, cache, start) -> hidden [B, C] of the last slot (for another head: image codes)
"""

from __future__ import annotations

import torch
from torch import nn


class LVMTextModel(nn.Module):
    """Our LVM as a text decoder: every id of its vocabulary may be generated."""

    kind = "lvm"

    def __init__(self, config: dict | None = None, path: str | None = None):
        super().__init__()
        from lvm import LVM, LVMConfig

        self.model = LVM.from_pretrained(path) if path else LVM(LVMConfig.from_dict(config))
        self.hidden_size, self.vocab_size = self.model.config.hidden_size, self.model.config.vocab_size

    def spec(self) -> dict:
        return {"kind": "lvm", "config": self.model.config.to_dict()}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden(embeds, attention_mask, document_ids, position_ids))

    def hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows pass document_ids (block-diagonal causal attention, -1 on padding) and position_ids;
        otherwise padding is a document of its own, so real tokens see real tokens only, as HF masks it."""
        if document_ids is None and attention_mask is not None and not bool(attention_mask.all()):
            document_ids = attention_mask.long() - 1
        return self.model.hidden_states(inputs_embeds=embeds, document_ids=document_ids, position_ids=position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def new_cache(self, pad: torch.Tensor, length: int):
        from lvm.attention import KVCache

        c = self.model.config
        return KVCache(c.num_layers, pad, length, c.num_kv_heads, c.head_dim, self.model.lm_head.weight.dtype)

    def step(self, embeds: torch.Tensor, cache, start: int) -> torch.Tensor:
        return self.model.forward_cached(None, cache, start, inputs_embeds=embeds)

    def step_hidden(self, embeds: torch.Tensor, cache, start: int) -> torch.Tensor:
        return self.model.hidden_cached(None, cache, start, inputs_embeds=embeds)


class HFTextModel(nn.Module):
    """A transformers causal LM (AutoModelForCausalLM) from a config dict or a local directory."""

    kind = "hf"

    def __init__(self, config: dict | None = None, path: str | None = None):
        super().__init__()
        import transformers

        if path is not None:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path)
        else:
            model_type = (config or {}).get("model_type")
            if model_type is None:
                raise ValueError("an hf LLM config needs its model_type (e.g. 'qwen2', 'llama', 'mistral')")
            hf_config = transformers.AutoConfig.for_model(**config)
            self.model = transformers.AutoModelForCausalLM.from_config(hf_config)
        self.hidden_size = self.model.config.hidden_size
        self.vocab_size = self.model.config.vocab_size

    def spec(self) -> dict:
        return {"kind": "hf", "config": self.model.config.to_dict()}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden(embeds, attention_mask, document_ids, position_ids))

    def hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The text model's last hidden state [B, L, C]: what the causal LM feeds its lm_head."""
        if document_ids is not None:
            if bool((document_ids > 0).any()):
                raise ValueError("a transformers LLM takes one sample per row: set data.pack false (packing "
                                 "with block-diagonal attention needs the lvm LLM)")
            attention_mask = (document_ids >= 0).long()
        return self.model.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def new_cache(self, pad: torch.Tensor, length: int):
        from transformers import DynamicCache

        slots = torch.arange(length, device=pad.device)
        return {"cache": DynamicCache(config=self.model.config), "pad": pad, "real": slots[None] >= pad[:, None]}

    def step(self, embeds: torch.Tensor, cache: dict, start: int) -> torch.Tensor:
        return self.head(self.step_hidden(embeds, cache, start))

    def step_hidden(self, embeds: torch.Tensor, cache: dict, start: int) -> torch.Tensor:
        stop = start + embeds.shape[1]
        positions = (torch.arange(start, stop, device=embeds.device)[None] - cache["pad"][:, None]).clamp(min=0)
        out = self.model.model(
            inputs_embeds=embeds,
            attention_mask=cache["real"][:, :stop].long(),
            position_ids=positions,
            cache=cache["cache"],
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]


LLMS = {"lvm": LVMTextModel, "hf": HFTextModel}


def build_llm(spec: dict) -> nn.Module:
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in LLMS:
        raise ValueError(f"unknown LLM kind {kind!r}; valid kinds: {', '.join(LLMS)}")
    return LLMS[kind](**options)
