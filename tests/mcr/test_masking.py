"""mcr.masking: the Masks of a step, drawn once, and what the model requires of them."""
import dataclasses

import pytest
import torch

import mcr_kernels
from mcr import masking
from mcr.models import build_model


@pytest.mark.parametrize("sampling,image_size,ratio", [("random", 48, 0.6), ("random", 16, 0.5),
                                                       ("balanced", 64, 0.5), ("random", 80, 0.15)])
def test_masks_are_one_permutation_and_its_inverse(tiny_config, sampling, image_size, ratio):
    cfg = tiny_config(image_size=image_size, image_mask_ratio=ratio, mask_sampling=sampling)
    masks = masking.draw(cfg, 5, generator=torch.Generator().manual_seed(1))
    N = (image_size // cfg.patch_size) ** 2
    K = int(N * (1 - ratio))
    assert masks.ids_keep.shape == (5, K) and masks.ids_dropped.shape == (5, N - K)
    shuffle = torch.cat([masks.ids_keep, masks.ids_dropped], dim=1)
    assert (shuffle.sort(dim=1).values == torch.arange(N)).all()
    assert (masks.ids_restore.gather(1, shuffle) == torch.arange(N)).all()  # ids_restore inverts it
    assert (masks.patch_mask().sum(1) == N - K).all()
    assert masks.patch_mask().gather(1, masks.ids_dropped).eq(1).all()
    assert masks.text_noise.shape == (5, cfg.max_text_len, 2)


def test_random_masks_are_the_kernels_draw(tiny_config):
    """The same generator state gives mcr_kernels.random_keep_indices' masks (runs made before keep theirs)."""
    cfg = tiny_config(image_size=64, image_mask_ratio=0.5)
    masks = masking.draw(cfg, 3, generator=torch.Generator().manual_seed(7))
    ids_keep, ids_restore = mcr_kernels.random_keep_indices(3, 16, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(masks.ids_keep, ids_keep) and torch.equal(masks.ids_restore, ids_restore)
    assert torch.equal(masks.ids_dropped, ids_restore.argsort(dim=1)[:, 8:])


def test_balanced_masks_keep_as_many_patches_in_every_2x2_block(tiny_config):
    cfg = tiny_config(image_size=64, mask_sampling="balanced", image_mask_ratio=0.5)  # 4 x 4 patches
    masks = masking.draw(cfg, 6, generator=torch.Generator().manual_seed(2))
    rows, cols = masks.ids_keep // 4, masks.ids_keep % 4
    block = (rows // 2) * 2 + cols // 2
    assert (torch.stack([(block == b).sum(1) for b in range(4)], 1) == 2).all()


def test_rows_are_a_ranks_share_of_the_global_draw(tiny_config):
    cfg = tiny_config()
    masks = masking.draw(cfg, 8, generator=torch.Generator().manual_seed(3))
    share = masks.rows(slice(4, 8))
    for f in dataclasses.fields(masking.Masks):
        assert torch.equal(getattr(share, f.name), getattr(masks, f.name)[4:8]), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        masks.ids_keep = masks.ids_dropped


def test_a_masked_forward_needs_masks(tiny_config, token_ids, make_batch):
    cfg = tiny_config()
    model = build_model(cfg, pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    with pytest.raises(ValueError, match="needs masks"):
        model(make_batch(cfg))
    assert set(model(make_batch(cfg), unmasked=True)) == {"mim", "mrm", "contrastive"}
