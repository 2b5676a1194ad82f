"""Modulated SwiGLU: low-rank expansion + multiplicative/additive gate modulation + SiLU(g) * up,
and optionally the per-token coefficients of the `down` modulation.

    m = z @ w_mult^T      a = z @ w_add^T                                   (N, F)
    g = gate * modulation_factor(m) + add_scale * a
    h = silu(g) * up,  add_sq = sum_F a^2,  mult_sq = sum_F m^2,  down_s = h @ down_u^T   (N, K)

``modulated_gate`` / ``modulated_swiglu_reference`` below are the one place the math is
written in PyTorch; the Triton kernels implement the same math fused (Liger-Kernel /
Unsloth style: kernels and their @triton.jit helpers, small launch helpers, one
autograd.Function that saves only its inputs and recomputes in backward).

* Both kernels run on a grid of (F block) x (group of row blocks).  A program loads its
  (BLOCK_F, r) weight tiles and its (K, BLOCK_F) down_u tile once and reuses them for all its rows.
* forward: reads gate, up, z, weights once; writes h once and, per F block, the partial
  per-token sums and down_s (a (F / BLOCK_F, N[, K]) fp32 stack, summed by torch: tiny next to N x F).
* backward: recomputes m, a, g, h.  d_down_s is folded in (dh_total = dh + d_down_s @ down_u).
  d_gate / d_up are written once and only when autograd needs them; dW and d_down_u are
  accumulated in registers over the group's rows and stored as one partial per row group;
  dz is stored as one (N, r) partial per F block; all stacks are summed by torch.  No N x F
  intermediate is ever written or saved.
* The first launch of each configuration on a GPU is checked against the reference on a few
  rows (`_passes_self_check`); a failing configuration warns once and falls back to PyTorch.

Arithmetic is fp32 whatever the input dtype (see DOT_PRECISION for the tensor-core dots).
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slow but exact).
"""
from __future__ import annotations

import contextlib
import os
import types
import warnings

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
    Float64 inputs stay float64 (the self-check's reference).
    """
    cast = (lambda t: t) if gate.dtype == torch.float64 else (lambda t: t.float())
    g = cast(gate)
    zf = cast(z)
    add_sq = mult_sq = None
    if w_mult is not None:
        m = (zf @ cast(w_mult).t()).to(zf.dtype)  # (..., F); under autocast the matmul gives fp16: back to fp32
        g = g * modulation_factor(m)
        mult_sq = m.square().sum(-1)  # (...)
    if w_add is not None:
        a = (zf @ cast(w_add).t()).to(zf.dtype)  # (..., F); the square sums below must not overflow fp16
        g = g + add_scale * a
        add_sq = a.square().sum(-1)  # (...)
    return g, add_sq, mult_sq


def modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale: float = 0.1, down_u=None):
    """Plain PyTorch, fp32 arithmetic; returns (h in gate's dtype, add_sq, mult_sq) and, when
    down_u (K, F) is given, down_s = h32 @ down_u^T (fp32, h32 = h before the cast) as a fourth."""
    g, add_sq, mult_sq = modulated_gate(gate, z, w_add, w_mult, add_scale)
    h32 = F.silu(g) * up.to(g.dtype)
    if down_u is None:
        return h32.to(gate.dtype), add_sq, mult_sq
    return h32.to(gate.dtype), add_sq, mult_sq, h32 @ down_u.to(g.dtype).t()  # (..., K)


# --------------------------------------------------------------------------------------
# Triton kernels and their helpers
#
# triton.jit fixes interpreter vs compiler at decoration time, so every kernel and helper is
# registered with @_jit and decorated on first use, all together, once per mode, in a copy of
# this module's globals where each registered name is that mode's decorated function: a kernel
# always calls its own mode's helpers, TRITON_INTERPRET may be set after import, and the build
# test compiles for GPU targets inside a test run that uses the interpreter.
# triton.language's own @jit helpers (tl.zeros, tl.sum, tl.sigmoid) were decorated when triton was
# imported, so the kernels use only builtins (tl.full, tl.reduce) besides the helpers below.
# --------------------------------------------------------------------------------------
_TRITON_SOURCES: dict = {}  # name -> (plain function, triton.jit keyword arguments)
_TRITON_BUILDS: dict = {}  # interpret mode -> SimpleNamespace of decorated functions
# runtime integers and flags: a value-specialized compile (N == 1, R % 16 == 0, ...) per call
# pattern would multiply the variants a GPU compiles at first use and the build test checks
_RUNTIME_ARGS = ("N", "R", "K", "BLOCKS_PER_GROUP", "has_add", "has_mult", "has_dh", "has_dasq",
                 "has_dmsq", "has_dds", "need_dgate", "need_dup", "need_dz", "need_dwa", "need_dwm", "need_ddu")


def _jit(fn=None, **jit_kwargs):
    if fn is None:
        return lambda f: _jit(f, **jit_kwargs)
    _TRITON_SOURCES[fn.__name__] = (fn, jit_kwargs)
    return fn


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_fns(interpret: bool | None = None) -> types.SimpleNamespace:
    """The registered kernels and helpers decorated by triton.jit for one mode (default: the current)."""
    interpret = _interpret_mode() if interpret is None else interpret
    built = _TRITON_BUILDS.get(interpret)
    if built is None:
        scope = dict(globals())
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"  # what triton.jit reads
        try:
            for name, (fn, jit_kwargs) in _TRITON_SOURCES.items():
                copy = types.FunctionType(fn.__code__, scope, name, fn.__defaults__, fn.__closure__)
                copy.__annotations__, copy.__doc__ = fn.__annotations__, fn.__doc__  # tl.constexpr marks
                scope[name] = triton.jit(copy, **jit_kwargs)
            # the interpreter sums with numpy only for triton's own combiner (else element by element),
            # which the compiler cannot call where triton was imported in interpreter mode
            scope["_sum_combine"] = tl.standard._sum_combine if interpret else scope["_add"]
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        built = _TRITON_BUILDS[interpret] = types.SimpleNamespace(**{n: scope[n] for n in _TRITON_SOURCES})
    return built


@_jit
def _sigmoid(x):
    # exp(-|x|) never overflows: sigmoid and silu' = s (1 + x (1 - s)) stay finite even at |x| ~ 1e4
    e = tl.exp(-tl.abs(x))
    s = 1.0 / (1.0 + e)
    return tl.where(x >= 0, s, e * s)


@_jit
def _add(a, b):
    return a + b


@_jit
def _row_sums(x):
    """(BLOCK_M,) sums over the F axis of a (BLOCK_M, BLOCK_F) tile."""
    return tl.reduce(x, 1, _sum_combine)  # noqa: F821 - bound per mode by _triton_fns


@_jit
def _load_tile(ptr, rows, row_mask, cols, col_mask, stride):
    """fp32 tile ptr[rows, cols] of a row-major matrix (int64 rows), 0.0 where masked."""
    offs = rows[:, None] * stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@_jit
def _store_tile(ptr, rows, row_mask, cols, col_mask, stride, value):
    offs = rows[:, None] * stride + cols[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@_jit
def _low_rank_codes(z_ptr, wm_ptr, wa_ptr, wm0, wa0, rows, row_mask, cols, wm_mask, wa_mask, R,
                    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
                    RANK_LOOP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(m, a) = (z @ w_mult^T, z @ w_add^T) on one (BLOCK_M, BLOCK_F) tile; 0 where masked (a column
    mask that is all False turns a branch off).  r <= BLOCK_R: one padded chunk with the program's
    hoisted weight tiles wm0 / wa0; else a K loop over the rank chunks."""
    m = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
    a = tl.full([BLOCK_M, BLOCK_F], 0.0, tl.float32)
    r_offs = tl.arange(0, BLOCK_R)
    if not RANK_LOOP:
        zt = _load_tile(z_ptr, rows, row_mask, r_offs, r_offs < R, R)
        m = tl.dot(zt, tl.trans(wm0), m, input_precision=DOT_PRECISION)
        a = tl.dot(zt, tl.trans(wa0), a, input_precision=DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + r_offs
            zt = _load_tile(z_ptr, rows, row_mask, rr, rr < R, R)
            m = tl.dot(zt, tl.trans(_load_tile(wm_ptr, cols, wm_mask, rr, rr < R, R)), m,
                       input_precision=DOT_PRECISION)
            a = tl.dot(zt, tl.trans(_load_tile(wa_ptr, cols, wa_mask, rr, rr < R, R)), a,
                       input_precision=DOT_PRECISION)
    return m, a


@_jit
def _gate_tile(gate_ptr, up_ptr, z_ptr, wm_ptr, wa_ptr, wm0, wa0, rows, row_mask, cols, xu_mask, wm_mask, wa_mask,
               F, R, add_scale, has_mult, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
               RANK_LOOP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (BLOCK_M, BLOCK_F) tile of modulated_gate: (m, a, gate, up, g, sigmoid(m)) in fp32 with
    g = gate * (0.5 + sigmoid(m)) + add_scale * a (a = 0 when off; no mult branch: the factor is exactly 1)."""
    m, a = _low_rank_codes(z_ptr, wm_ptr, wa_ptr, wm0, wa0, rows, row_mask, cols, wm_mask, wa_mask, R,
                           BLOCK_M, BLOCK_F, BLOCK_R, RANK_LOOP, DOT_PRECISION)
    x = _load_tile(gate_ptr, rows, row_mask, cols, xu_mask, F)
    u = _load_tile(up_ptr, rows, row_mask, cols, xu_mask, F)
    s_m = _sigmoid(m)
    g = x * tl.where(has_mult, 0.5 + s_m, 1.0) + add_scale * a
    return m, a, x, u, g, s_m


# A flag that only decides what is read or written (a branch on / off, which gradients autograd
# passes or needs) is a runtime predicate folded into load / store masks: one compiled kernel
# serves every such combination, with the registers of the all-on case (runtime `if`s around the
# tile work made ptxas spill) and no memory traffic for what is off (an off branch's small dots run
# on zero tiles).  Only the down branch, which adds tile work, and the tile shapes are compile-time.
@_jit(do_not_specialize=_RUNTIME_ARGS)
def _mswiglu_fwd_kernel(
    gate_ptr, up_ptr, z_ptr, wa_ptr, wm_ptr, du_ptr,  # inputs (row-major, contiguous)
    h_ptr,  # (N, F) output
    asq_part_ptr, msq_part_ptr,  # (num_f_blocks, N) fp32 per-F-block partial sums
    ds_part_ptr,  # (num_f_blocks, N, K) fp32 per-F-block partial down_s
    N, F, R, K, add_scale, BLOCKS_PER_GROUP, has_add, has_mult,
    HAS_DOWN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, RANK_LOOP: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, F_DOT_PRECISION: tl.constexpr,
):
    # program = (one F block) x (a group of BLOCKS_PER_GROUP row blocks): the weight and down_u
    # tiles are loaded once per program and reused for every row block.
    pid_f = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = (pid_f * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    col_mask = cols < F
    wm_mask, wa_mask = col_mask & has_mult, col_mask & has_add
    r_offs = tl.arange(0, BLOCK_R)
    k_offs = tl.arange(0, BLOCK_K).to(tl.int64)
    wm0 = _load_tile(wm_ptr, cols, wm_mask, r_offs, r_offs < R, R)  # (BLOCK_F, BLOCK_R); unused in a K loop
    wa0 = _load_tile(wa_ptr, cols, wa_mask, r_offs, r_offs < R, R)
    if HAS_DOWN:
        du = _load_tile(du_ptr, k_offs, k_offs < K, cols, col_mask, F)  # (BLOCK_K, BLOCK_F)
    for i in range(0, BLOCKS_PER_GROUP):
        rows = ((pid_g * BLOCKS_PER_GROUP + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < N
        m, a, x, u, g, s_m = _gate_tile(gate_ptr, up_ptr, z_ptr, wm_ptr, wa_ptr, wm0, wa0, rows, row_mask, cols,
                                        col_mask, wm_mask, wa_mask, F, R, add_scale, has_mult,
                                        BLOCK_M, BLOCK_F, BLOCK_R, RANK_LOOP, DOT_PRECISION)
        h = g * _sigmoid(g) * u  # fp32 h, zero on masked rows / columns
        _store_tile(h_ptr, rows, row_mask, cols, col_mask, F, h)
        part = pid_f.to(tl.int64) * N + rows  # this F block's slot of the (num_f_blocks, N) stacks
        tl.store(msq_part_ptr + part, _row_sums(m * m), mask=row_mask & has_mult)
        tl.store(asq_part_ptr + part, _row_sums(a * a), mask=row_mask & has_add)
        if HAS_DOWN:
            ds = tl.dot(h, tl.trans(du), input_precision=F_DOT_PRECISION)  # (BLOCK_M, BLOCK_K)
            _store_tile(ds_part_ptr + pid_f.to(tl.int64) * N * K, rows, row_mask, k_offs, k_offs < K, K, ds)


@_jit
def _bwd_program(N, F, R, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr):
    """The backward program's place: (one F block) x (a group of row blocks) x (one rank chunk for dz / dW)."""
    pid_f = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_r = tl.program_id(2)
    n_first = N * (pid_r == 0)  # rows of the first rank chunk's programs write what is chunk-independent
    cols = (pid_f * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    rc = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's rank chunk (for dz / dW)
    return pid_f, pid_g, pid_r, n_first, cols, cols < F, rc, rc < R


@_jit
def _code_grads(dg, x, m, a, s_m, dmsq_ptr, dasq_ptr, rows, row_mask, wm_mask, wa_mask, add_scale, has_dmsq, has_dasq):
    """(dm, da): through the gate plus through the per-token sums; exactly 0 on masked rows / columns and off
    branches."""
    dmsq = tl.load(dmsq_ptr + rows, mask=row_mask & has_dmsq, other=0.0)
    dasq = tl.load(dasq_ptr + rows, mask=row_mask & has_dasq, other=0.0)
    dm = tl.where(wm_mask[None, :], dg * x * (s_m * (1.0 - s_m)) + 2.0 * m * dmsq[:, None], 0.0)
    da = tl.where(wa_mask[None, :], dg * add_scale + 2.0 * a * dasq[:, None], 0.0)
    return dm, da


@_jit(do_not_specialize=_RUNTIME_ARGS)
def _mswiglu_bwd_kernel(
    gate_ptr, up_ptr, z_ptr, wa_ptr, wm_ptr, du_ptr,  # saved inputs
    dh_ptr, dasq_ptr, dmsq_ptr, dds_ptr,  # incoming grads (dds: (N, K) fp32)
    dgate_ptr, dup_ptr,  # (N, F) outputs
    dz_part_ptr,  # (num_f_blocks, N, R) fp32 partials
    dwa_part_ptr, dwm_part_ptr,  # (num_groups, F, R) fp32 partials
    ddu_part_ptr,  # (num_groups, K, F) fp32 partials
    N, F, R, K, add_scale, BLOCKS_PER_GROUP, has_add, has_mult,
    has_dh, has_dasq, has_dmsq, has_dds, need_dgate, need_dup, need_dz, need_dwa, need_dwm, need_ddu,
    HAS_DOWN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, RANK_LOOP: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, F_DOT_PRECISION: tl.constexpr,
):
    # program = (one F block) x (a group of row blocks) x (one rank chunk for dz / dW; a single
    # chunk, pid_r == 0, whenever r <= BLOCK_R).  dW and d_down_u are accumulated in registers over
    # the group's rows and stored once; dz gets one partial per F block.
    pid_f, pid_g, pid_r, n_first, cols, col_mask, rc, rc_mask = _bwd_program(N, F, R, BLOCK_F, BLOCK_R)
    wm_mask, wa_mask = col_mask & has_mult, col_mask & has_add
    through_h = col_mask & (has_dh | has_dds)  # else dh_total = 0: gate / up are not even read
    k_offs = tl.arange(0, BLOCK_K).to(tl.int64)
    wm_c = _load_tile(wm_ptr, cols, wm_mask, rc, rc_mask, R)  # (BLOCK_F, BLOCK_R)
    wa_c = _load_tile(wa_ptr, cols, wa_mask, rc, rc_mask, R)
    if HAS_DOWN:
        du = _load_tile(du_ptr, k_offs, k_offs < K, cols, col_mask, F)  # (BLOCK_K, BLOCK_F)
        ddu_acc = tl.full([BLOCK_K, BLOCK_F], 0.0, tl.float32)
    dwa_acc = tl.full([BLOCK_F, BLOCK_R], 0.0, tl.float32)
    dwm_acc = tl.full([BLOCK_F, BLOCK_R], 0.0, tl.float32)
    for i in range(0, BLOCKS_PER_GROUP):
        rows = ((pid_g * BLOCKS_PER_GROUP + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < N
        first_rows = rows < n_first
        m, a, x, u, g, s_m = _gate_tile(gate_ptr, up_ptr, z_ptr, wm_ptr, wa_ptr, wm_c, wa_c, rows, row_mask, cols,
                                        through_h, wm_mask, wa_mask, F, R, add_scale, has_mult,
                                        BLOCK_M, BLOCK_F, BLOCK_R, RANK_LOOP, DOT_PRECISION)
        # ---- through h (dh_total = dh + d_down_s @ down_u) ------------------------------------
        s_g = _sigmoid(g)
        dh = _load_tile(dh_ptr, rows, row_mask, cols, col_mask & has_dh, F)
        if HAS_DOWN:  # down_s = h @ down_u^T
            dds = _load_tile(dds_ptr, rows, row_mask & has_dds, k_offs, k_offs < K, K)  # (BLOCK_M, BLOCK_K)
            dh = tl.dot(dds, du, dh, input_precision=DOT_PRECISION)
            ddu_acc = tl.dot(tl.trans(dds), g * s_g * u, ddu_acc, input_precision=DOT_PRECISION)
        dg = dh * u * (s_g * (1.0 + g * (1.0 - s_g)))
        _store_tile(dgate_ptr, rows, first_rows, cols, col_mask & need_dgate,
                    F, dg * tl.where(has_mult, 0.5 + s_m, 1.0))
        _store_tile(dup_ptr, rows, first_rows, cols, col_mask & need_dup, F, dh * g * s_g)
        dm, da = _code_grads(dg, x, m, a, s_m, dmsq_ptr, dasq_ptr, rows, row_mask, wm_mask, wa_mask, add_scale,
                             has_dmsq, has_dasq)
        # ---- dz partial (this F block's contribution) and dW accumulation -----------------
        dz = tl.dot(dm, wm_c, input_precision=F_DOT_PRECISION)
        dz = tl.dot(da, wa_c, dz, input_precision=F_DOT_PRECISION)  # (BLOCK_M, BLOCK_R)
        _store_tile(dz_part_ptr + pid_f.to(tl.int64) * N * R, rows, row_mask & need_dz, rc, rc_mask, R, dz)
        zc = _load_tile(z_ptr, rows, row_mask, rc, rc_mask, R)
        dwm_acc = tl.dot(tl.trans(dm), zc, dwm_acc, input_precision=DOT_PRECISION)
        dwa_acc = tl.dot(tl.trans(da), zc, dwa_acc, input_precision=DOT_PRECISION)
    dw_base = pid_g.to(tl.int64) * F * R  # this row group's slot of the (num_groups, F, R) stacks
    _store_tile(dwm_part_ptr + dw_base, cols, col_mask & need_dwm, rc, rc_mask, R, dwm_acc)
    _store_tile(dwa_part_ptr + dw_base, cols, col_mask & need_dwa, rc, rc_mask, R, dwa_acc)
    if HAS_DOWN:
        _store_tile(ddu_part_ptr + pid_g.to(tl.int64) * K * F, k_offs, (k_offs < K * (pid_r == 0)) & need_ddu,
                    cols, col_mask, F, ddu_acc)


# --------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------
MAX_DOWN_RANK = 64  # the Triton path keeps the (K, BLOCK_F) down_u tile in registers


def _empty(shape, dtype, device):
    """Every output / scratch buffer of the Triton path is allocated here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# tl.dot input precision on CUDA; None = automatic (_block_config).  "ieee" is exact fp32 FMA math,
# "tf32x3" is fp32-accurate on tensor cores (sm_80+), "tf32" is faster but rounds the dot
# operands to 10-bit mantissas.  The interpreter always computes in exact fp32.
DOT_PRECISION: str | None = None


def _block_config(N: int, F: int, R: int, K: int = 0, *, capability=None, sm_count=None) -> dict:
    """The one place block sizes, warps, dot precisions and grid shape are chosen.

    K: down_rank, 0 when the down branch is off.  capability: the CUDA target's (major, minor), None
    for the interpreter or ROCm (Hopper tiles, exact dots); sm_count: its multiprocessors, None for the
    interpreter (programs run one after another).  Untuned on hardware (no GPU was available when this
    was written); picked so that the sm_80 and sm_90 builds fit shared memory and do not spill for
    r <= 64, which tests/test_kernel_build.py checks with ptxas' own report.
    """
    # tl.dot needs K >= 16: the rank is padded (masked) to a power of two >= 16.  Up to 64 it
    # is one chunk and the weight tiles stay in registers; above, it runs in 32-wide chunks
    # (K loop in the recompute, one program per chunk for dz / dW: a correct but slower path).
    block_r = max(16, _next_pow2(R)) if R <= 64 else 32
    f_pow2 = max(16, _next_pow2(F))
    dot = "ieee" if capability is None or capability[0] < 8 else (DOT_PRECISION or "tf32x3")
    bwd_block_f, bwd_warps, bwd_dot = (128 if R <= 16 else 64), 8, dot  # sm_90 (Hopper) choice
    if capability is not None and capability[0] < 9:
        bwd_block_f = 32  # the sm_80 build spills with the larger tile, with 4 warps,
        if K and DOT_PRECISION is None:
            bwd_dot = "ieee"  # and in its down backward with tf32x3 dots
    return dict(
        block_r=block_r,
        rank_loop=R > 64,
        block_k=max(16, _next_pow2(K)),
        fwd_block_m=32,
        fwd_block_f=min(128 if R <= 32 else 64, f_pow2),
        fwd_warps=8,
        fwd_dot=dot,
        bwd_block_m=16,
        bwd_block_f=min(bwd_block_f, f_pow2),
        bwd_warps=bwd_warps,
        bwd_dot=bwd_dot,
        # dz = dm @ W and down_s = h @ down_u^T (output BLOCK_M x r, K = BLOCK_F) are exact FMA dots:
        # on tensor cores that shape replicates operands across warps and made the sm_90 build spill
        f_dot="ieee",
        target_programs=8 if sm_count is None else 4 * sm_count,  # 8: a few groups keep that logic tested
    )


def _device_target(device: torch.device) -> dict:
    """_block_config's target arguments for the device the tensors live on."""
    if device.type != "cuda" or _interpret_mode():
        return dict(capability=None, sm_count=None)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    capability = torch.cuda.get_device_capability(device) if torch.version.hip is None else None
    return dict(capability=capability, sm_count=sm_count)


def _row_groups(N: int, block_m: int, other_programs: int, target_programs: int):
    """Split the row blocks into groups so that groups * other_programs ~ target_programs.
    Returns (groups, blocks_per_group); every row block belongs to exactly one group."""
    n_rb = triton.cdiv(N, block_m)
    groups = max(1, min(n_rb, triton.cdiv(target_programs, other_programs)))
    blocks_per_group = triton.cdiv(n_rb, groups)
    return triton.cdiv(n_rb, blocks_per_group), blocks_per_group


def _tile_args(cfg: dict, kernel: str) -> dict:
    """The compile-time launch arguments of kernel "fwd" or "bwd"."""
    return dict(BLOCK_M=cfg[f"{kernel}_block_m"], BLOCK_F=cfg[f"{kernel}_block_f"], BLOCK_R=cfg["block_r"],
                RANK_LOOP=cfg["rank_loop"], BLOCK_K=cfg["block_k"], DOT_PRECISION=cfg[f"{kernel}_dot"],
                F_DOT_PRECISION=cfg["f_dot"], num_warps=cfg[f"{kernel}_warps"])


def _pointer_args(tensors: dict, device, dtypes: dict) -> dict:
    """name -> tensor as the kernels' `<name>_ptr` arguments.  An unused (None) one becomes an empty
    tensor of the dtype it stands for, so that which buffers are absent never changes the compiled kernel."""
    return {f"{name}_ptr": torch.empty(0, dtype=dtypes.get(name, torch.float32), device=device) if t is None else t
            for name, t in tensors.items()}


def _launch(kernel_name: str, grid: tuple, kwargs: dict) -> None:
    """Every kernel launch goes through here (the build test records instead of launching)."""
    getattr(_triton_fns(), kernel_name)[grid](**kwargs)


def _forward_grid(N: int, F_: int, cfg: dict):
    """(num_f_blocks, groups, blocks_per_group) of a forward launch."""
    n_fb = triton.cdiv(F_, cfg["fwd_block_f"])
    return (n_fb, *_row_groups(N, cfg["fwd_block_m"], n_fb, cfg["target_programs"]))


def _backward_grid(N: int, F_: int, cfg: dict, flags: dict):
    """(num_f_blocks, groups, blocks_per_group, rank_chunks) of a backward launch."""
    n_fb = triton.cdiv(F_, cfg["bwd_block_f"])
    chunked = flags["need_dz"] or flags["need_dwa"] or flags["need_dwm"]
    n_rc = triton.cdiv(cfg["R"], cfg["block_r"]) if chunked else 1
    return (n_fb, *_row_groups(N, cfg["bwd_block_m"], n_fb * n_rc, cfg["target_programs"]), n_rc)


def _backward_flags(branches, grads_in, needs) -> dict:
    """The backward kernel's runtime flags.

    branches: (add, mult, down) on; grads_in: which of (dh, d_add_sq, d_mult_sq, d_down_s) autograd
    passed; needs: ctx.needs_input_grad of (gate, up, z, w_add, w_mult, down_u).  A gradient that
    receives no contribution is not computed (the Function returns None: autograd reads zero)."""
    has_add, has_mult, has_down = branches
    has_dh = bool(grads_in[0])
    has_dasq, has_dmsq, has_dds = bool(grads_in[1] and has_add), bool(grads_in[2] and has_mult), \
        bool(grads_in[3] and has_down)
    through_h = has_dh or has_dds
    feeds_mult = has_mult and (through_h or has_dmsq)
    feeds_add = has_add and (through_h or has_dasq)
    return dict(has_add=has_add, has_mult=has_mult, has_dh=has_dh, has_dasq=has_dasq, has_dmsq=has_dmsq,
                has_dds=has_dds, need_dgate=bool(needs[0] and through_h), need_dup=bool(needs[1] and through_h),
                need_dz=bool(needs[2] and (feeds_mult or feeds_add)), need_dwa=bool(needs[3] and feeds_add),
                need_dwm=bool(needs[4] and feeds_mult), need_ddu=bool(needs[5] and has_dds))


def _check_triton_usable(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
    if t.device.type != "cuda" and not _interpret_mode():
        raise RuntimeError(
            f"backend='triton' got {t.device.type} tensors: set TRITON_INTERPRET=1 to run the Triton "
            "kernels on CPU (slow, for testing), or use backend='torch'")


def _check_shapes(gate, up, z, w_add, w_mult, down_u) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate and up shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
    if z.shape[:-1] != gate.shape[:-1]:
        raise ValueError(f"z leading shape {tuple(z.shape[:-1])} != gate's {tuple(gate.shape[:-1])}")
    F_, R_ = gate.shape[-1], z.shape[-1]
    for name, w in (("w_add", w_add), ("w_mult", w_mult)):
        if w is not None and tuple(w.shape) != (F_, R_):
            raise ValueError(f"{name} must have shape (F, r) = {(F_, R_)}, got {tuple(w.shape)}")
    if down_u is not None and (down_u.dim() != 2 or down_u.shape[1] != F_ or not 1 <= down_u.shape[0] <= MAX_DOWN_RANK):
        raise ValueError(f"down_u must have shape (K, F) with F = {F_} and 1 <= K <= {MAX_DOWN_RANK} for "
                         f"backend='triton', got {tuple(down_u.shape)} (backend='torch' takes any K)")


def _prepare(gate, up, z, w_add, w_mult, down_u):
    """Shape checks and the single .contiguous() at the boundary; returns 2-D views."""
    _check_shapes(gate, up, z, w_add, w_mult, down_u)
    F_, R_ = gate.shape[-1], z.shape[-1]
    gate2 = gate.contiguous().view(-1, F_)  # (N, F)
    up2 = up.contiguous().view(-1, F_)  # (N, F)
    z2 = z.contiguous().view(-1, R_)  # (N, r)
    return (gate2, up2, z2) + tuple(None if w is None else w.contiguous() for w in (w_add, w_mult, down_u))


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _sum0(part):
    return None if part is None else part.sum(0)


def _launch_forward(gate2, up2, z2, wa, wm, du, add_scale):
    """Returns (h, add_sq, mult_sq, down_s) of 2-D inputs; a sum is None when its branch is off."""
    (N, F_), R_, K_, dev = gate2.shape, z2.shape[1], (0 if du is None else du.shape[0]), gate2.device
    cfg = _block_config(N, F_, R_, K_, **_device_target(dev))
    n_fb, groups, blocks_per_group = _forward_grid(N, F_, cfg)
    part = lambda on, *shape: _empty((n_fb, N) + shape, torch.float32, dev) if on else None  # noqa: E731
    t = dict(gate=gate2, up=up2, z=z2, wa=wa, wm=wm, du=du, h=_empty((N, F_), gate2.dtype, dev),
             asq_part=part(wa is not None), msq_part=part(wm is not None), ds_part=part(du is not None, K_))
    with _on_device(dev):
        _launch("_mswiglu_fwd_kernel", (n_fb, groups), dict(
            **_pointer_args(t, dev, {}), N=N, F=F_, R=R_, K=K_, add_scale=float(add_scale),
            BLOCKS_PER_GROUP=blocks_per_group, has_add=wa is not None, has_mult=wm is not None,
            HAS_DOWN=du is not None, **_tile_args(cfg, "fwd")))
    return t["h"], _sum0(t["asq_part"]), _sum0(t["msq_part"]), _sum0(t["ds_part"])


def _launch_backward(saved2, add_scale, grads2, needs):
    """saved2: 2-D (gate, up, z, w_add, w_mult, down_u); grads2: 2-D (dh, d_add_sq, d_mult_sq, d_down_s),
    each possibly None; needs: ctx.needs_input_grad of the six.  Returns the six grads (or None)."""
    gate2, up2, z2, wa, wm, du = saved2
    (N, F_), R_, K_, dev = gate2.shape, z2.shape[1], (0 if du is None else du.shape[0]), gate2.device
    flags = _backward_flags((wa is not None, wm is not None, du is not None), [g is not None for g in grads2], needs)
    if not any(v for k, v in flags.items() if k.startswith("need_")):
        return (None,) * 6
    cfg = _block_config(N, F_, R_, K_, **_device_target(dev))
    n_fb, groups, blocks_per_group, n_rc = _backward_grid(N, F_, dict(cfg, R=R_), flags)
    buf = lambda need, shape, dtype=torch.float32: _empty(shape, dtype, dev) if flags[need] else None  # noqa: E731
    t = dict(gate=gate2, up=up2, z=z2, wa=wa, wm=wm, du=du,
             dh=grads2[0], dasq=grads2[1], dmsq=grads2[2], dds=grads2[3],
             dgate=buf("need_dgate", (N, F_), gate2.dtype), dup=buf("need_dup", (N, F_), up2.dtype),
             dz_part=buf("need_dz", (n_fb, N, R_)), dwa_part=buf("need_dwa", (groups, F_, R_)),
             dwm_part=buf("need_dwm", (groups, F_, R_)), ddu_part=buf("need_ddu", (groups, K_, F_)))
    with _on_device(dev):
        _launch("_mswiglu_bwd_kernel", (n_fb, groups, n_rc), dict(
            **_pointer_args(t, dev, dict(dh=gate2.dtype, dgate=gate2.dtype, dup=up2.dtype)),
            N=N, F=F_, R=R_, K=K_, add_scale=float(add_scale), BLOCKS_PER_GROUP=blocks_per_group,
            **flags, HAS_DOWN=du is not None, **_tile_args(cfg, "bwd")))
    return (t["dgate"], t["dup"], _sum0(t["dz_part"]), _sum0(t["dwa_part"]), _sum0(t["dwm_part"]),
            _sum0(t["ddu_part"]))


class _ModulatedSwiGLUFunction(torch.autograd.Function):
    """Saves only the inputs; backward recomputes everything N x F."""

    @staticmethod
    def forward(ctx, gate, up, z, w_add, w_mult, down_u, add_scale):
        ctx.set_materialize_grads(False)
        h, asq, msq, ds = _launch_forward(*_prepare(gate, up, z, w_add, w_mult, down_u), add_scale)
        ctx.save_for_backward(gate, up, z, w_add, w_mult, down_u)
        ctx.add_scale = add_scale
        lead = gate.shape[:-1]
        return (h.view(gate.shape),
                None if asq is None else asq.view(lead),
                None if msq is None else msq.view(lead),
                None if ds is None else ds.view(*lead, ds.shape[-1]))  # (..., K)

    @staticmethod
    def backward(ctx, dh, dasq, dmsq, dds):
        saved = ctx.saved_tensors
        gate = saved[0]
        flat = lambda t, *shape: None if t is None else t.contiguous().view(*shape)  # noqa: E731
        grads2 = (flat(dh, -1, gate.shape[-1]), flat(dasq, -1), flat(dmsq, -1),
                  None if dds is None else flat(dds.float(), -1, dds.shape[-1]))
        grads = _launch_backward(_prepare(*saved), ctx.add_scale, grads2, ctx.needs_input_grad[:6])
        # each grad back in its input's shape and dtype (the partial sums are fp32)
        return tuple(None if g is None else g.view(s.shape).to(s.dtype) for g, s in zip(grads, saved)) + (None,)


# --------------------------------------------------------------------------------------
# first-use self-check
# --------------------------------------------------------------------------------------
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}  # max |err| / max |ref|
SELF_CHECK_ROWS = 4
SELF_CHECK_IN_INTERPRETER = False  # tests opt in; in normal use only CUDA launches are checked
_self_check_passed: dict = {}  # configuration -> bool; a failed one runs on the torch backend


def _configuration(gate, up, z, w_add, w_mult, down_u) -> tuple:
    """What selects the compiled kernels: device, dtypes, branches, tile configuration (not N, not F
    beyond its divisibility, which are runtime / specialization values)."""
    R_, K_ = z.shape[-1], (0 if down_u is None else down_u.shape[0])
    cfg = _block_config(1, gate.shape[-1], R_, K_, **_device_target(gate.device))
    del cfg["target_programs"]
    dtypes = tuple(None if t is None else str(t.dtype).replace("torch.", "") for t in (gate, up, z, w_add, w_mult, down_u))
    return (str(gate.device), dtypes, gate.shape[-1] % 16 == 0) + tuple(sorted(cfg.items()))


def _outputs_and_grads(fn, inputs, add_scale):
    """Outputs of fn(*inputs, add_scale) and the grads of every input under fixed random cotangents."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with torch.enable_grad():
        outs = [o for o in fn(*leaves, add_scale) if o is not None]
        gen = torch.Generator().manual_seed(0)
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
                   for o in outs)
        grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)
    return outs + [g for g in grads if g is not None]


def _self_check_pair(rows, add_scale):
    """(kernel path, float64 reference) outputs and gradients on the checked rows."""
    got = _outputs_and_grads(
        lambda g, u, z, wa, wm, du, s: _ModulatedSwiGLUFunction.apply(g, u, z, wa, wm, du, s), rows, add_scale)
    want = _outputs_and_grads(lambda g, u, z, wa, wm, du, s: modulated_swiglu_reference(g, u, z, wa, wm, s, du),
                              [None if t is None else t.double() for t in rows], add_scale)
    return got, want


def _run_self_check(key, gate, up, z, w_add, w_mult, down_u, add_scale) -> bool:
    F_, R_ = gate.shape[-1], z.shape[-1]
    rows = (gate.reshape(-1, F_)[:SELF_CHECK_ROWS], up.reshape(-1, F_)[:SELF_CHECK_ROWS],
            z.reshape(-1, R_)[:SELF_CHECK_ROWS], w_add, w_mult, down_u)
    names = ["h", "add_sq", "mult_sq", "down_s"]
    names = [n for n, t in zip(names, (gate, w_add, w_mult, down_u)) if t is not None]
    names += ["d_" + n for n, t in zip(("gate", "up", "z", "w_add", "w_mult", "down_u"), rows) if t is not None]
    try:  # outside inference mode / autocast: autograd on clones, the reference in float64
        with torch.inference_mode(False), torch.autocast(gate.device.type, enabled=False):
            got, want = _self_check_pair(rows, add_scale)
        tol = SELF_CHECK_TOL.get(gate.dtype, 2e-2)
        errs = {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for n, a, b in zip(names, got, want)}
        bad = {n: e for n, e in errs.items() if not e <= tol}  # NaN counts as bad
        problem = f"relative error above {tol}: {bad}" if bad else None
    except Exception as exc:  # noqa: BLE001 - any failure of the kernel path means: do not use it
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        warnings.warn(f"npt_kernels.modulated_swiglu: the Triton kernels failed their first-use self-check for "
                      f"configuration {key}: {problem}; this configuration uses the PyTorch backend for the rest "
                      f"of the process", RuntimeWarning, stacklevel=3)
    return problem is None


def _passes_self_check(gate, up, z, w_add, w_mult, down_u, add_scale) -> bool:
    if not (gate.is_cuda or (SELF_CHECK_IN_INTERPRETER and _interpret_mode())):
        return True
    key = _configuration(gate, up, z, w_add, w_mult, down_u)
    if key not in _self_check_passed:
        _self_check_passed[key] = _run_self_check(key, gate, up, z, w_add, w_mult, down_u, add_scale)
    return _self_check_passed[key]


def modulated_swiglu(gate, up, z, w_add, w_mult, add_scale: float = 0.1, backend: str = "auto", down_u=None):
    """Returns (h, add_sq, mult_sq), and down_s as a fourth when down_u (K, F) is given; see the module
    docstring.  backend: auto | triton | torch.

    "auto" uses the Triton kernels for CUDA tensors (when triton is installed and K <= MAX_DOWN_RANK)
    and the PyTorch reference otherwise; "triton" on CPU tensors requires TRITON_INTERPRET=1.  On a GPU
    the first call of each kernel configuration is checked against a float64 reference on a few rows
    (SELF_CHECK_TOL); a configuration that fails warns once and runs on the reference from then on.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        fits = down_u is None or down_u.shape[0] <= MAX_DOWN_RANK
        backend = "triton" if (gate.is_cuda and triton is not None and fits) else "torch"
    reference = lambda: modulated_swiglu_reference(gate, up, z, w_add, w_mult, add_scale, down_u)  # noqa: E731
    if backend == "torch":
        return reference()
    _check_triton_usable(gate)
    _check_shapes(gate, up, z, w_add, w_mult, down_u)
    if gate.numel() == 0 or not _passes_self_check(gate, up, z, w_add, w_mult, down_u, add_scale):
        return reference()  # nothing to launch (the reference handles empty shapes) / a failed configuration
    out = _ModulatedSwiGLUFunction.apply(gate, up, z, w_add, w_mult, down_u, float(add_scale))
    return out if down_u is not None else out[:3]
