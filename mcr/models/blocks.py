"""The pre-norm transformer block of the image encoder, the MAE decoder and the MRM decoder.

timm's `Block` layout and parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2), so MAE and timm weights load unchanged, computed with mcr_kernels' public ops:
norm1 -> attn.qkv as layer_norm_linear, the attention as flash_attention (padded) or
flash_attention_varlen (packed), norm2 -> mlp as gelu_mlp's pre-norm form (neither
normalized input is kept for backward: both are recomputed from the residual). No dropout,
no drop path, no layer scale: masking is the regulariser.
"""
from torch import nn

import mcr_kernels


class Attention(nn.Module):
    """The parameters of multi-head self-attention: qkv [3 * dim, dim] and proj [dim, dim]."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    """The parameters of the feed-forward: fc1 [hidden, dim], GELU (exact), fc2 [dim, hidden]."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6 (timm's)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, *, varlen=None, out_rows=None):
        """x [B, N, D] -> [B, N, D], every token attending every token of its row.

        varlen=(cu_seqlens int32 [B + 1], max_seqlen): x is packed sequences [total, D]
        (mcr_kernels.unpad_input), each token attending the tokens of its own sequence.
        out_rows: only these output rows, for a last block whose loss reads a few (every row
        is still a key and value): int64 [B, M] positions -> [B, M, D]; with varlen,
        (rows int64 [M] of the packed x in sequence order, cu_seqlens_out int32 [B + 1],
        max_seqlen_out) -> [M, D]."""
        attn, mlp, norm1, norm2 = self.attn, self.mlp, self.norm1, self.norm2
        qkv = mcr_kernels.layer_norm_linear(x, norm1.weight, norm1.bias, attn.qkv.weight, attn.qkv.bias, eps=norm1.eps)
        if varlen is None:
            h = self.padded_attention(qkv, out_rows)
            if out_rows is not None:
                x = mcr_kernels.gather_tokens(x, out_rows)
        else:
            h = self.packed_attention(qkv, *varlen, out_rows)
            if out_rows is not None:
                x = x[out_rows[0]]
        x = x + attn.proj(h)
        return x + mcr_kernels.gelu_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                        approximate="none", norm_weight=norm2.weight, norm_bias=norm2.bias,
                                        norm_eps=norm2.eps)

    def padded_attention(self, qkv, q_rows=None):
        """qkv [B, N, 3 * D] -> attention output [B, N, D], or [B, M, D] of the queries
        q_rows int64 [B, M] only."""
        attn = self.attn
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        if q_rows is not None:
            q = q.gather(2, q_rows[:, None, :, None].expand(-1, attn.num_heads, -1, attn.head_dim))
        x = mcr_kernels.flash_attention(q, k, v)
        return x.transpose(1, 2).reshape(B, q.shape[2], attn.num_heads * attn.head_dim)

    def packed_attention(self, qkv, cu_seqlens, max_seqlen, q_rows=None):
        """qkv [total, 3 * D] of packed sequences -> [total, D]; with q_rows=(rows int64 [M],
        cu_seqlens_q int32 [B + 1], max_seqlen_q) the queries of those rows only -> [M, D]."""
        attn = self.attn
        q, k, v = qkv.view(qkv.shape[0], 3, attn.num_heads, attn.head_dim).unbind(1)
        cu_seqlens_q, max_seqlen_q = cu_seqlens, max_seqlen
        if q_rows is not None:
            rows, cu_seqlens_q, max_seqlen_q = q_rows
            q = q[rows]
        x = mcr_kernels.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens, max_seqlen_q, max_seqlen,
                                               softmax_scale=attn.scale)
        return x.reshape(q.shape[0], attn.num_heads * attn.head_dim)

