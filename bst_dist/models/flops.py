"""Model FLOPs per architecture, for MFU: matmuls (2 per multiply-add), block attention as
computed (each query against 2W keys), the FFT convolution and the S4D Vandermonde terms. A
training step costs 3x the forward (backward = 2x). Counted per sequence of T tokens.

The per-kind counts (`block_flops`, `bst_flops`, `brect_flops`) are registered with their
layer kinds (models/registry.py); `forward_flops` sums the stack and the output head.
"""

from __future__ import annotations

import math

from bst_dist.config import ModelConfig


def fft_flops(n: int) -> float:
    """A real FFT of size n: ~2.5 n log2 n (half a complex FFT's 5 n log2 n)."""
    return 2.5 * n * math.log2(n)


def attention_flops(q: int, k: int, H: int, hd: int) -> float:
    """q queries against k keys: logits and the weighted sum of values."""
    return 4.0 * q * k * H * hd


def _token_layer_flops(cfg: ModelConfig, T: int, n_q: int, parts: int) -> float:
    """What every kind has: n_q token projections (K, V, Q [, Q2]), the output projection of
    `parts` attention results, the FFN, and the block self-attention as computed."""
    d, H, hd, F, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.block_len
    f = T * (n_q * 2.0 * d * H * hd + 2.0 * parts * H * hd * d + 4.0 * d * F)
    return f + (T // W) * attention_flops(W, 2 * W, H, hd)


def block_flops(cfg: ModelConfig, T: int) -> float:
    return _token_layer_flops(cfg, T, n_q=3, parts=1)


def bst_flops(cfg: ModelConfig, T: int) -> float:
    d, H, hd, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.block_len
    b = cfg.bst
    f = _token_layer_flops(cfg, T, n_q=4, parts=2)
    C = {"SH": 1, "MH": H, "MF": b.num_context_states}[b.variant]
    n = 2 * T
    f += d * fft_flops(n) + C * d * fft_flops(n) + C * d * fft_flops(n) + 6.0 * C * d * (n // 2 + 1)
    if b.kernel == "s4d":
        n2 = b.state_size // 2
        f += 8.0 * C * d * n2 * T  # kernel Vandermonde contraction
        if b.carry:
            f += 8.0 * C * d * n2 * T + 8.0 * d * n2 * T  # zero-input response + new state
    else:
        f += T * 2.0 * (b.filter_emb_dim * b.filter_hidden + 2 * b.filter_hidden ** 2 + b.filter_hidden * C * d)
    if b.variant == "MF":
        S = b.num_context_states
        f += (T // W) * (2 * S * 2.0 * d * H * hd + attention_flops(W, S, H, hd))
    else:
        f += T * 2 * 2.0 * d * H * hd + (T // W) * attention_flops(W, W, H, hd)
    return f


def brect_flops(cfg: ModelConfig, T: int) -> float:
    d, H, hd, F, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.block_len
    S = cfg.brect.num_states
    proj = 2.0 * d * H * hd
    per_block = (4 * S * proj + attention_flops(W, S, H, hd) + attention_flops(S, S, H, hd)
                 + attention_flops(S, 2 * W, H, hd) + 2.0 * S * 2 * H * hd * d)
    if cfg.brect.gate == "lstm":
        per_block += 2 * 2.0 * S * 2 * H * hd * d
    if not cfg.brect.skip:
        per_block += 4.0 * S * d * F
    return _token_layer_flops(cfg, T, n_q=4, parts=2) + (T // W) * per_block


def layer_forward_flops(cfg: ModelConfig, i: int, T: int) -> float:
    from bst_dist.models.registry import kind_of

    return kind_of(cfg, i).flops(cfg, T)


def forward_flops(cfg: ModelConfig, T: int | None = None) -> float:
    """Forward FLOPs of one sequence of T tokens (default L), the output head included."""
    T = cfg.seq_len if T is None else T
    head = 2.0 * T * cfg.d_model * cfg.padded_vocab
    return sum(layer_forward_flops(cfg, i, T) for i in range(cfg.num_layers)) + head


def train_step_flops(cfg: ModelConfig, global_batch: int) -> float:
    return 3.0 * global_batch * forward_flops(cfg)
