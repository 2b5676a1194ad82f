"""Modulated SwiGLU: low-rank expansion + multiplicative/additive gate modulation + SiLU(g) * up.

    m = z @ w_mult^T      a = z @ w_add^T                                   (N, F)
    g = gate * modulation_factor(m) + add_scale * a
    h = silu(g) * up,  add_sq = sum_F a^2,  mult_sq = sum_F m^2

``modulated_gate`` / ``modulated_swiglu_reference`` below are the one place the math is
written in PyTorch; the Triton kernels implement the same math fused (Liger-Kernel /
Unsloth style: kernels, small launch helpers, one autograd.Function that saves only its
inputs and recomputes in backward).

* Both kernels run on a grid of (F block) x (group of row blocks).  A program loads its
  (BLOCK_F, r) weight tiles once and reuses them for all its rows.
* forward: reads gate, up, z, weights once; writes h once and, per F block, the partial
  per-token sums (a (F / BLOCK_F, N) fp32 stack, summed by torch: tiny next to N x F).
* backward: recomputes m, a, g.  d_gate / d_up are written once and only when autograd
  needs them; dW is accumulated in registers over the group's rows and stored as one
  (F, r) partial per row group; dz is stored as one (N, r) partial per F block; both
  stacks are summed by torch.  No N x F intermediate is ever written or saved.

Arithmetic is fp32 whatever the input dtype (see DOT_PRECISION for the tensor-core dots).
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slow but exact).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

try:  # triton is optional: without it only backend="torch" works
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


def modulation_factor(m: torch.Tensor) -> torch.Tensor:
    """Multiplicative factor in (0.5, 1.5), exactly 1 at m = 0, never zero."""
    return 0.5 + torch.sigmoid(m)


def modulated_gate(gate, z, w_add, w_mult, add_scale: float = 0.1):
    """Plain PyTorch, fp32: the modulated gate pre-activation and the per-token sums.

    Returns (g, add_sq, mult_sq) with g = gate * modulation_factor(z @ w_mult^T) + add_scale * (z @ w_add^T)
    in fp32; a sum is None when its weight is None.  Any leading shape (also none: gate (F,), z (r,)).
    """
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
    return g, add_sq, mult_sq


def modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale: float = 0.1, down_u=None):
    """Plain PyTorch, fp32 arithmetic; returns (h in gate's dtype, add_sq, mult_sq), plus
    down_s = h32 @ down_u^T (fp32, (..., K)) when down_u (K, F) is given."""
    g, add_sq, mult_sq = modulated_gate(gate, z, w_add, w_mult, add_scale)
    h = F.silu(g) * up.float()
    if down_u is None:
        return h.to(gate.dtype), add_sq, mult_sq
    return h.to(gate.dtype), add_sq, mult_sq, h @ down_u.float().t()


# --------------------------------------------------------------------------------------
# Triton kernels
#
# ``triton.jit`` decides between the compiler and the CPU interpreter from TRITON_INTERPRET
# at *decoration* time.  The kernels are therefore decorated lazily (first launch), so that
# setting TRITON_INTERPRET=1 after this module was imported still takes effect.
# For the same reason the kernels use only *builtin* triton.language ops (tl.full, not the
# @jit-decorated tl.zeros; tl.reduce with the standard sum combiner, not tl.sum): triton's own
# @jit helpers are fixed to compiled mode if triton was imported before TRITON_INTERPRET was set,
# while builtins are re-routed by the interpreter either way.
# Kernel bodies may not call other Python helpers, so the numerically safe sigmoid
#     e = exp(-|x|),  s = 1 / (1 + e),  sigmoid(x) = s if x >= 0 else e * s   (never exp(+large),
#     so no inf / NaN even at |x| ~ 1e4; silu' = s (1 + x (1 - s)) is finite there too)
# is written out inline.
# --------------------------------------------------------------------------------------


class _LazyJit:
    """Holds a kernel body; ``get()`` returns it decorated by ``triton.jit`` for the
    current TRITON_INTERPRET setting (cached per setting)."""

    def __init__(self, fn):
        self.fn = fn
        self._cache = {}

    def get(self):
        key = _interpret_mode()
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self._cache[key] = triton.jit(self.fn)
        return kernel


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@_LazyJit
def _mswiglu_fwd_kernel(
    gate_ptr, up_ptr, z_ptr, wa_ptr, wm_ptr,  # inputs (row-major, contiguous)
    h_ptr,  # (N, F) output
    asq_part_ptr, msq_part_ptr,  # (num_f_blocks, N) fp32 per-F-block partial sums
    N, F, R, add_scale, BLOCKS_PER_GROUP,
    HAS_ADD: tl.constexpr, HAS_MULT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # program = (one F block) x (a group of BLOCKS_PER_GROUP row blocks): the (BLOCK_F, r)
    # weight tiles are loaded once per program and reused for every row block.
    pid_f = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    cols64 = cols.to(tl.int64)
    r_offs = tl.arange(0, BLOCK_R)
    if R_CHUNKS == 1:  # whole rank in one (padded, masked) chunk: hoist the weight tiles
        w_offs = cols64[:, None] * R + r_offs[None, :]
        w_mask = col_mask[:, None] & (r_offs < R)[None, :]
        if HAS_MULT:
            wm0 = tl.load(wm_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            wa0 = tl.load(wa_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    for i in range(0, BLOCKS_PER_GROUP):
        rows = (pid_g * BLOCKS_PER_GROUP + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows64[:, None] * F + cols64[None, :]
        # ---- m = z @ w_mult^T, a = z @ w_add^T for this tile (zero on masked rows/cols) ----
        m = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
        a = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
        if HAS_ADD or HAS_MULT:
            if R_CHUNKS == 1:
                zt = tl.load(z_ptr + rows64[:, None] * R + r_offs[None, :],
                             mask=row_mask[:, None] & (r_offs < R)[None, :], other=0.0).to(tl.float32)
                if HAS_MULT:
                    m = tl.dot(zt, tl.trans(wm0), m, input_precision=DOT_PRECISION)
                if HAS_ADD:
                    a = tl.dot(zt, tl.trans(wa0), a, input_precision=DOT_PRECISION)
            else:
                for r0 in range(0, R, BLOCK_R):  # K loop over rank chunks
                    rr = r0 + r_offs
                    r_mask = rr < R
                    zt = tl.load(z_ptr + rows64[:, None] * R + rr[None, :],
                                 mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                    wk_offs = cols64[:, None] * R + rr[None, :]
                    wk_mask = col_mask[:, None] & r_mask[None, :]
                    if HAS_MULT:
                        wm = tl.load(wm_ptr + wk_offs, mask=wk_mask, other=0.0).to(tl.float32)
                        m = tl.dot(zt, tl.trans(wm), m, input_precision=DOT_PRECISION)
                    if HAS_ADD:
                        wa = tl.load(wa_ptr + wk_offs, mask=wk_mask, other=0.0).to(tl.float32)
                        a = tl.dot(zt, tl.trans(wa), a, input_precision=DOT_PRECISION)
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        part_offs = pid_f.to(tl.int64) * N + rows64
        if HAS_MULT:
            e_m = tl.exp(-tl.abs(m))
            sp_m = 1.0 / (1.0 + e_m)
            s_m = tl.where(m >= 0, sp_m, e_m * sp_m)
            g = g * (0.5 + s_m)
            tl.store(msq_part_ptr + part_offs, tl.reduce(m * m, 1, tl.standard._sum_combine), mask=row_mask)
        if HAS_ADD:
            g = g + add_scale * a
            tl.store(asq_part_ptr + part_offs, tl.reduce(a * a, 1, tl.standard._sum_combine), mask=row_mask)
        e_g = tl.exp(-tl.abs(g))
        sp_g = 1.0 / (1.0 + e_g)
        s_g = tl.where(g >= 0, sp_g, e_g * sp_g)
        tl.store(h_ptr + offs, (g * s_g * u).to(h_ptr.dtype.element_ty), mask=mask)


@_LazyJit
def _mswiglu_bwd_kernel(
    gate_ptr, up_ptr, z_ptr, wa_ptr, wm_ptr,  # saved inputs
    dh_ptr, dasq_ptr, dmsq_ptr,  # incoming grads
    dgate_ptr, dup_ptr,  # (N, F) outputs
    dz_part_ptr,  # (num_f_blocks, N, R) fp32 partials
    dwa_part_ptr, dwm_part_ptr,  # (num_groups, F, R) fp32 partials
    N, F, R, add_scale, BLOCKS_PER_GROUP,
    HAS_ADD: tl.constexpr, HAS_MULT: tl.constexpr,
    HAS_DH: tl.constexpr, HAS_DASQ: tl.constexpr, HAS_DMSQ: tl.constexpr,
    NEED_DGATE: tl.constexpr, NEED_DUP: tl.constexpr, NEED_DZ: tl.constexpr,
    NEED_DWA: tl.constexpr, NEED_DWM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DZ_PRECISION: tl.constexpr,
):
    # program = (one F block) x (a group of row blocks) x (one rank chunk for dz / dW; there is
    # a single chunk, pid_r == 0, whenever r <= BLOCK_R).  dW is accumulated in registers over
    # the group's rows and stored once; dz gets one partial per F block.
    pid_f = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_r = tl.program_id(2)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    cols64 = cols.to(tl.int64)
    r_offs = tl.arange(0, BLOCK_R)
    rc = pid_r * BLOCK_R + r_offs  # this program's rank chunk (for dz / dW)
    rc_mask = rc < R
    wc_offs = cols64[:, None] * R + rc[None, :]
    wc_mask = col_mask[:, None] & rc_mask[None, :]
    if R_CHUNKS == 1:  # hoist the weight tiles: used for the recompute and for dz
        if HAS_MULT:
            wm0 = tl.load(wm_ptr + wc_offs, mask=wc_mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            wa0 = tl.load(wa_ptr + wc_offs, mask=wc_mask, other=0.0).to(tl.float32)
    dwa_acc = tl.full([BLOCK_F, BLOCK_R], 0.0, tl.float32)
    dwm_acc = tl.full([BLOCK_F, BLOCK_R], 0.0, tl.float32)
    for i in range(0, BLOCKS_PER_GROUP):
        rows = (pid_g * BLOCKS_PER_GROUP + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows64[:, None] * F + cols64[None, :]
        # ---- recompute m, a ---------------------------------------------------------------
        m = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
        a = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
        if R_CHUNKS == 1:
            if HAS_ADD or HAS_MULT:
                zc = tl.load(z_ptr + rows64[:, None] * R + rc[None, :],
                             mask=row_mask[:, None] & rc_mask[None, :], other=0.0).to(tl.float32)
                if HAS_MULT:
                    m = tl.dot(zc, tl.trans(wm0), m, input_precision=DOT_PRECISION)
                if HAS_ADD:
                    a = tl.dot(zc, tl.trans(wa0), a, input_precision=DOT_PRECISION)
        else:
            for r0 in range(0, R, BLOCK_R):  # full K loop over the rank
                rr = r0 + r_offs
                r_mask = rr < R
                zt = tl.load(z_ptr + rows64[:, None] * R + rr[None, :],
                             mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                wk_offs = cols64[:, None] * R + rr[None, :]
                wk_mask = col_mask[:, None] & r_mask[None, :]
                if HAS_MULT:
                    wm = tl.load(wm_ptr + wk_offs, mask=wk_mask, other=0.0).to(tl.float32)
                    m = tl.dot(zt, tl.trans(wm), m, input_precision=DOT_PRECISION)
                if HAS_ADD:
                    wa = tl.load(wa_ptr + wk_offs, mask=wk_mask, other=0.0).to(tl.float32)
                    a = tl.dot(zt, tl.trans(wa), a, input_precision=DOT_PRECISION)
        dm = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
        da = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
        # ---- through h ------------------------------------------------------------------
        if HAS_DH:
            x = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = x
            fac = tl.full([BLOCK_M, BLOCK_F], 1.0, tl.float32)
            if HAS_MULT:
                e_m = tl.exp(-tl.abs(m))
                sp_m = 1.0 / (1.0 + e_m)
                s_m = tl.where(m >= 0, sp_m, e_m * sp_m)
                fac = 0.5 + s_m
                g = x * fac
            if HAS_ADD:
                g = g + add_scale * a
            e_g = tl.exp(-tl.abs(g))
            sp_g = 1.0 / (1.0 + e_g)
            s_g = tl.where(g >= 0, sp_g, e_g * sp_g)
            dg = dh * u * (s_g * (1.0 + g * (1.0 - s_g)))
            if pid_r == 0:
                if NEED_DGATE:
                    tl.store(dgate_ptr + offs, (dg * fac).to(dgate_ptr.dtype.element_ty), mask=mask)
                if NEED_DUP:
                    tl.store(dup_ptr + offs, (dh * g * s_g).to(dup_ptr.dtype.element_ty), mask=mask)
            if HAS_MULT:
                dm = dg * x * (s_m * (1.0 - s_m))
            if HAS_ADD:
                da = dg * add_scale
        # ---- through the per-token sums ---------------------------------------------------
        if HAS_MULT and HAS_DMSQ:
            dmsq = tl.load(dmsq_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
            dm += 2.0 * m * dmsq[:, None]
        if HAS_ADD and HAS_DASQ:
            dasq = tl.load(dasq_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
            da += 2.0 * a * dasq[:, None]
        # dm, da are exactly 0 on masked rows / columns, so they add nothing below.
        # ---- dz partial (this F block's contribution) and dW accumulation -----------------
        if R_CHUNKS != 1:
            if NEED_DWA or NEED_DWM:
                zc = tl.load(z_ptr + rows64[:, None] * R + rc[None, :],
                             mask=row_mask[:, None] & rc_mask[None, :], other=0.0).to(tl.float32)
        if NEED_DZ:
            dz = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
            if HAS_MULT:
                if R_CHUNKS == 1:
                    wm_c = wm0
                else:
                    wm_c = tl.load(wm_ptr + wc_offs, mask=wc_mask, other=0.0).to(tl.float32)
                dz = tl.dot(dm, wm_c, dz, input_precision=DZ_PRECISION)
            if HAS_ADD:
                if R_CHUNKS == 1:
                    wa_c = wa0
                else:
                    wa_c = tl.load(wa_ptr + wc_offs, mask=wc_mask, other=0.0).to(tl.float32)
                dz = tl.dot(da, wa_c, dz, input_precision=DZ_PRECISION)
            dz_offs = pid_f.to(tl.int64) * N * R + rows64[:, None] * R + rc[None, :]
            tl.store(dz_part_ptr + dz_offs, dz, mask=row_mask[:, None] & rc_mask[None, :])
        if NEED_DWM:
            dwm_acc = tl.dot(tl.trans(dm), zc, dwm_acc, input_precision=DOT_PRECISION)
        if NEED_DWA:
            dwa_acc = tl.dot(tl.trans(da), zc, dwa_acc, input_precision=DOT_PRECISION)
    dw_offs = pid_g.to(tl.int64) * F * R + wc_offs
    if NEED_DWM:
        tl.store(dwm_part_ptr + dw_offs, dwm_acc, mask=wc_mask)
    if NEED_DWA:
        tl.store(dwa_part_ptr + dw_offs, dwa_acc, mask=wc_mask)


# --------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------


def _empty(shape, dtype, device):
    """Every output / scratch buffer of the Triton path is allocated here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block_config(N: int, F: int, R: int, device: torch.device) -> dict:
    """The one place block sizes, warps and grid shape are chosen.

    Untuned on hardware (no GPU was available when this was written); picked so that the
    sm_90 builds of both kernels compile without register spills for r <= 64 (checked with
    the ptxas shipped in the triton wheel; the r > 64 backward still spills a little), and
    the sm_80 backward too (smaller F tile, hence a deeper dz partial stack).
    """
    # tl.dot needs K >= 16: the rank is padded (masked) to a power of two >= 16.  Up to 64 it
    # is one chunk and the weight tiles stay in registers; above, it runs in 32-wide chunks
    # (K loop in the recompute, one program per chunk for dz / dW: a correct but slower path).
    block_r = max(16, _next_pow2(R)) if R <= 64 else 32
    f_pow2 = max(16, _next_pow2(F))
    bwd_block_f, bwd_warps = (128 if R <= 16 else 64), 8  # sm_90 (Hopper) choice
    if device.type == "cuda":
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        if torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 9:
            bwd_block_f, bwd_warps = 32, 4  # sm_80 build spills with the larger tile
    else:  # interpreter: programs run one after another; a few keep the group logic exercised
        target_programs = 8
    return dict(
        block_r=block_r,
        r_chunks=triton.cdiv(R, block_r),
        fwd_block_m=32,
        fwd_block_f=min(128 if R <= 32 else 64, f_pow2),
        fwd_warps=8,
        bwd_block_m=16,
        bwd_block_f=min(bwd_block_f, f_pow2),
        bwd_warps=bwd_warps,
        target_programs=target_programs,
    )


def _row_groups(N: int, block_m: int, other_programs: int, target_programs: int):
    """Split the row blocks into groups so that groups * other_programs ~ target_programs.
    Returns (groups, blocks_per_group); every row block belongs to exactly one group."""
    n_rb = triton.cdiv(N, block_m)
    groups = max(1, min(n_rb, triton.cdiv(target_programs, other_programs)))
    blocks_per_group = triton.cdiv(n_rb, groups)
    return triton.cdiv(n_rb, blocks_per_group), blocks_per_group


# tl.dot input precision on CUDA; None = automatic (below).  "ieee" is exact fp32 FMA math,
# "tf32x3" is fp32-accurate on tensor cores (sm_80+), "tf32" is faster but rounds the dot
# operands to 10-bit mantissas.  The interpreter always computes in exact fp32.
DOT_PRECISION: str | None = None


def _dot_precision(device: torch.device) -> tuple[str, str]:
    """(precision of the z/W dots, precision of the dz dot).

    The dz dot (dm @ W: output BLOCK_M x r, K = BLOCK_F) always uses "ieee": on tensor
    cores that shape replicates operands across warps and made the sm_90 build spill."""
    if _interpret_mode() or device.type != "cuda" or torch.version.hip is not None:
        return "ieee", "ieee"
    if DOT_PRECISION is not None:
        return DOT_PRECISION, "ieee"
    return ("tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"), "ieee"


def _check_triton_usable(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
    if t.device.type != "cuda" and not _interpret_mode():
        raise RuntimeError(
            f"backend='triton' got {t.device.type} tensors: set TRITON_INTERPRET=1 to run the Triton "
            "kernels on CPU (slow, for testing), or use backend='torch'")


def _prepare(gate, up, z, w_add, w_mult):
    """Shape checks and the single .contiguous() at the boundary; returns 2-D views."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
    if z.shape[:-1] != gate.shape[:-1]:
        raise ValueError(f"z leading shape {tuple(z.shape[:-1])} != gate's {tuple(gate.shape[:-1])}")
    F_, R_ = gate.shape[-1], z.shape[-1]
    for name, w in (("w_add", w_add), ("w_mult", w_mult)):
        if w is not None and tuple(w.shape) != (F_, R_):
            raise ValueError(f"{name} must have shape (F, r) = {(F_, R_)}, got {tuple(w.shape)}")
    gate2 = gate.contiguous().view(-1, F_)
    up2 = up.contiguous().view(-1, F_)
    z2 = z.contiguous().view(-1, R_)
    wa = w_add.contiguous() if w_add is not None else None
    wm = w_mult.contiguous() if w_mult is not None else None
    return gate2, up2, z2, wa, wm


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_forward(gate2, up2, z2, wa, wm, add_scale):
    N, F_ = gate2.shape
    R_ = z2.shape[1]
    dev = gate2.device
    cfg = _block_config(N, F_, R_, dev)
    bm, bf = cfg["fwd_block_m"], cfg["fwd_block_f"]
    n_fb = triton.cdiv(F_, bf)
    groups, blocks_per_group = _row_groups(N, bm, n_fb, cfg["target_programs"])
    h = _empty((N, F_), gate2.dtype, dev)
    asq_part = _empty((n_fb, N), torch.float32, dev) if wa is not None else None
    msq_part = _empty((n_fb, N), torch.float32, dev) if wm is not None else None
    with _on_device(dev):
        _mswiglu_fwd_kernel.get()[(n_fb, groups)](
            gate2, up2, z2,
            wa if wa is not None else z2, wm if wm is not None else z2,
            h, asq_part if asq_part is not None else h, msq_part if msq_part is not None else h,
            N, F_, R_, float(add_scale), blocks_per_group,
            HAS_ADD=wa is not None, HAS_MULT=wm is not None,
            BLOCK_M=bm, BLOCK_F=bf, BLOCK_R=cfg["block_r"], R_CHUNKS=cfg["r_chunks"],
            DOT_PRECISION=_dot_precision(dev)[0], num_warps=cfg["fwd_warps"],
        )
    asq = asq_part.sum(0) if asq_part is not None else None
    msq = msq_part.sum(0) if msq_part is not None else None
    return h, asq, msq


def _launch_backward(gate2, up2, z2, wa, wm, add_scale, dh2, dasq, dmsq, need):
    """need = (d_gate, d_up, dz, dw_add, dw_mult) flags; returns the five grads (or None)."""
    N, F_ = gate2.shape
    R_ = z2.shape[1]
    dev = gate2.device
    cfg = _block_config(N, F_, R_, dev)
    has_dh = dh2 is not None
    has_dasq = dasq is not None and wa is not None
    has_dmsq = dmsq is not None and wm is not None
    need_dgate = need[0] and has_dh
    need_dup = need[1] and has_dh
    # a grad that receives no contribution is returned as None (autograd reads it as zero)
    feeds_mult = wm is not None and (has_dh or has_dmsq)
    feeds_add = wa is not None and (has_dh or has_dasq)
    need_dz = need[2] and (feeds_mult or feeds_add)
    need_dwa = need[3] and feeds_add
    need_dwm = need[4] and feeds_mult
    if not (need_dgate or need_dup or need_dz or need_dwa or need_dwm):
        return None, None, None, None, None

    bm, bf = cfg["bwd_block_m"], cfg["bwd_block_f"]
    n_fb = triton.cdiv(F_, bf)
    n_rc = cfg["r_chunks"] if (need_dz or need_dwa or need_dwm) else 1
    groups, blocks_per_group = _row_groups(N, bm, n_fb * n_rc, cfg["target_programs"])

    dgate = _empty((N, F_), gate2.dtype, dev) if need_dgate else None
    dup = _empty((N, F_), up2.dtype, dev) if need_dup else None
    dz_part = _empty((n_fb, N, R_), torch.float32, dev) if need_dz else None
    dwa_part = _empty((groups, F_, R_), torch.float32, dev) if need_dwa else None
    dwm_part = _empty((groups, F_, R_), torch.float32, dev) if need_dwm else None
    dummy = z2
    with _on_device(dev):
        _mswiglu_bwd_kernel.get()[(n_fb, groups, n_rc)](
            gate2, up2, z2,
            wa if wa is not None else dummy, wm if wm is not None else dummy,
            dh2 if has_dh else dummy, dasq if has_dasq else dummy, dmsq if has_dmsq else dummy,
            dgate if dgate is not None else dummy, dup if dup is not None else dummy,
            dz_part if dz_part is not None else dummy,
            dwa_part if dwa_part is not None else dummy, dwm_part if dwm_part is not None else dummy,
            N, F_, R_, float(add_scale), blocks_per_group,
            HAS_ADD=wa is not None, HAS_MULT=wm is not None,
            HAS_DH=has_dh, HAS_DASQ=has_dasq, HAS_DMSQ=has_dmsq,
            NEED_DGATE=need_dgate, NEED_DUP=need_dup, NEED_DZ=need_dz,
            NEED_DWA=need_dwa, NEED_DWM=need_dwm,
            BLOCK_M=bm, BLOCK_F=bf, BLOCK_R=cfg["block_r"], R_CHUNKS=cfg["r_chunks"],
            DOT_PRECISION=_dot_precision(dev)[0], DZ_PRECISION=_dot_precision(dev)[1],
            num_warps=cfg["bwd_warps"],
        )
    dz = dz_part.sum(0) if need_dz else None
    dwa = dwa_part.sum(0) if need_dwa else None
    dwm = dwm_part.sum(0) if need_dwm else None
    return dgate, dup, dz, dwa, dwm


class _ModulatedSwiGLUFunction(torch.autograd.Function):
    """Saves only the inputs; backward recomputes everything N x F."""

    @staticmethod
    def forward(ctx, gate, up, z, w_add, w_mult, add_scale):
        ctx.set_materialize_grads(False)
        gate2, up2, z2, wa, wm = _prepare(gate, up, z, w_add, w_mult)
        h, asq, msq = _launch_forward(gate2, up2, z2, wa, wm, add_scale)
        ctx.save_for_backward(gate, up, z, w_add, w_mult)
        ctx.add_scale = add_scale
        lead = gate.shape[:-1]
        return (h.view(gate.shape),
                asq.view(lead) if asq is not None else None,
                msq.view(lead) if msq is not None else None)

    @staticmethod
    def backward(ctx, dh, dasq, dmsq):
        gate, up, z, w_add, w_mult = ctx.saved_tensors
        gate2, up2, z2, wa, wm = _prepare(gate, up, z, w_add, w_mult)
        F_ = gate.shape[-1]
        dh2 = dh.contiguous().view(-1, F_) if dh is not None else None
        dasq2 = dasq.contiguous().view(-1) if dasq is not None else None
        dmsq2 = dmsq.contiguous().view(-1) if dmsq is not None else None
        dgate, dup, dz, dwa, dwm = _launch_backward(
            gate2, up2, z2, wa, wm, ctx.add_scale, dh2, dasq2, dmsq2, ctx.needs_input_grad[:5])
        return (dgate.view(gate.shape) if dgate is not None else None,
                dup.view(up.shape) if dup is not None else None,
                dz.view(z.shape).to(z.dtype) if dz is not None else None,
                dwa.to(w_add.dtype) if dwa is not None else None,
                dwm.to(w_mult.dtype) if dwm is not None else None,
                None)


def modulated_swiglu(gate, up, z, w_add, w_mult, add_scale: float = 0.1, backend: str = "auto", down_u=None):
    """Returns (h, add_sq, mult_sq); see the module docstring. backend: auto | triton | torch.

    "auto" uses the Triton kernels for CUDA tensors (when triton is installed) and the
    PyTorch reference otherwise; "triton" on CPU tensors requires TRITON_INTERPRET=1.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if (gate.is_cuda and triton is not None) else "torch"
    if backend == "torch" or down_u is not None:  # TEMP: the fused down path lands with the kernels branch
        return modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale, down_u)
    _check_triton_usable(gate)
    if gate.numel() == 0:  # nothing to launch; the reference handles empty shapes
        return modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale)
    return _ModulatedSwiGLUFunction.apply(gate, up, z, w_add, w_mult, float(add_scale))
