"""Tests of kernels/modulated_swiglu.py (imported as npt_kernels.modulated_swiglu): both backends against an independent float64 reference.

The Triton kernels run on CPU through the Triton interpreter: TRITON_INTERPRET=1 is set for each test
by the autouse fixture `poisoned_buffers` (monkeypatch, so it never leaks into other test modules); the
kernels read it at call time (`_triton_fns()` builds one set per mode), so it need not be set before
triton is imported.  Expected values are computed here in float64 from the formulas, not with the
module's own reference.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

import npt  # noqa: F401  (registers our kernels/ folder as npt_kernels: `kernels` is Hugging Face's)
from helpers import assert_same, rel_err

ms = importlib.import_module("npt_kernels.modulated_swiglu")
modulated_swiglu = ms.modulated_swiglu

ONE_TORCH_THREAD = True  # small tensors: a second OpenMP thread only spins (conftest)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.integration)]  # the interpreter: slow
# NPT_TEST_DEVICE=cuda puts make_inputs' tensors on the GPU, where the Triton kernels run compiled (no interpreter):
# the GPU check is `NPT_TEST_DEVICE=cuda python -m pytest --full tests/test_kernels.py`
DEVICE = os.environ.get("NPT_TEST_DEVICE", "cpu")
cpu_path = pytest.mark.skipif(DEVICE != "cpu", reason="tests the CPU path (CPU tensors)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the Triton path allocates starts as NaN, so an unwritten element fails."""
    log = []

    def _nan_empty(shape, dtype, device):
        log.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ms, "_empty", _nan_empty)
    return log


# ------------------------------------------------------------------------------ reference
def reference64(gate, up, z, w_add, w_mult, add_scale, dh, c_add, c_mult, down_u=None, c_down=None):
    """float64 outputs and gradients of loss = (h*dh).sum() + (add_sq*c_add).sum() + (mult_sq*c_mult).sum()
    + (down_s*c_down).sum(); returns (h, add_sq, mult_sq, down_s, grads)."""
    leaves = {k: (None if t is None else t.detach().double().requires_grad_())
              for k, t in dict(gate=gate, up=up, z=z, w_add=w_add, w_mult=w_mult, down_u=down_u).items()}
    x, u, zz = leaves["gate"], leaves["up"], leaves["z"]
    g = x
    add_sq = mult_sq = down_s = None
    loss = 0.0
    if leaves["w_mult"] is not None:
        m = zz @ leaves["w_mult"].t()
        g = g * (0.5 + torch.sigmoid(m))  # torch's sigmoid: stable (also its grad) at |m| ~ 1e4
        mult_sq = (m * m).sum(-1)
        loss = loss + (mult_sq * c_mult.double()).sum()
    if leaves["w_add"] is not None:
        a = zz @ leaves["w_add"].t()
        g = g + add_scale * a
        add_sq = (a * a).sum(-1)
        loss = loss + (add_sq * c_add.double()).sum()
    h = g * torch.sigmoid(g) * u
    loss = loss + (h * dh.double()).sum()
    if leaves["down_u"] is not None:
        down_s = h @ leaves["down_u"].t()  # (..., K)
        loss = loss + (down_s * c_down.double()).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)  # z unused if no branch
    return h, add_sq, mult_sq, down_s, dict(zip(names, grads))


class Inputs(NamedTuple):
    gate: torch.Tensor
    up: torch.Tensor
    z: torch.Tensor
    w_add: Optional[torch.Tensor]
    w_mult: Optional[torch.Tensor]
    dh: torch.Tensor  # cotangents: of h,
    c_add: torch.Tensor  # add_sq,
    c_mult: torch.Tensor  # mult_sq,
    down_u: Optional[torch.Tensor] = None
    c_down: Optional[torch.Tensor] = None  # and down_s


def make_inputs(lead, F, r, dtype=torch.float32, z_dtype=torch.float32, w_dtype=torch.float32,
                add=True, mult=True, seed=0, down_rank=None):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(*lead, F, generator=gen).to(dtype)
    up = torch.randn(*lead, F, generator=gen).to(dtype)
    z = torch.randn(*lead, r, generator=gen).to(z_dtype)
    w_add = (0.5 * torch.randn(F, r, generator=gen)).to(w_dtype) if add else None
    w_mult = (0.5 * torch.randn(F, r, generator=gen)).to(w_dtype) if mult else None
    dh = torch.randn(*lead, F, generator=gen).to(dtype).float()  # exactly representable in h's dtype
    c_add = torch.randn(*lead, generator=gen)
    c_mult = torch.randn(*lead, generator=gen)
    if down_rank is None:
        return on_device(Inputs(gate, up, z, w_add, w_mult, dh, c_add, c_mult))
    down_u = (torch.randn(down_rank, F, generator=gen) / F ** 0.5).to(w_dtype)
    return on_device(Inputs(gate, up, z, w_add, w_mult, dh, c_add, c_mult, down_u,
                            torch.randn(*lead, down_rank, generator=gen)))


def on_device(inputs):
    return type(inputs)(*(None if t is None else t.to(DEVICE) for t in inputs))


INPUT_NAMES = ("gate", "up", "z", "w_add", "w_mult", "down_u")


def run(backend, inputs, add_scale=0.1, requires=INPUT_NAMES, use_h=True):
    """Outputs and the gradients of `requires` (those present) of the loss reference64 describes."""
    ins = {k: (None if getattr(inputs, k) is None else getattr(inputs, k).clone().requires_grad_(k in requires))
           for k in INPUT_NAMES}
    outs = modulated_swiglu(*(ins[k] for k in INPUT_NAMES[:5]), add_scale, backend=backend, down_u=ins["down_u"])
    assert len(outs) == (3 if inputs.down_u is None else 4)
    h, add_sq, mult_sq, down_s = (tuple(outs) + (None,))[:4]
    loss = (h.float() * inputs.dh).sum() if use_h else 0.0
    for out, c in ((add_sq, inputs.c_add), (mult_sq, inputs.c_mult), (down_s, inputs.c_down)):
        if out is not None:
            loss = loss + (out * c).sum()
    names = [k for k in requires if ins[k] is not None]
    grads = torch.autograd.grad(loss, [ins[k] for k in names], allow_unused=True) if names else []
    return h, add_sq, mult_sq, down_s, dict(zip(names, grads))


def check_against_reference(backend, inputs, tol, add_scale=0.1, requires=INPUT_NAMES, use_h=True):
    h, add_sq, mult_sq, down_s, grads = run(backend, inputs, add_scale=add_scale, requires=requires, use_h=use_h)
    dh = inputs.dh if use_h else torch.zeros_like(inputs.dh)
    rh, radd, rmult, rdown, rgrads = reference64(*inputs[:5], add_scale, dh, *inputs[6:])
    assert h.dtype == inputs.gate.dtype and h.shape == inputs.gate.shape
    errs = {"h": rel_err(h, rh)}
    lead = inputs.gate.shape[:-1]
    for name, out, ref, shape in (("add_sq", add_sq, radd, lead), ("mult_sq", mult_sq, rmult, lead),
                                  ("down_s", down_s, rdown, lead + (len(inputs.down_u if inputs.down_u is not None
                                                                        else ()),))):
        if ref is None:
            assert out is None, f"{name} should be None when its branch is off"
        else:
            assert out.dtype == torch.float32 and out.shape == shape, name
            errs[name] = rel_err(out, ref)
    for name, gr in grads.items():
        if rgrads[name] is None:  # input not used (z with both branches off)
            assert gr is None or not gr.any(), name
            continue
        src = getattr(inputs, name)
        assert gr.dtype == src.dtype and gr.shape == src.shape, name
        errs["d_" + name] = rel_err(gr, rgrads[name])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    WORST[(backend, tol)] = max(WORST.get((backend, tol), 0.0), *errs.values())
    return errs


WORST = {}  # (backend, tolerance) -> worst relative error seen, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    yield
    print("\nworst relative errors:", {f"{b} tol {t:g}": f"{e:.2e}" for (b, t), e in sorted(WORST.items())})


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [1, 8, 16, 17, 64])
def test_fp32_ranks(backend, r):
    # F = 200 is not a multiple of any block size; N = 100 gives several row blocks per group
    check_against_reference(backend, make_inputs((100,), 200, r, seed=r), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 8, 16, 17, 64])
def test_half_precision(backend, dtype, r):
    check_against_reference(backend, make_inputs((2, 37), 150, r, dtype=dtype, seed=r), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_codes_and_weights(backend):
    """z and the weights in bf16 too: gradients come back in their dtypes."""
    inputs = make_inputs((45,), 96, 8, dtype=torch.bfloat16, z_dtype=torch.bfloat16, w_dtype=torch.bfloat16)
    check_against_reference(backend, inputs, TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_above_block(backend):
    """r = 80 > 64 runs the rank in two masked chunks (K loop, chunked dz / dW grid)."""
    check_against_reference(backend, make_inputs((50,), 70, 80, seed=3), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,F", [((1,), 33), ((1, 1), 300), ((3, 1, 5), 17)])
def test_shapes(backend, lead, F):
    """N = 1, leading shapes of any rank, F smaller / larger than one block."""
    check_against_reference(backend, make_inputs(lead, F, 17, seed=F), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add,mult", [(True, False), (False, True), (False, False)])
def test_branch_off(backend, add, mult):
    check_against_reference(backend, make_inputs((40,), 130, 16, add=add, mult=mult), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_scale(backend):
    check_against_reference(backend, make_inputs((20,), 64, 8), TOL[torch.float32], add_scale=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gate, up, z, w_add, w_mult, dh, c_add, c_mult = make_inputs((30,), 80, 16)[:8]
    gate = torch.cat([gate, gate], -1)[:, ::2]  # strided view, same values
    z = z.t().contiguous().t()  # column-major
    w_add = w_add.t().contiguous().t()
    assert not gate.is_contiguous() and not z.is_contiguous() and not w_add.is_contiguous()
    check_against_reference(backend, Inputs(gate, up, z, w_add, w_mult, dh, c_add, c_mult), TOL[torch.float32])


@cpu_path
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_codes_no_nan(backend):
    """m = +-1e4 and a = +-1e4 (so |g| ~ 1e3): outputs and gradients stay finite and exact."""
    F, r, N = 40, 4, 6
    gen = torch.Generator().manual_seed(1)
    z = torch.zeros(N, r)
    z[torch.arange(N), torch.arange(N) % r] = 1e4 * torch.tensor([1.0, -1.0]).repeat(N // 2)
    w_mult = torch.randint(-1, 2, (F, r), generator=gen).float()
    w_add = torch.randint(-1, 2, (F, r), generator=gen).float()
    gate, up = torch.randn(N, F, generator=gen), torch.randn(N, F, generator=gen)
    dh, c_add, c_mult = torch.randn(N, F, generator=gen), torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    inputs = Inputs(gate, up, z, w_add, w_mult, dh, c_add, c_mult)
    h, add_sq, mult_sq, _, grads = run(backend, inputs)
    for t in (h, add_sq, mult_sq, *grads.values()):
        assert torch.isfinite(t).all()
    check_against_reference(backend, inputs, TOL[torch.float32])


# ------------------------------------------------------------------------------ autograd plumbing
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [("z", "w_add", "w_mult"), ("w_mult",), ("gate",), ("up", "z")])
def test_needs_input_grad(backend, requires, poisoned_buffers):
    inputs = make_inputs((50,), 150, 17, seed=7)
    check_against_reference(backend, inputs, TOL[torch.float32], requires=requires)


def test_backward_skips_unneeded_input_grads(poisoned_buffers):
    """With gate / up not requiring grad, backward allocates (and so writes) no N x F buffer."""
    N, F = 40, 100
    gate, up, z, w_add, w_mult, dh, _, _ = make_inputs((N,), F, 8)[:8]
    z, w_add, w_mult = (t.requires_grad_() for t in (z, w_add, w_mult))
    h, add_sq, mult_sq = modulated_swiglu(gate, up, z, w_add, w_mult, backend="triton")
    assert (N, F) in poisoned_buffers  # the forward's h
    poisoned_buffers.clear()
    ((h * dh).sum() + add_sq.sum() + mult_sq.sum()).backward()
    assert poisoned_buffers and (N, F) not in poisoned_buffers, poisoned_buffers
    assert all(torch.isfinite(t.grad).all() for t in (z, w_add, w_mult))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_sums_in_loss(backend):
    """h unused: gradients reach z and the weights through add_sq / mult_sq only."""
    gate, up, z, w_add, w_mult, dh, c_add, c_mult = make_inputs((30,), 90, 16)[:8]
    zl, wal, wml = (t.clone().requires_grad_() for t in (z, w_add, w_mult))
    _, add_sq, mult_sq = modulated_swiglu(gate, up, zl, wal, wml, backend=backend)
    gz, gwa, gwm = torch.autograd.grad((add_sq * c_add).sum() + (mult_sq * c_mult).sum(), [zl, wal, wml])
    *_, rgrads = reference64(gate, up, z, w_add, w_mult, 0.1, torch.zeros_like(dh), c_add, c_mult)
    for got, name in ((gz, "z"), (gwa, "w_add"), (gwm, "w_mult")):
        assert rel_err(got, rgrads[name]) <= TOL[torch.float32], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_grads(backend):
    """loss = h.sum() + sums.sum(): autograd hands backward stride-0 (expanded) gradients."""
    gate, up, z, w_add, w_mult, dh, c_add, c_mult = make_inputs((2, 20), 70, 8)[:8]
    ins = [t.clone().requires_grad_() for t in (gate, up, z, w_add, w_mult)]
    h, add_sq, mult_sq = modulated_swiglu(*ins, backend=backend)
    grads = torch.autograd.grad(h.sum() + add_sq.sum() + mult_sq.sum(), ins)
    ones = torch.ones_like(c_add)
    *_, rgrads = reference64(gate, up, z, w_add, w_mult, 0.1, torch.ones_like(dh), ones, ones)
    for got, name in zip(grads, ("gate", "up", "z", "w_add", "w_mult")):
        assert rel_err(got, rgrads[name]) <= TOL[torch.float32], name


def test_backends_return_same_structure():
    """Same output structure (shapes, dtypes, None-ness) from both backends, and the same values: each
    backend's outputs against the float64 reference."""
    inputs = make_inputs((3, 7), 50, 8, dtype=torch.bfloat16, mult=False)
    gate, up, z, w_add, w_mult = inputs[:5]
    a = modulated_swiglu(gate, up, z, w_add, w_mult, backend="torch")
    b = modulated_swiglu(gate, up, z, w_add, w_mult, backend="triton")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype
    ref = reference64(gate, up, z, w_add, w_mult, 0.1, *inputs[5:8])[:3]  # (h, add_sq, mult_sq = None)
    for backend, outs in (("torch", a), ("triton", b)):
        assert outs[2] is None and ref[2] is None
        for name, got, want in zip(("h", "add_sq"), outs[:2], ref[:2]):
            assert rel_err(got, want) <= TOL[torch.bfloat16], (backend, name)


# ------------------------------------------------------------------------------ down modulation
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 4, 17])
def test_down_ranks(backend, K):
    """down_s = h32 @ down_u^T and its gradients; F = 200 leaves a tail in every F block size."""
    check_against_reference(backend, make_inputs((100,), 200, 16, seed=K, down_rank=K), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_down_half_precision(backend, dtype):
    """down_s comes from h in fp32, before h is rounded to gate's dtype."""
    check_against_reference(backend, make_inputs((2, 37), 150, 17, dtype=dtype, seed=5, down_rank=4), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add,mult", [(True, True), (True, False), (False, True), (False, False)])
def test_down_with_branches(backend, add, mult):
    inputs = make_inputs((40,), 130, 16, add=add, mult=mult, seed=11, down_rank=4)
    check_against_reference(backend, inputs, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,F,r", [((1,), 33, 4), ((3, 1, 5), 17, 80)])
def test_down_shapes(backend, lead, F, r):
    """N = 1, several leading dims, F below one block; r = 80 takes the chunked-rank path."""
    check_against_reference(backend, make_inputs(lead, F, r, seed=F, down_rank=17), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add,mult", [(True, True), (False, False)])
def test_gradients_through_down_s_only(backend, add, mult):
    """Neither h nor the sums in the loss: every input's gradient comes through down_s alone."""
    inputs = make_inputs((30,), 90, 16, add=add, mult=mult, seed=2, down_rank=4)
    inputs = inputs._replace(c_add=torch.zeros_like(inputs.c_add), c_mult=torch.zeros_like(inputs.c_mult))
    check_against_reference(backend, inputs, TOL[torch.float32], use_h=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [("down_u",), ("gate", "down_u"), ("z", "w_add", "w_mult"), ("up",)])
def test_down_needs_input_grad(backend, requires):
    check_against_reference(backend, make_inputs((50,), 150, 17, seed=8, down_rank=4), TOL[torch.float32],
                            requires=requires)


@pytest.mark.parametrize("backend", BACKENDS)
def test_down_s_unused(backend):
    """down_u given but down_s outside the loss: autograd passes no d_down_s, down_u gets no gradient."""
    inputs = make_inputs((30,), 90, 16, seed=4, down_rank=4)
    ins = [t.clone().requires_grad_() for t in inputs[:5]] + [inputs.down_u.clone().requires_grad_()]
    h, add_sq, mult_sq, _ = modulated_swiglu(*ins[:5], backend=backend, down_u=ins[5])
    loss = (h.float() * inputs.dh).sum() + (add_sq * inputs.c_add).sum() + (mult_sq * inputs.c_mult).sum()
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    *_, rgrads = reference64(*inputs[:5], 0.1, inputs.dh, inputs.c_add, inputs.c_mult)
    for got, name in zip(grads[:5], INPUT_NAMES):
        assert rel_err(got, rgrads[name]) <= TOL[torch.float32], name
    assert grads[5] is None or not grads[5].any()


def test_down_rank_above_kernel_limit():
    """K > MAX_DOWN_RANK: backend="triton" refuses with the limit, "auto" and "torch" use the reference."""
    inputs = make_inputs((5,), 40, 4, down_rank=ms.MAX_DOWN_RANK + 1)
    with pytest.raises(ValueError, match=f"K <= {ms.MAX_DOWN_RANK}"):
        modulated_swiglu(*inputs[:5], backend="triton", down_u=inputs.down_u)
    for backend in ("auto", "torch"):
        out = modulated_swiglu(*inputs[:5], backend=backend, down_u=inputs.down_u)
        assert out[3].shape == (5, ms.MAX_DOWN_RANK + 1)


def test_down_u_shape_mismatch_raises():
    inputs = make_inputs((5,), 40, 4, down_rank=3)
    with pytest.raises(ValueError, match="down_u"):
        modulated_swiglu(*inputs[:5], backend="triton", down_u=inputs.down_u[:, :20])


# ------------------------------------------------------------------------------ first-use self-check
@pytest.fixture
def self_check(monkeypatch):
    """The self-check on (CPU, interpreter) with a fresh record of checked configurations."""
    monkeypatch.setattr(ms, "SELF_CHECK_IN_INTERPRETER", True)
    monkeypatch.setattr(ms, "_self_check_passed", {})
    return ms._self_check_passed


def calls_and_grads(backend, inputs):
    """Two calls (so the second meets the recorded verdict) with gradients of every input."""
    return [run(backend, inputs) for _ in range(2)]


@pytest.mark.parametrize("failure", ["wrong values", "exception"])
def test_self_check_failure_warns_once_and_uses_torch(self_check, monkeypatch, failure):
    real_launch = ms._launch_forward

    def broken_launch(*args):
        if failure == "exception":
            raise RuntimeError("simulated kernel failure")
        h, *sums = real_launch(*args)
        return (h + 1.0, *sums)

    monkeypatch.setattr(ms, "_launch_forward", broken_launch)
    inputs = make_inputs((9,), 50, 8, down_rank=4)
    with pytest.warns(RuntimeWarning) as record:
        got = calls_and_grads("triton", inputs)
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    assert "self-check" in message and "PyTorch backend" in message
    assert ("simulated kernel failure" if failure == "exception" else "relative error above") in message
    assert "'h'" in message or failure == "exception"  # what differed
    want = calls_and_grads("torch", inputs)
    for a, b in zip(got, want):
        assert_same(a, b)
    assert list(self_check.values()) == [False]


def test_self_check_passes_silently_and_keeps_triton(self_check, monkeypatch, recwarn):
    launches = []
    real_launch = ms._launch_forward
    monkeypatch.setattr(ms, "_launch_forward", lambda *args: launches.append(1) or real_launch(*args))
    inputs = make_inputs((9,), 50, 8, down_rank=4)
    calls_and_grads("triton", inputs)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert list(self_check.values()) == [True]
    assert len(launches) == 3  # the check's slice once, then both calls on the kernels


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_self_check_passes_without_autograd(self_check, recwarn, mode):
    """Evaluation / generation: the check still runs its backward (outside that mode) and passes."""
    inputs = make_inputs((9,), 50, 8, down_rank=4)
    with mode():
        got = modulated_swiglu(*inputs[:5], backend="triton", down_u=inputs.down_u)
    assert list(self_check.values()) == [True], [str(w.message) for w in recwarn]
    want = modulated_swiglu(*inputs[:5], backend="torch", down_u=inputs.down_u)
    assert all(rel_err(a, b) <= TOL[torch.float32] for a, b in zip(got, want))


def test_self_check_is_per_configuration(self_check, monkeypatch):
    """A failure of one configuration (fp32) leaves another (bf16) on the kernels."""
    real_launch = ms._launch_forward

    def fp32_broken(gate2, *args):
        h, *sums = real_launch(gate2, *args)
        return (h + 1.0 if gate2.dtype == torch.float32 else h, *sums)

    monkeypatch.setattr(ms, "_launch_forward", fp32_broken)
    with pytest.warns(RuntimeWarning):
        run("triton", make_inputs((9,), 50, 8))
    check_against_reference("triton", make_inputs((9,), 50, 8, dtype=torch.bfloat16), TOL[torch.bfloat16])
    assert sorted(self_check.values()) == [False, True]


@cpu_path
def test_self_check_off_on_cpu_by_default():
    checked = dict(ms._self_check_passed)
    run("triton", make_inputs((9,), 50, 8))
    assert ms._self_check_passed == checked


# ------------------------------------------------------------------------------ backend selection
def test_bad_backend_raises():
    gate, up, z, w_add, w_mult = make_inputs((4,), 16, 2)[:5]
    with pytest.raises(ValueError, match="backend"):
        modulated_swiglu(gate, up, z, w_add, w_mult, backend="cuda")


@cpu_path
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    gate, up, z, w_add, w_mult = make_inputs((4,), 16, 2)[:5]
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*backend='torch'"):
        modulated_swiglu(gate, up, z, w_add, w_mult, backend="triton")


def test_auto_uses_torch_on_cpu(monkeypatch):
    def _boom(*args, **kwargs):
        raise AssertionError("auto must not launch Triton on CPU tensors")

    monkeypatch.setattr(ms, "_launch_forward", _boom)
    gate, up, z, w_add, w_mult = make_inputs((4,), 16, 2)[:5]
    h, add_sq, mult_sq = modulated_swiglu(gate, up, z, w_add, w_mult)  # backend="auto"
    torch.testing.assert_close(h, ms.modulated_swiglu_reference(gate, up, z, w_add, w_mult)[0])


def test_shape_mismatch_raises():
    gate, up, z, w_add, w_mult = make_inputs((4,), 16, 2)[:5]
    with pytest.raises(ValueError):
        modulated_swiglu(gate, up[:, :8], z, w_add, w_mult, backend="triton")
    with pytest.raises(ValueError):
        modulated_swiglu(gate, up, z, w_add[:, :1], w_mult, backend="triton")


@pytest.mark.integration
def test_interpreter_enabled_after_triton_import():
    """TRITON_INTERPRET set only after triton (and kernels) were imported still works."""
    code = (
        "import os, torch\n"
        "import triton, npt\n"
        "from npt_kernels.modulated_swiglu import modulated_swiglu\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "g, u, z = torch.randn(5, 40), torch.randn(5, 40), torch.randn(5, 3)\n"
        "wa, wm = torch.randn(40, 3), torch.randn(40, 3)\n"
        "a = modulated_swiglu(g, u, z, wa, wm, backend='triton')\n"
        "b = modulated_swiglu(g, u, z, wa, wm, backend='torch')\n"
        "assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(a, b))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_torch_path_keeps_fp32_under_fp16_autocast():
    """Under CPU fp16 autocast the code matmuls come out fp16: the gate and the per-token square sums (the
    regularizer) must still be fp32, or a sum past 65,504 overflows (the seed's non-finite losses). float64
    reference."""
    from npt_kernels.modulated_swiglu import modulated_gate

    gen = torch.Generator().manual_seed(7)
    gate, z = torch.randn(4, 1536, generator=gen), torch.randn(4, 16, generator=gen) * 30
    w_add, w_mult = torch.randn(1536, 16, generator=gen), torch.randn(1536, 16, generator=gen) * 1e-3
    with torch.autocast("cpu", dtype=torch.float16):
        g, add_sq, mult_sq = modulated_gate(gate, z, w_add, w_mult)
    ref_g, ref_add, ref_mult = modulated_gate(gate.double(), z.double(), w_add.double(), w_mult.double())
    assert g.dtype == add_sq.dtype == mult_sq.dtype == torch.float32
    assert bool((ref_add > 65504).all()), "the test needs sums that overflow fp16"
    for got, ref in ((g, ref_g), (add_sq, ref_add), (mult_sq, ref_mult)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=1e-2)  # fp16 matmul inputs
