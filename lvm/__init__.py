"""The LVM causal transformer: `LVMConfig` presets and the `LVM` model (HF Llama compatible)."""

from lvm.config import LVMConfig
from lvm.model import LVM

__all__ = ["LVM", "LVMConfig"]
