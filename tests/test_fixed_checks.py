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
import test_fixed_npt as checks
from debug_nan import tanh_factor

ROOT = Path(__file__).resolve().parents[1]
ONE_TORCH_THREAD = True


def seed_code_factor(m):
    """What the seed's code wrote: range (0.5, 1.0), 0.75 at m = 0."""
    return 0.5 * torch.sigmoid(m) + 0.5


def fresh_adapter():
    return copy.deepcopy(npt.npt_layers(checks.reference_npt_model())[0].adapter)


def test_script_passes_without_input():
    proc = subprocess.run([sys.executable, "test_fixed_npt.py"], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_torch_thread
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == len(checks.CHECKS) and all(line.startswith("PASS") for line in lines), proc.stdout
    assert f"{len(checks.CHECKS)}/{len(checks.CHECKS)} checks passed" in proc.stdout


# ----------------------------------------------------------------------------- fix 1: the factor
def test_tanh_factor_fails_range_and_never_zero():
    with pytest.raises(AssertionError, match="not inside"):
        checks.check_factor_range(tanh_factor)
    with pytest.raises(AssertionError, match="must stay >= 0.5"):
        checks.check_factor_never_zero(tanh_factor)


def test_seed_code_factor_fails_range_and_identity():
    with pytest.raises(AssertionError, match="should reach"):
        checks.check_factor_range(seed_code_factor)
    with pytest.raises(AssertionError, match="not exactly 1"):
        checks.check_identity_at_init(seed_code_factor)


def test_nonzero_b_mult_fails_identity():
    adapter = fresh_adapter()
    nn.init.normal_(adapter.B_mult.weight, std=0.01)
    with pytest.raises(AssertionError, match="fresh B_mult"):
        checks.check_identity_at_init(adapter=adapter)


# ----------------------------------------------------------------------------- fix 3: init
@pytest.mark.parametrize("revert, message", [
    (lambda a: a.A_proj.reset_parameters(), "A_proj std"),  # nn.Linear's kaiming default
    (lambda a: nn.init.normal_(a.B_add.weight, std=0.01), "B_add std"),  # the seed's old 0.01
    (lambda a: nn.init.normal_(a.B_mult.weight, std=0.001), "B_mult is not zero"),
])
def test_large_or_nonzero_init_fails(revert, message):
    adapter = fresh_adapter()
    with torch.no_grad():
        revert(adapter)
    with pytest.raises(AssertionError, match=message):
        checks.check_init_scales(adapter)


# ----------------------------------------------------------------------------- fix 4: loss
def test_plain_mse_fails_loss_check():
    with pytest.raises(AssertionError, match="not bounded"):
        checks.check_loss_bounded(F.mse_loss)


# ----------------------------------------------------------------------------- fix 2: precision
def test_fp16_kept_with_quantization_fails():
    with pytest.raises(AssertionError, match="resolves to torch.float16"):
        checks.check_precision(lambda quant, fp16: torch.float16 if fp16 else torch.float32)


def test_silent_fp32_fails():
    with pytest.raises(AssertionError, match="0 warnings, expected 1"):
        checks.check_precision(lambda quant, fp16: torch.float16 if fp16 and not quant else torch.float32)


def test_fp16_compute_in_4bit_model_fails():
    model = checks.quantized_model()
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    layer.compute_dtype = torch.float16
    try:
        with pytest.raises(AssertionError, match="compute in"):
            checks.check_quantized_compute(model)
    finally:
        layer.compute_dtype = torch.float32
    with pytest.raises(AssertionError, match="not quantized"):
        checks.check_quantized_compute(checks.reference_npt_model())


# ----------------------------------------------------------------------------- the model
def test_nan_adapter_fails_finite_logits():
    model = checks.npt_model()
    with torch.no_grad():
        npt.npt_layers(model)[3].adapter.A_proj.weight[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite logits"):
        checks.check_finite_logits(model)


# ----------------------------------------------------------------------------- the trainer's fixes
def naive_step(model, optimizer, scheduler, micro_batches, **kwargs):
    """One optimizer step without NaN skipping: what the seed's trainer did."""
    from pretrain_npt_safe import compute_loss

    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in micro_batches:
        loss = compute_loss(model, micro)["loss"] / len(micro_batches)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(npt.get_adapter_params(model), 0.5)
    optimizer.step()
    scheduler.step()
    return {"loss": total, "mse": total, "reg": 0.0, "grad_norm": grad_norm.item(), "skipped": 0}


def test_step_without_nan_skipping_fails():
    with pytest.raises(AssertionError, match="skipped = 0"):
        checks.check_nan_batch_skipped(naive_step)


def test_step_that_does_not_train_fails():
    from pretrain_npt_safe import compute_loss

    def no_step(model, optimizer, scheduler, micro_batches, **kwargs):
        return {"loss": 1.0, "mse": 1.0, "reg": 0.0, "grad_norm": 0.0, "skipped": 0}

    with pytest.raises(AssertionError, match="changed no adapter"):
        checks.check_training_step(no_step, compute_loss)


def test_unfrozen_base_fails_training_step():
    model = checks.npt_model(seed=1)
    model.model.layers[5].layer.mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="base parameters"):
        checks.check_training_step(model=model)
