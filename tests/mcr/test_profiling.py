"""CPU cost proxies: masked-only MCR saves fewer activations and does fewer FLOPs than dual-stream."""

from mcr.models import build_model
from mcr.profiling import step_costs


def test_mcr_costs_less_than_dual_stream(tiny_config, token_ids, make_batch):
    costs = {}
    for variant in ("mcr", "dual-stream"):
        cfg = tiny_config(variant=variant, image_size=64)
        model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
        costs[variant] = step_costs(model, make_batch(cfg, B=4, L=24))
    act = costs["mcr"]["activation_bytes_per_sample"] / costs["dual-stream"]["activation_bytes_per_sample"]
    flops = costs["mcr"]["flops_per_sample"] / costs["dual-stream"]["flops_per_sample"]
    print(f"MCR / dual-stream: activation bytes {act:.3f}, FLOPs {flops:.3f}")
    assert act < 0.9 and flops < 0.9


def test_unmasked_activation_bytes_are_those_of_the_unmasked_forward(tiny_config, token_ids, make_batch):
    """unmasked=True counts one unmasked, contrastive-only forward (every patch through the
    ViT, no decoder), not the masked one."""
    from mcr.profiling import saved_activation_bytes

    cfg = tiny_config(variant="mcr", image_size=64)
    model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    batch = make_batch(cfg, B=4, L=24)
    calls = []
    forward = model.forward
    model.forward = lambda batch, masks=None, unmasked=False: calls.append((masks, unmasked)) or forward(
        batch, masks, unmasked=unmasked)
    unmasked, masked = saved_activation_bytes(model, batch, unmasked=True), saved_activation_bytes(model, batch)
    assert calls[0] == (None, True) and calls[1][0] is not None and calls[1][1] is False
    assert unmasked > 0 and unmasked != masked
