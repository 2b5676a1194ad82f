"""pretrain_npt_safe's Trainer run step by step without the CLI, the checks before it, and its typed state on disk."""
import dataclasses
import json

import click
import pytest

import npt
import pretrain_npt_safe as trainer
from npt_tools.arguments import TrainArgs
from npt_tools.checkpoints import TrainerState
from npt_tools.cli import UserError
from npt_tools.plan import make_plan

ONE_TORCH_THREAD = True


def tiny_args(tiny_llama_dir, out, **overrides):
    fast = dict(max_steps=3, max_length=32, batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-5,
                warmup_steps=0, log_steps=1, save_steps=2, seed=3)
    return TrainArgs(model_name=str(tiny_llama_dir), output_dir=str(out), **{**fast, **overrides})


@pytest.mark.integration
def test_phases_run_without_the_cli(tiny_llama_dir, tmp_path):
    args = tiny_args(tiny_llama_dir, tmp_path / "out")
    plan = make_plan(args)
    assert plan.layer_indices == [0, 1] and plan.resume is None and not (tmp_path / "out").exists()
    run = trainer.Trainer(args, plan).setup()
    assert run.procs.world == 1 and run.procs.main and run.procs.reduce is None and run.total_steps == 3
    assert [layer.layer_idx for layer in npt.npt_layers(run.model)] == [0, 1]
    state = run.state
    assert state == TrainerState(run_id=state.run_id) and len(state.run_id) == 12
    line = run.closed_form_start()  # the default exact target's start
    assert line.startswith("closed-form start") and state.closed_form_start["tokens"] > 64
    assert run.closed_form_start() is None  # done once, recorded in the state
    assert run.train() == 0 and state.step == 3 and state.tokens > 0
    run.cleanup(0)
    saved = json.loads((tmp_path / "out" / "checkpoint-final" / "trainer_state.json").read_text())
    assert TrainerState.from_dict(saved) == state  # the state round-trips through trainer_state.json
    assert saved["args"]["max_steps"] == 3 and saved["world_size"] == 1


@pytest.mark.integration
def test_resume_plan_reads_the_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert trainer.train(tiny_args(tiny_llama_dir, out)) == 0
    plan = make_plan(tiny_args(tiny_llama_dir, tmp_path / "again", resume_from_checkpoint=str(out / "checkpoint-2")))
    assert plan.resume.state.step == 2  # the default: exact at d_model (64), capped from 256
    assert plan.resume.npt_config == npt.NPTConfig(rank=64, modulation_target="exact")
    assert plan.resume.state.closed_form_start["method"] == "principal directions"
    with pytest.raises(UserError, match="rank is 64 there, 8 here"):
        make_plan(tiny_args(tiny_llama_dir, tmp_path / "again", adapter_rank=8,
                            resume_from_checkpoint=str(out / "checkpoint-2")))


@pytest.mark.parametrize("bad, message", [({"learning_rate": 0.0}, "learning_rate"),
                                          ({"inject_nan_steps": "x"}, "inject_nan_steps"),
                                          ({"npt_layers": "7"}, "npt_layers")])
def test_make_plan_is_where_bad_flags_are_refused(tiny_llama_dir, tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        make_plan(tiny_args(tiny_llama_dir, tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, message", [({"learning_rate": 0.0}, "learning_rate"),
                                          ({"inject_nan_steps": "x"}, "inject_nan_steps"),
                                          ({"seed": -1}, "seed"), ({"run_name": "../x"}, "run_name")])
def test_cheap_checks_read_no_file(tmp_path, bad, message):
    """TrainArgs.check refuses what needs no file: a model that does not exist is not looked at."""
    with pytest.raises(UserError, match=message):
        TrainArgs(model_name=str(tmp_path / "no-such-model"), **bad).check()
    assert TrainArgs(model_name=str(tmp_path / "no-such-model")).check().model_name.endswith("no-such-model")


def flag_value(field):
    """(command-line words, the value TrainArgs should then hold) for one field, never its default."""
    kind = field.metadata.get("type")
    if field.type == "bool":
        return [], True
    if isinstance(kind, click.Choice):
        value = next(c for c in kind.choices if c != field.default)
        return [value], value
    if field.type.startswith("int"):
        value = (field.default or 0) + 3
        return [str(value)], value
    if field.type.startswith("float"):
        value = field.default + 0.25
        return [repr(value)], value
    value = f"{field.name}-value"
    return [value], value


def test_every_argument_is_a_flag(monkeypatch):
    """Every TrainArgs field is a flag that reaches its own field with its type (main's TrainArgs, every field
    off its default at once); --help lists them all but the hidden test hook."""
    from click.testing import CliRunner

    fields = dataclasses.fields(TrainArgs)
    argv, expected = [], {}
    for f in fields:
        words, expected[f.name] = flag_value(f)
        argv += [f"--{f.name}", *words]
    assert all(expected[f.name] != f.default for f in fields)
    received = []
    monkeypatch.setattr(trainer, "train", lambda args: received.append(args) or 0)
    result = CliRunner().invoke(trainer.main, argv, catch_exceptions=False)
    assert result.exit_code == 0 and len(received) == 1, result.output
    got = dataclasses.asdict(received[0])
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}

    text = CliRunner().invoke(trainer.main, ["--help"]).output
    hidden = {"inject_nan_steps"}
    assert all(f"--{f.name}" in text for f in fields if f.name not in hidden)
    assert "--inject_nan_steps" not in text
