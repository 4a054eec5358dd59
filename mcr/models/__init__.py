"""The MCR model and its variants, one subclass of MCR each; `build_model` picks the one a
ModelConfig names (the only place that maps a variant's name to its class)."""
from mcr.models.abm import AbM
from mcr.models.dual_stream import DualStream
from mcr.models.mcr import MCR
from mcr.models.mpma import MPMA
from mcr.models.reclf import RECLF

VARIANT_MODELS = {"mcr": MCR, "dual-stream": DualStream, "abm": AbM, "mpma": MPMA, "reclf": RECLF}


def build_model(cfg, *, pad_token_id=0, mask_token_id=4):
    """The model of ModelConfig `cfg` (cfg.variant), built with the tokenizer's [PAD] and [MASK] ids."""
    if cfg.variant not in VARIANT_MODELS:
        raise ValueError(f"--variant {cfg.variant!r} is not one of: {', '.join(VARIANT_MODELS)}")
    return VARIANT_MODELS[cfg.variant](cfg, pad_token_id=pad_token_id, mask_token_id=mask_token_id)


__all__ = ["MCR", "MPMA", "RECLF", "VARIANT_MODELS", "AbM", "DualStream", "build_model"]
