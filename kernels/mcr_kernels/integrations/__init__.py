"""Put mcr_kernels into models built with other libraries, one line each (no import of mcr):

    apply_to_hf(model)          # transformers: attention through flash_attention ("mcr")
    apply_to_timm(model)        # timm: Attention, PatchDropout
    apply_to_open_clip(model)   # open_clip: both towers' attention, PatchDropout
    revert(model)               # undo any of them

Each apply_* patches in place, returns {module class name: count} of what it changed and
is idempotent. transformers, timm and open_clip are imported only when their apply_* runs.
Drop-in modules: PatchDropout (timm's contract), ClipLoss (open_clip's). Guide:
docs/integrations.md.
"""
from collections import Counter

from mcr_kernels.integrations._patching import unpatch_forward
from mcr_kernels.integrations.hf import apply_to_hf, revert_hf
from mcr_kernels.integrations.modules import ClipLoss, PatchDropout, drop_patches
from mcr_kernels.integrations.open_clip import apply_to_open_clip
from mcr_kernels.integrations.timm import apply_to_timm

__all__ = [
    "ClipLoss",
    "PatchDropout",
    "apply_to_hf",
    "apply_to_open_clip",
    "apply_to_timm",
    "drop_patches",
    "revert",
]


def revert(model):
    """Undo every apply_* on `model`: original forwards back, transformers models back to
    their previous attention. Returns {class name: count} of what it restored."""
    restored = Counter()
    for module in model.modules():
        if unpatch_forward(module) or revert_hf(module):
            restored[type(module).__name__] += 1
    return dict(restored)
