"""Model FLOPs per architecture, for MFU: matmuls (2 per multiply-add), block attention as
computed (each query against 2W keys), the FFT convolution and the S4D Vandermonde terms. A
training step costs 3x the forward (backward = 2x). Counted per sequence of T tokens.
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


def layer_forward_flops(cfg: ModelConfig, i: int, T: int) -> float:
    d, H, hd, F, W = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.block_len
    kind = cfg.layer_kind(i)
    proj = 2.0 * d * H * hd
    n_q = 4 if kind in ("bst", "brect") else 3  # K, V, Q (+ Q2)
    parts = 2 if kind in ("bst", "brect") else 1
    f = T * (n_q * proj + 2.0 * parts * H * hd * d + 4.0 * d * F)  # projections, out, FFN
    f += (T // W) * attention_flops(W, 2 * W, H, hd)  # block self-attention as computed
    if kind == "bst":
        b = cfg.bst
        C = {"SH": 1, "MH": H, "MF": b.num_context_states}[b.variant]
        n = 2 * T
        f += d * fft_flops(n) + C * d * fft_flops(n) + C * d * fft_flops(n) + 6.0 * C * d * (n // 2 + 1)
        if b.kernel == "s4d":
            n2 = b.state_size // 2
            f += 8.0 * C * d * n2 * T  # kernel Vandermonde contraction
            if b.carry:
                f += 8.0 * C * d * n2 * T + 8.0 * d * n2 * T  # zero-input response + new state
        else:
            f += T * 2.0 * (b.filter_emb_dim * b.filter_hidden + 2 * b.filter_hidden ** 2
                            + b.filter_hidden * C * d)
        if b.variant == "MF":
            S = b.num_context_states
            f += (T // W) * (2 * S * 2.0 * d * H * hd + attention_flops(W, S, H, hd))
        else:
            f += T * 2 * 2.0 * d * H * hd + (T // W) * attention_flops(W, W, H, hd)
    if kind == "brect":
        S = cfg.brect.num_states
        per_block = (4 * S * proj + attention_flops(W, S, H, hd) + attention_flops(S, S, H, hd)
                     + attention_flops(S, 2 * W, H, hd) + 2.0 * S * 2 * H * hd * d)
        if cfg.brect.gate == "lstm":
            per_block += 2 * 2.0 * S * 2 * H * hd * d
        if not cfg.brect.skip:
            per_block += 4.0 * S * d * F
        f += (T // W) * per_block
    return f


def forward_flops(cfg: ModelConfig, T: int | None = None) -> float:
    """Forward FLOPs of one sequence of T tokens (default L), the output head included."""
    T = cfg.seq_len if T is None else T
    head = 2.0 * T * cfg.d_model * cfg.padded_vocab
    return sum(layer_forward_flops(cfg, i, T) for i in range(cfg.num_layers)) + head


def train_step_flops(cfg: ModelConfig, global_batch: int) -> float:
    return 3.0 * global_batch * forward_flops(cfg)
