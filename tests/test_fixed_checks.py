"""Every check of test_fixed_npt.py fails when its fix is reverted, and the script passes as a whole."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import npt
from npt_tools.arguments import EXACT_RANK
from npt_tools import fix_checks as checks
from npt_tools.closed_form import init_exact
from npt_tools.inspection import tanh_factor
from npt_tools.objective import equivalence_loss
from npt_tools.step import StepResult

pytestmark = pytest.mark.integration  # the embedded model, the script as a process
ROOT = Path(__file__).resolve().parents[1]
ONE_TORCH_THREAD = True


def seed_code_factor(m):
    """What the seed's code wrote: range (0.5, 1.0), 0.75 at m = 0."""
    return 0.5 * torch.sigmoid(m) + 0.5


@pytest.fixture(scope="module")
def subject(embedded):
    """The checks' models, built on the shared embedded model (loaded once per session)."""
    return checks.Subject(loaded=embedded)


@pytest.mark.parametrize("name", list(checks.CHECKS))
def test_check(subject, name):
    """Each check of the script passes on the project's own code (what `python test_fixed_npt.py` runs)."""
    checks.CHECKS[name][1](subject)


def fresh_adapter(subject):
    return copy.deepcopy(npt.npt_layers(subject.reference_npt_model)[0].adapter)


def test_script_passes_without_input():
    proc = subprocess.run([sys.executable, "test_fixed_npt.py"], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_torch_thread
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == len(checks.CHECKS) and all(line.startswith("PASS") for line in lines), proc.stdout
    assert f"{len(checks.CHECKS)}/{len(checks.CHECKS)} checks passed" in proc.stdout


def run_script(*args):
    return subprocess.run([sys.executable, "test_fixed_npt.py", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=170, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_script_is_a_cli():
    """--help lists --check and the model flags; bad flags are one line and exit 2; --check runs one check."""
    proc = run_script("--help")
    assert proc.returncode == 0 and all(f in proc.stdout for f in ("--check", "--model_name", "--use_quantization",
                                                                     "--use_fp16", "factor_range"))
    for bad in (["--bogus"], ["--check", "no_such_check"], ["--model_name", "/no/such/model"]):
        proc = run_script(*bad)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (bad, proc.stderr)
        assert "PASS" not in proc.stdout
    proc = run_script("--check", "factor_range", "--check", "precision")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert proc.returncode == 0 and [line.split()[1] for line in lines] == ["factor_range", "precision"], proc.stdout
    assert "2/2 checks passed" in proc.stdout


# ----------------------------------------------------------------------------- fix 1: the factor
def test_tanh_factor_fails_range_and_never_zero(subject):
    with pytest.raises(AssertionError, match="not inside"):
        checks.check_factor_range(subject, tanh_factor)
    with pytest.raises(AssertionError, match="must stay >= 0.5"):
        checks.check_factor_never_zero(subject, tanh_factor)


def test_seed_code_factor_fails_range_and_identity(subject):
    with pytest.raises(AssertionError, match="should reach"):
        checks.check_factor_range(subject, seed_code_factor)
    with pytest.raises(AssertionError, match="not exactly 1"):
        checks.check_identity_at_init(subject, seed_code_factor)


def test_nonzero_b_mult_fails_identity(subject):
    adapter = fresh_adapter(subject)
    nn.init.normal_(adapter.B_mult.weight, std=0.01)
    with pytest.raises(AssertionError, match="fresh B_mult"):
        checks.check_identity_at_init(subject, adapter=adapter)


# ----------------------------------------------------------------------------- fix 3: init
@pytest.mark.parametrize("revert, message", [
    (lambda a: a.A_proj.reset_parameters(), "A_proj std"),  # nn.Linear's kaiming default
    (lambda a: nn.init.normal_(a.B_add.weight, std=0.01), "B_add std"),  # the seed's old 0.01
    (lambda a: nn.init.normal_(a.B_mult.weight, std=0.001), "B_mult is not zero"),
])
def test_large_or_nonzero_init_fails(subject, revert, message):
    adapter = fresh_adapter(subject)
    with torch.no_grad():
        revert(adapter)
    with pytest.raises(AssertionError, match=message):
        checks.check_init_scales(subject, adapter)


# ----------------------------------------------------------------------------- fix 4: loss
def test_plain_mse_fails_loss_check(subject):
    with pytest.raises(AssertionError, match="not bounded"):
        checks.check_loss_bounded(subject, F.mse_loss)


# ----------------------------------------------------------------------------- fix 2: precision
def test_fp16_kept_with_quantization_fails(subject):
    with pytest.raises(AssertionError, match="resolves to torch.float16"):
        checks.check_precision(subject, lambda quant, fp16: torch.float16 if fp16 else torch.float32)


def test_silent_fp32_fails(subject):
    with pytest.raises(AssertionError, match="0 warnings, expected 1"):
        checks.check_precision(subject, lambda quant, fp16: torch.float16 if fp16 and not quant else torch.float32)


def test_fp16_compute_in_4bit_model_fails(subject):
    model = subject.quantized
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    layer.compute_dtype = torch.float16
    try:
        with pytest.raises(AssertionError, match="compute in"):
            checks.check_quantized_compute(subject, model)
    finally:
        layer.compute_dtype = torch.float32
    with pytest.raises(AssertionError, match="not quantized"):
        checks.check_quantized_compute(subject, subject.reference_npt_model)


# ----------------------------------------------------------------------------- the model
def test_nan_adapter_fails_finite_logits(subject):
    model = subject.npt_model()
    with torch.no_grad():
        npt.npt_layers(model)[3].adapter.A_proj.weight[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite logits"):
        checks.check_finite_logits(subject, model)


# ----------------------------------------------------------------------------- the trainer's fixes
def naive_step(model, optimizer, scheduler, micro_batches, **kwargs):
    """One optimizer step without NaN skipping: what the seed's trainer did."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in micro_batches:
        loss = equivalence_loss(model, micro).loss / len(micro_batches)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(npt.get_adapter_params(model), 0.5)
    optimizer.step()
    scheduler.step()
    return StepResult(loss=total, fit=total, reg=0.0, grad_norm=grad_norm.item(), skipped=0)


def test_step_without_nan_skipping_fails(subject):
    with pytest.raises(AssertionError, match="skipped = 0"):
        checks.check_nan_batch_skipped(subject, naive_step)


def no_step(model, optimizer, scheduler, micro_batches, **kwargs):
    """A step that reports success and changes nothing."""
    return StepResult(loss=1.0, fit=1.0, reg=0.0, grad_norm=0.0, skipped=0)


def test_step_that_does_not_train_fails(subject):
    with pytest.raises(AssertionError, match="changed no adapter"):
        checks.check_training_step(subject, no_step)


def test_unfrozen_base_fails_training_step(subject):
    model = subject.npt_model(seed=1)
    model.model.layers[5].layer.mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="base parameters"):
        checks.check_training_step(subject, model=model)


# ----------------------------------------------------------------------------- the default target: exact
def start_then(change):
    """init_exact, then `change(model)`: a start broken after the fact."""
    def init(model, batches):
        init_exact(model, batches)
        with torch.no_grad():
            change(model)
    return init


@pytest.mark.parametrize("init_fn", [
    lambda model, batches: {},  # no start: a_hat = 0, the attention dropped
    start_then(lambda m: npt.npt_layers(m)[5].adapter.B.weight.mul_(1 + 1e-3)),  # one layer's estimate 0.1% off
], ids=["no start", "B 0.1% off in one layer"])
def test_start_that_is_not_the_identity_fails_exact_full_rank(subject, init_fn):
    with pytest.raises(AssertionError, match="differ from the base model's"):
        checks.check_exact_full_rank(subject, init_fn)


def test_nan_start_fails_exact_full_rank(subject):
    with pytest.raises(AssertionError, match="non-finite logits"):
        checks.check_exact_full_rank(subject, start_then(lambda m: npt.npt_layers(m)[3].adapter.mu.fill_(float("nan"))))


def test_low_rank_fails_exact_default_rank(subject):
    """Rank 16 keeps the teacher's next token on about 43% of the held-out positions."""
    with pytest.raises(AssertionError, match="rank-16 start keeps the teacher's next token on .* below 75%"):
        checks.check_exact_default_rank(subject, model=subject.exact_model(rank=16))


def test_nan_adapter_fails_exact_default_rank(subject):
    with pytest.raises(AssertionError, match=f"non-finite logits at rank {EXACT_RANK}"):
        checks.check_exact_default_rank(subject, start_then(
            lambda m: npt.npt_layers(m)[3].adapter.A_proj.weight[0, 0].fill_(float("nan"))))


def test_step_that_does_not_train_fails_on_exact(subject):
    with pytest.raises(AssertionError, match="changed no adapter"):
        checks.check_exact_training_step(subject, no_step)


def test_unfrozen_base_fails_exact_training_step(subject):
    model = checks.started_exact_model(subject, seed=1)
    model.model.layers[5].layer.mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="base parameters"):
        checks.check_exact_training_step(subject, model=model)


def test_nan_gradient_fails_exact_training_step(subject):
    """A finite loss whose gradient on one adapter tensor is NaN (d sqrt(u) / du at u = 0, times 0)."""
    def nan_gradient_loss(model, batch, **kwargs):
        out = equivalence_loss(model, batch, **kwargs)
        mu = npt.npt_layers(model)[0].adapter.mu
        out.loss = out.loss + torch.sqrt((mu - mu.detach()).pow(2).sum())
        return out

    with pytest.raises(AssertionError, match="non-finite adapter gradients"):
        checks.check_exact_training_step(subject, loss_fn=nan_gradient_loss)


def test_step_without_nan_skipping_fails_on_exact(subject):
    with pytest.raises(AssertionError, match="skipped = 0"):
        checks.check_exact_nan_batch_skipped(subject, naive_step)
