"""The VLM connector pipeline: vision encoder -> connector -> image tokens at the `<image>` placeholders
-> LLM (our LVM transformer or a transformers causal LM). See vlm/model.py.

    from vlm import VLM, connectors
    from vlm.tiling import internvl_grid, catty_grid
"""

from vlm.model import VLM, VLMConfig

__all__ = ["VLM", "VLMConfig"]
