"""Modules shaped like the ones people already use, backed by mcr_kernels' ops.

    PatchDropout(prob, num_prefix_tokens=1)     # timm.layers.PatchDropout's contract
    ClipLoss(local_loss=False, ...)             # open_clip.loss.ClipLoss's contract

Both need torch only.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcr_kernels.mba import infonce_loss
from mcr_kernels.patch_drop import gather_tokens, random_keep_indices


def drop_patches(x, prob, num_prefix_tokens=1, ordered=False, generator=None):
    """Keep the prefix (CLS, registers) and a random K = max(1, int(N * (1 - prob))) of the
    N patch tokens, as timm: x [B, P + N, D] -> (x_kept [B, P + K, D], keep_indices int64
    [B, K] into the N patches, sorted when ordered)."""
    B, L, _ = x.shape
    P = num_prefix_tokens
    N = L - P
    if N < 1:
        raise ValueError(f"x must have patch tokens after the num_prefix_tokens = {P} prefix, "
                         f"got shape {tuple(x.shape)}")
    keep_indices, _ = random_keep_indices(B, N, max(1, int(N * (1.0 - prob))), device=x.device,
                                          generator=generator)
    if ordered:
        keep_indices = keep_indices.sort(dim=1).values
    prefix = torch.arange(P, device=x.device).expand(B, P)
    return gather_tokens(x, torch.cat([prefix, keep_indices + P], dim=1)), keep_indices


class PatchDropout(nn.Module):
    """Patch dropout (arXiv 2212.00794, 2208.07220) in training, identity in eval.

    x [B, P + N, D] -> [B, P + K, D], K = max(1, int(N * (1 - prob))); the first
    num_prefix_tokens tokens are always kept. return_indices=True returns (x, keep_indices
    [B, K] or None) like timm's PatchDropoutWithIndices.
    """

    def __init__(self, prob=0.5, num_prefix_tokens=1, ordered=False, return_indices=False):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"prob must be in [0, 1), got {prob}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered
        self.return_indices = return_indices

    def forward(self, x):
        out, keep_indices = x, None
        if self.training and self.prob > 0:
            out, keep_indices = drop_patches(x, self.prob, self.num_prefix_tokens, self.ordered)
        return (out, keep_indices) if self.return_indices else out

    def extra_repr(self):
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}, ordered={self.ordered}"


class ClipLoss(nn.Module):
    """open_clip's ClipLoss (same constructor and call), computed by infonce_loss.

    forward(image_features [B, E], text_features [B, E], logit_scale (exponentiated),
    logit_bias=None, output_dict=False) -> loss or {"contrastive_loss": loss}. Features are
    used as given (open_clip's models normalize them). With world_size > 1 the negatives
    come from every rank of torch.distributed: gather_with_grad=True runs infonce_loss's
    differentiable gather; False gathers without gradient as open_clip does (gradients
    reach the local features only). cache_labels is accepted and has nothing to cache.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: run under torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        device = image_features.device  # a number becomes a tensor there; a tensor is checked by infonce_loss
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.as_tensor(logit_scale, device=device)
        if logit_bias is not None and not isinstance(logit_bias, torch.Tensor):
            logit_bias = torch.as_tensor(logit_bias, device=device)
        if self.world_size > 1 and not self.gather_with_grad:
            loss = self._loss_with_detached_gather(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = infonce_loss(image_features, text_features, logit_scale, logit_bias=logit_bias,
                                normalize=False, gather=self.world_size > 1, local_loss=self.local_loss)
        return {"contrastive_loss": loss} if output_dict else loss

    def _loss_with_detached_gather(self, image_features, text_features, logit_scale, logit_bias):
        """open_clip's gather_with_grad=False: other ranks' features enter without gradient."""
        gathered = []
        for local in (image_features, text_features):
            parts = [torch.zeros_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local)
            if not self.local_loss:
                parts[self.rank] = local
            gathered.append(torch.cat(parts))
        all_image, all_text = gathered
        if self.local_loss:
            logits_image = logit_scale * image_features @ all_text.T
            logits_text = logit_scale * text_features @ all_image.T
            offset = image_features.shape[0] * self.rank
        else:
            logits_image = logit_scale * all_image @ all_text.T
            logits_text = logits_image.T
            offset = 0
        if logit_bias is not None:
            logits_image, logits_text = logits_image + logit_bias, logits_text + logit_bias
        labels = torch.arange(logits_image.shape[0], device=logits_image.device) + offset
        return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
