"""The memory and throughput planner (``elflm plan``): FLOPs per token, GPU peaks, ..."""

from __future__ import annotations

import torch


def flops_per_token(m, length: int, decode: bool) -> float:
    """Forward FLOPs per text token of the ELF network (matmuls + attention), control tokens
    counted in the sequence."""
    H, C, D = m.hidden_size, m.encoder_dim, m.depth
    hidden = int(int(H * m.mlp_ratio) * 2 / 3)
    n = length + m.num_time_tokens + m.num_self_cond_cfg_tokens + m.num_mode_tokens
    per_block = 2 * (3 * H * H + H * H + 3 * H * hidden) + 4 * n * H
    io = 2 * (2 * C * C + C * m.bottleneck_dim + m.bottleneck_dim * H + H * C)
    head = 2 * (H * C + C * m.vocab_size) if decode else 0
    return (D * per_block + io) * n / length + head


def step_flops_per_token(m, length: int, decoder_prob: float) -> float:
    """Expected training FLOPs per token of one step: the denoise branch runs a no-grad forward
    on the self-conditioned half of the rows and one forward + backward (3.5 forwards), the decode
    branch forward + backward (3)."""
    return (1 - decoder_prob) * 3.5 * flops_per_token(m, length, False) + decoder_prob * 3 * flops_per_token(
        m, length, True
    )


PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 495.0},
    "H200": {"bf16": 989.0, "fp32": 495.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU (TF32 for fp32), or None (CPU / unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision] * 1e12
    return None
