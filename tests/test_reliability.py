"""Nothing bad is ever called good, in npt: a step that blows the weights up is undone; an exactly zero hidden state keeps a
clean batch finite; the seed's adapter_config dict converts (tiny random Llama, no files)."""
import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import npt
from npt_tools import objective
from npt_tools.step import optimizer_step, undo_step, weights_finite
from helpers import assert_same

ONE_TORCH_THREAD = True  # tiny tensors (conftest)


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def batch(seed=0, n=8):
    ids = torch.randint(1, 97, (2, n), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def state(model, opt, sched):
    return ([p.detach().clone() for p in npt.get_adapter_params(model)],
            {k: {n: v.clone() for n, v in st.items()} for k, st in opt.state_dict()["state"].items()},
            copy.deepcopy(sched.state_dict()))


@pytest.mark.parametrize("case", ["lr 1e30", "max_grad_norm nan", "first step"])
def test_step_that_blows_the_weights_up_is_undone(base, case):
    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(rank=4))
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if case != "first step":  # optimizer state exists before the bad step
        assert optimizer_step(model, opt, sched, [batch(1)]).stepped
    before = state(model, opt, sched)
    clip = float("nan") if case == "max_grad_norm nan" else 0.5
    for g in opt.param_groups:
        g["lr"] = 1e30 if case != "max_grad_norm nan" else 1e-3
    out = optimizer_step(model, opt, sched, [batch(2), batch(3)], max_grad_norm=clip)
    assert not out.stepped and out.skipped == 2 and out.bad == [0, 1]
    assert set(out.reasons.values()) == {"non-finite weights after the step"}
    assert_same(before, state(model, opt, sched))
    assert weights_finite(npt.get_adapter_params(model), opt)


def test_undo_step_restores_adapters_optimizer_and_schedule(base):
    """A step found bad only afterwards (finite weights, non-finite forwards) can be undone exactly."""
    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(rank=4))
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10)  # warmup: the rate moves each step
    assert optimizer_step(model, opt, sched, [batch(1)]).stepped
    before, lr = state(model, opt, sched), [g["lr"] for g in opt.param_groups]
    out = optimizer_step(model, opt, sched, [batch(2)])
    assert out.stepped and [g["lr"] for g in opt.param_groups] != lr
    undo_step(model, opt, sched, out)
    assert_same(before, state(model, opt, sched))
    assert [g["lr"] for g in opt.param_groups] == lr
    with pytest.raises(ValueError, match="no previous state"):
        undo_step(model, opt, sched, out)  # once only


def test_weights_finite_sees_nan_in_optimizer_state(base):
    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(rank=4))
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    optimizer_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), [batch(1)])
    params = npt.get_adapter_params(model)
    assert weights_finite(params, opt)
    opt.state[params[-1]]["exp_avg_sq"][0] = float("nan")
    assert not weights_finite(params, opt) and weights_finite(params)


@pytest.mark.parametrize("loss", ["cosine", "update"])
@pytest.mark.parametrize("objective", ["layerwise", "end_to_end"])
def test_zero_hidden_state_keeps_a_clean_batch_finite(base, loss, objective):
    """A token whose embedding row is zero has a zero input and output at layer 0 (no biases)."""
    zeroed = copy.deepcopy(base)
    with torch.no_grad():
        zeroed.get_input_embeddings().weight[5] = 0
    model = npt.convert_to_npt(zeroed, npt.NPTConfig(rank=4))
    b = batch(4)
    b["input_ids"][0, 3] = 5
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    out = optimizer_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), [b],
                             objective=objective, loss=loss)
    assert out.skipped == 0 and out.stepped, out.reasons


@pytest.mark.parametrize("fn", ["normalized_mse", "update_error"])
def test_losses_of_zero_states_have_finite_gradients(fn):
    student = torch.randn(1, 3, 8)
    student[0, 1] = 0
    student.requires_grad_(True)
    teacher = torch.randn(1, 3, 8)
    teacher[0, 1] = 0
    args = (student, teacher) if fn == "normalized_mse" else (student, teacher, torch.zeros(1, 3, 8))
    value = getattr(objective, fn)(*args)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def test_seed_adapter_config_dict_converts(base):
    """The seed's call: convert_llama_to_npt(model, {'r': ..., 'd_model': ..., 'd_ffn': ..., 'compute_dtype': ...})."""
    seed = {"r": 8, "modulation_type": "additive", "consolidation_alpha": 0.5, "d_model": 64, "d_ffn": 128,
            "compute_dtype": torch.float32}
    model = npt.convert_llama_to_npt(copy.deepcopy(base), seed)
    assert model.npt_config == npt.NPTConfig(rank=8, modulation="additive")
    assert model.npt_config.consolidation_alpha == 0.5
    assert npt.npt_layers(model)[0].adapter.A_proj.weight.shape == (8, 64)
    plain = npt.convert_to_npt(copy.deepcopy(base), {"r": 4})
    assert plain.npt_config == npt.NPTConfig(rank=4)


@pytest.mark.parametrize("bad, message", [({"r": 8, "d_model": 576}, "d_model=576 but the model's d_model is 64"),
                                          ({"r": 8, "d_ffn": 1536}, "d_ffn=1536 but the model's d_ffn is 128"),
                                          ({"r": 8, "dropout": 0.1}, "unknown adapter config key(s) 'dropout'"),
                                          ({"modulation_type": "tanh"}, "modulation_type 'tanh' not understood"),
                                          ({"r": 8, "rank": 4}, "gives both r=8 and rank=4"),
                                          ({"modulation_type": "add", "modulation": "both"},
                                           "gives both modulation_type='add' and modulation='both'")])
def test_seed_adapter_config_mismatch_is_a_clear_error(base, bad, message):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError) as e:
        npt.convert_to_npt(model, bad)
    assert message in str(e.value) and not npt.npt_layers(model)


# ----------------------------------------------------------------------------- values entering the weights
def trained(base, **config):
    """A converted copy whose adapters have a non-zero modulation (B_mult starts at 0)."""
    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(rank=4, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in npt.get_adapter_params(model):
            p.normal_(0, 0.05)
    return model


def base_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapter." not in k}


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "1.0", True])
def test_consolidate_refuses_a_non_finite_alpha_and_changes_nothing(base, alpha):
    model = trained(base, modulation_target="gate+down")
    before = base_weights(model)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        npt.consolidate(model, batch(0)["input_ids"], alpha=alpha)
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"


@pytest.mark.parametrize("ids, kwargs, message", [
    (torch.randint(1, 97, (1, 6)), {"token_index": 6}, "token_index 6 is outside the 6 real tokens"),
    (torch.randint(1, 97, (1, 6)), {"token_index": -7}, "token_index -7 is outside the 6 real tokens"),
    (torch.randint(1, 97, (1, 6)), {"token_index": 3, "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0]])},
     "outside the 3 real tokens"),
    (torch.randint(1, 97, (1, 6)), {"attention_mask": torch.zeros(1, 6, dtype=torch.long)},
     "attention_mask marks no real token in sequence 0"),
    (torch.randint(1, 97, (1, 6)), {"attention_mask": torch.ones(1, 5, dtype=torch.long)}, "attention_mask must"),
    (torch.zeros(1, 0, dtype=torch.long), {}, "non-empty 2-D tensor"),
    (torch.randint(1, 97, (6,)), {}, "non-empty 2-D tensor (batch, tokens), got (6,)"),
    ([[1, 2, 3]], {}, "non-empty 2-D tensor"),
])
def test_consolidate_refuses_bad_indices_and_inputs_and_changes_nothing(base, ids, kwargs, message):
    model = trained(base)
    before = base_weights(model)
    with pytest.raises(ValueError) as e:
        npt.consolidate(model, ids, **kwargs)
    assert message in str(e.value)
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("target, dtype, alpha, overflows", [
    ("exact", torch.float16, 1e6, "mlp.down_proj.weight in torch.float16"),
    ("down", torch.float16, 1e9, "mlp.down_proj.weight in torch.float16"),
    ("gate+down", torch.float16, 1e9, "mlp.down_proj.weight in torch.float16"),
    ("exact", torch.float32, 1e30, "the patched model's logits"),  # finite weights of ~1e30: the logits overflow
])
def test_consolidate_refuses_an_overflowing_alpha_and_changes_nothing(base, target, dtype, alpha, overflows):
    model = trained(copy.deepcopy(base).to(dtype), modulation_target=target)
    ids = batch(0)["input_ids"]
    before = base_weights(model)
    with pytest.raises(ValueError, match=re.escape(f"alpha {alpha:g} overflows ") + ".*" + re.escape(overflows)) as e:
        npt.consolidate(model, ids, alpha=alpha)
    assert "layers.0." in str(e.value) or "logits" in overflows  # the first layer's patch is refused: none written
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    with torch.no_grad(), npt.npt_disabled(model):
        assert torch.isfinite(model(ids).logits).all()


def test_consolidate_writes_a_large_alpha_that_stays_finite(base):
    """The refusal is about overflow, not size: alpha 1e6 on the gate target stays finite in fp16 and is written."""
    model = trained(copy.deepcopy(base).half(), modulation_target="gate")
    before = base_weights(model)
    updates = npt.consolidate(model, batch(0)["input_ids"], alpha=1e6)
    for layer in npt.npt_layers(model):
        key = f"model.layers.{layer.layer_idx}.layer.mlp.gate_proj.weight"
        want = (before[key].double() + updates[layer.layer_idx].double()).half()  # float64 reference, then fp16
        assert torch.equal(base_weights(model)[key], want)


def test_consolidate_refuses_non_finite_adapters(base):
    model = trained(base)
    with torch.no_grad():
        npt.get_adapter_params(model)[0][0, 0] = float("nan")
    before = base_weights(model)
    with pytest.raises(ValueError, match="adapters are not finite"):
        npt.consolidate(model, batch(0)["input_ids"])
    assert all(torch.equal(v, base_weights(model)[k]) for k, v in before.items())


def test_consolidate_default_is_the_last_real_token_under_right_padding(base):
    """Right padding: the default token is the last real one, as for the unpadded sequence."""
    ids = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    plain, pad = trained(base, modulation_target="gate+down"), trained(base, modulation_target="gate+down")
    want = npt.consolidate(plain, ids)
    got = npt.consolidate(pad, padded, attention_mask=mask)
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    last_pad = npt.consolidate(trained(base, modulation_target="gate+down"), padded, token_index=7)  # the pad itself
    assert not all(torch.allclose(want[k], last_pad[k], atol=1e-6) for k in want)


# ----------------------------------------------------------------------------- malformed npt_config.json
@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(add_scale="big"), "add_scale"),
    (lambda c: c.update(add_scale=float("nan")), "add_scale"),
    (lambda c: c.update(num_layers="2"), "num_layers"),
    (lambda c: c.update(rank=2.5), "rank"),
    (lambda c: c.update(layers={"a": 1}), "layers"),
    (lambda c: c.update(modulation_target=7), "modulation_target"),
    (lambda c: [1, 2], "JSON object"),
    (lambda c: "a string", "JSON object"),
])
def test_load_adapters_names_the_malformed_field(base, tmp_path, edit, field):
    import json

    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(rank=4))
    npt.save_adapters(model, tmp_path)
    config = json.loads((tmp_path / "npt_config.json").read_text())
    changed = edit(config)
    (tmp_path / "npt_config.json").write_text(json.dumps(config if changed is None else changed))
    with pytest.raises(ValueError) as e:
        npt.load_adapters(copy.deepcopy(base), tmp_path)
    assert field in str(e.value) and "npt_config.json" in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- a full disk while saving
@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])  # safetensors wraps the OS error in its own
def test_full_disk_while_saving_leaves_the_previous_checkpoint_intact(base, tmp_path, monkeypatch, error):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from npt_tools.checkpoints import DiskFull, TrainerState, save_checkpoint

    model = trained(base)
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainerState(step=1, run_id="r1")
    first = save_checkpoint(tmp_path, "checkpoint-best", model, opt, sched, state)
    saved = {f.name: f.read_bytes() for f in first.iterdir()}
    real_save = safetensors.torch.save_file

    def full(tensors, filename, *a, **k):
        if filename.endswith("optimizer.safetensors"):
            raise (OSError(errno.ENOSPC, "No space left on device", filename) if error == "OSError" else
                   SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with torch.no_grad():
        npt.get_adapter_params(model)[0].add_(1.0)
    with pytest.raises(DiskFull) as e:
        save_checkpoint(tmp_path, "checkpoint-best", model, opt, sched, TrainerState(step=2, run_id="r1"))
    assert str(tmp_path / "checkpoint-best") in str(e.value) and "MB" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best"]  # no half-written folder
    assert {f.name: f.read_bytes() for f in first.iterdir()} == saved
    npt.load_adapters(copy.deepcopy(base), first)


def test_latest_and_the_full_disk_hint_see_checkpoint_best(base, tmp_path):
    """After a full disk checkpoint-best may be all a run kept: `latest` resumes it and the message names it; a
    run that kept none is told to start again."""
    from npt_tools.checkpoints import TrainerState, latest_checkpoint, resume_hint, save_checkpoint

    model = trained(base)
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert "no checkpoint of this run was written" in resume_hint(tmp_path, "r1")
    assert "--overwrite_output_dir" in resume_hint(tmp_path, "r1")
    save_checkpoint(tmp_path, "checkpoint-1", model, opt, sched, TrainerState(step=1, run_id="r1"))
    best = save_checkpoint(tmp_path, "checkpoint-best", model, opt, sched, TrainerState(step=2, run_id="r1"))
    assert latest_checkpoint(tmp_path) == best
    assert f"resume from {best} (step 2" in resume_hint(tmp_path, "r1")
    assert "no checkpoint of this run" in resume_hint(tmp_path, "another run")
    numbered = save_checkpoint(tmp_path, "checkpoint-2", model, opt, sched, TrainerState(step=2, run_id="r1"))
    assert latest_checkpoint(tmp_path) == numbered  # a tie: the name that says the step


def test_sigterm_unwinds_a_command_as_ctrl_c_does():
    """The handler the scripts install: SIGTERM raises where the code is, its `finally` runs, one line, exit 1."""
    import os
    import signal
    import time

    from click.testing import CliRunner

    from npt_tools.cli import command

    cleaned = []

    @command()
    def terminated():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            cleaned.append("not interrupted")
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(terminated, [], catch_exceptions=False)
    assert result.exit_code == 1 and cleaned == [True]
    assert [line for line in result.stderr.splitlines() if line.strip()] == ["error: aborted (SIGTERM)"]
    assert signal.getsignal(signal.SIGTERM) is before  # restored after the command
