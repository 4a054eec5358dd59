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
