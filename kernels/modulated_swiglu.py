"""Modulated SwiGLU: low-rank expansion + multiplicative/additive gate modulation + SiLU(g) * up.

    m = z @ w_mult^T      a = z @ w_add^T                                   (N, F)
    g = gate * modulation_factor(m) + add_scale * a
    h = silu(g) * up,  add_sq = sum_F a^2,  mult_sq = sum_F m^2

The plain-PyTorch reference below is the one place the math is written in PyTorch;
the Triton kernels implement the same math fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modulation_factor(m: torch.Tensor) -> torch.Tensor:
    """Multiplicative factor in (0.5, 1.5), exactly 1 at m = 0, never zero."""
    return 0.5 + torch.sigmoid(m)


def modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale: float = 0.1):
    """Plain PyTorch, fp32 arithmetic; returns (h in gate's dtype, add_sq, mult_sq)."""
    g = gate.float()
    zf = z.float()
    add_sq = mult_sq = None
    if w_mult is not None:
        m = zf @ w_mult.float().t()  # (..., F)
        g = g * modulation_factor(m)
        mult_sq = m.square().sum(-1)  # (...)
    if w_add is not None:
        a = zf @ w_add.float().t()  # (..., F)
        g = g + add_scale * a
        add_sq = a.square().sum(-1)  # (...)
    h = F.silu(g) * up.float()
    return h.to(gate.dtype), add_sq, mult_sq


def modulated_swiglu(gate, up, z, w_add, w_mult, add_scale: float = 0.1, backend: str = "auto"):
    """Returns (h, add_sq, mult_sq); see the module docstring. backend: auto | triton | torch."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    # TODO(kernel issue): Triton path.
    return modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale)
