"""Models: MCR (mcr.models.mcr) and the variants that subclass it."""


def build_model(cfg, **kwargs):
    """The model of cfg.variant: MPMA, RECLF, or MCR (mcr, dual-stream, abm)."""
    from mcr.models.mcr import MCR
    from mcr.models.mpma import MPMA
    from mcr.models.reclf import RECLF

    return {"mpma": MPMA, "reclf": RECLF}.get(cfg.variant, MCR)(cfg, **kwargs)
