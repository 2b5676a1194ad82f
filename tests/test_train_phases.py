"""pretrain_npt_safe's Trainer run step by step without the CLI, the checks before it, and its typed state on disk."""
import dataclasses
import json

import click
import pytest
import torch

import npt
import pretrain_npt_safe as trainer
from npt_tools.arguments import EXACT_LR_SCALE, TrainArgs
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
def test_exact_learning_rate_follows_the_start_unless_given(tiny_llama_dir, tmp_path):
    """--learning_rate not given on the exact target: EXACT_LR_SCALE x the share the start misses, in the optimizer
    and in the saved arguments (a resume continues at it); given, it is honoured."""
    fast = {k: v for k, v in dataclasses.asdict(tiny_args(tiny_llama_dir, tmp_path)).items() if k != "learning_rate"}
    for given, out in ((None, tmp_path / "auto"), (5e-5, tmp_path / "given")):
        args = TrainArgs(**{**fast, "output_dir": str(out), "adapter_rank": 8, "learning_rate": given})
        run = trainer.Trainer(args, make_plan(args)).setup()
        line = run.closed_form_start()
        kept = run.state.closed_form_start["kept"]
        assert 0 < kept < 1
        expected = given or EXACT_LR_SCALE * (1 - kept)
        assert args.learning_rate == pytest.approx(expected, rel=1e-12) and ("learning rate" in line) == (given is None)
        assert [g["initial_lr"] for g in run.optimizer.param_groups] == [args.learning_rate]
        assert run.train() == 0
        run.cleanup(0)
        saved = json.loads((out / "checkpoint-final" / "trainer_state.json").read_text())
        assert saved["args"]["learning_rate"] == args.learning_rate


@pytest.mark.integration
def test_init_gradient_batches_take_the_metric_from_the_first_batches(tiny_llama_dir, tmp_path):
    """--init_gradient_batches k: the covariance from every --init_batches batch, the gradients from the first k
    (recorded and said); not given (32, more than the 3 batches here), from all of them."""
    for k, out in ((None, tmp_path / "all"), (1, tmp_path / "one")):
        args = tiny_args(tiny_llama_dir, out, init_batches=3, init_gradient_batches=k)
        run = trainer.Trainer(args, make_plan(args)).setup()
        line = run.closed_form_start()
        start = run.state.closed_form_start
        assert start["tokens"] == 3 * 2 * 32  # 3 batches of 2 full windows of 32 tokens
        assert start["gradient_tokens"] == (start["tokens"] if k is None else 2 * 32)
        assert ("gradients at 64 of them" in line) == (k == 1)


@pytest.mark.integration
def test_resume_plan_reads_the_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert trainer.train(tiny_args(tiny_llama_dir, out)) == 0
    plan = make_plan(tiny_args(tiny_llama_dir, tmp_path / "again", resume_from_checkpoint=str(out / "checkpoint-2")))
    assert plan.resume.state.step == 2  # the default: exact at d_model (64), capped from 256
    assert plan.resume.npt_config == npt.NPTConfig(rank=64, modulation_target="exact")
    assert plan.resume.state.closed_form_start["method"] == "Fisher-weighted principal directions"
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
        value = (field.default or 0.0) + 0.25
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


# ----------------------------------------------------------------------------- per-target defaults
def cli_args(monkeypatch, *words):
    """The TrainArgs main builds from these command-line words (nothing runs)."""
    from click.testing import CliRunner

    received = []
    monkeypatch.setattr(trainer, "train", lambda args: received.append(args) or 0)
    result = CliRunner().invoke(trainer.main, [str(w) for w in words], catch_exceptions=False)
    assert result.exit_code == 0 and len(received) == 1, result.output
    return received[0]


def test_down_alone_trains_as_the_old_explicit_layerwise_command(monkeypatch, tiny_llama_dir, tmp_path):
    """`--modulation_target down` resolves to the arguments and plan of `--objective layerwise --learning_rate 3e-3`
    (what the down target needed spelled out before its defaults)."""
    common = ["--model_name", tiny_llama_dir, "--output_dir", tmp_path / "out", "--modulation_target", "down"]
    alone = cli_args(monkeypatch, *common)
    spelled = cli_args(monkeypatch, *common, "--objective", "layerwise", "--learning_rate", "3e-3")
    assert (alone.objective, alone.learning_rate) == (None, None)  # "per target" until the plan resolves them
    plans = [dataclasses.replace(make_plan(a), run_id="") for a in (alone, spelled)]
    assert alone == spelled and plans[0] == plans[1] and alone.saved() == spelled.saved()
    assert (alone.objective, alone.learning_rate, alone.loss, alone.kernel) == ("layerwise", 3e-3, "update", "auto")


@pytest.mark.parametrize("target", npt.TARGETS)
def test_every_target_resolves_its_own_defaults(monkeypatch, tiny_llama_dir, tmp_path, target):
    from npt_tools.arguments import TARGET_DEFAULTS

    args = cli_args(monkeypatch, "--model_name", tiny_llama_dir, "--output_dir", tmp_path, "--modulation_target",
                    target)
    make_plan(args)
    assert {k: getattr(args, k) for k in TARGET_DEFAULTS[target]} == TARGET_DEFAULTS[target]
    assert args.objective == ("kl" if target == "exact" else "layerwise")
    assert args.saved()["learning_rate"] == args.learning_rate > 0  # trainer_state.json records the value


IGNORED = [  # (flag words, target), where the flag does nothing
    (["--kernel", "torch"], "exact"), (["--kernel", "auto"], "exact"), (["--safe_mode"], "down"),
    (["--safe_mode"], "exact"), (["--regularization_lambda", "0.05"], "exact"), (["--loss", "cosine"], "exact"),
    (["--down_rank", "2"], "gate"), (["--down_rank", "2"], "exact"), (["--init_batches", "3"], "down"),
    (["--exact_start", "pca"], "gate+down"), (["--init_gradient_batches", "2"], "gate"),
]
USED = [  # the same flags where they matter
    (["--kernel", "torch"], "gate"), (["--safe_mode"], "gate+down"), (["--regularization_lambda", "0.05"], "down"),
    (["--loss", "cosine"], "gate"), (["--down_rank", "2"], "down"), (["--init_batches", "3"], "exact"),
    (["--exact_start", "pca"], "exact"), (["--init_gradient_batches", "2"], "exact"),
]


def plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, *words) -> list[str]:
    import warnings

    args = cli_args(monkeypatch, "--model_name", tiny_llama_dir, "--output_dir", tmp_path / "out", *words)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_plan(args)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("words, target", IGNORED, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_a_flag_set_where_it_does_nothing_warns_once(monkeypatch, tiny_llama_dir, tmp_path, words, target):
    caught = plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, *words, "--modulation_target", target)
    assert len(caught) == 1 and "\n" not in caught[0], caught
    assert caught[0].startswith(" ".join(words) + " does nothing ") and caught[0].endswith("ignored"), caught[0]
    assert ("with --objective kl" if words[0] == "--loss" else f"with --modulation_target {target} (") in caught[0]


@pytest.mark.parametrize("words, target", USED, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_a_flag_set_where_it_matters_does_not_warn(monkeypatch, tiny_llama_dir, tmp_path, words, target):
    assert plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, *words, "--modulation_target", target) == []


def test_loss_warns_under_kl_whatever_the_target(monkeypatch, tiny_llama_dir, tmp_path):
    caught = plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, "--modulation_target", "gate", "--objective", "kl",
                           "--loss", "cosine")
    assert len(caught) == 1 and caught[0].startswith("--loss cosine does nothing with --objective kl ("), caught


@pytest.mark.parametrize("target", [None, *npt.TARGETS])
def test_no_flags_no_warning(monkeypatch, tiny_llama_dir, tmp_path, target):
    words = [] if target is None else ["--modulation_target", target]
    assert plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, *words) == []


def test_trainargs_built_directly_warns_as_the_cli_does(tiny_llama_dir, tmp_path):
    """None is 'not given' for TrainArgs built in code too; resolving again changes nothing and names the same flag
    (what was given is recorded by the first resolve, not read from the values it filled)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = make_plan(tiny_args(tiny_llama_dir, tmp_path / "a"))
        args = tiny_args(tiny_llama_dir, tmp_path / "b", kernel="torch")
        make_plan(args)
        resolved = dataclasses.asdict(args)
        assert args.resolve() == [str(caught[0].message)] and dataclasses.asdict(args) == resolved
    assert quiet.npt_config.exact and [str(w.message).split()[:2] for w in caught] == [["--kernel", "torch"]]


# ----------------------------------------------------------------------------- resuming under new defaults
def older_checkpoint(tiny_llama_dir, out, start=None, **saved_args):
    """An exact-target checkpoint whose trainer_state.json args hold `saved_args` over the resolved defaults (and
    its closed_form_start `start`)."""
    from transformers import AutoModelForCausalLM

    from npt_tools.checkpoints import save_checkpoint

    args = tiny_args(tiny_llama_dir, out)
    args.resolve()
    model = npt.convert_to_npt(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                               npt.NPTConfig(rank=64, modulation_target="exact"))
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(out, "checkpoint-1", model, opt, sched,
                           TrainerState(step=1, run_id="older", closed_form_start=start),
                           {"args": {**args.saved(), **saved_args}})


def test_resume_keeps_the_checkpoints_values_of_flags_not_given(tiny_llama_dir, tmp_path):
    """A run saved under the old global default (learning_rate 1e-4) resumes without flags; the per-target flags
    take its values. Given and different, they are refused as before."""
    ckpt = older_checkpoint(tiny_llama_dir, tmp_path / "run", learning_rate=1e-4, objective="end_to_end")
    args = tiny_args(tiny_llama_dir, tmp_path / "run", resume_from_checkpoint=str(ckpt))
    args.learning_rate = None  # tiny_args gives one; this resume gives none
    plan = make_plan(args)
    assert plan.resume.state.step == 1 and (args.learning_rate, args.objective) == (1e-4, "end_to_end")
    for given, line in (({"learning_rate": 1e-5}, "--learning_rate 0.0001 -> 1e-05"),
                        ({"objective": "kl"}, "--objective 'end_to_end' -> 'kl'")):
        again = tiny_args(tiny_llama_dir, tmp_path / "run", resume_from_checkpoint=str(ckpt), **given)
        again.learning_rate = given.get("learning_rate")
        with pytest.raises(UserError, match=f"changed flags \\({line}\\)"):
            make_plan(again)


def test_resume_after_the_closed_form_start_keeps_its_flags(tiny_llama_dir, tmp_path):
    """The start ran under --exact_start pca: a resume without the start's flags takes the run's values (its args
    then say what its closed_form_start did); given and different, they are refused (the start will not run again)."""
    start = {"method": "principal directions", "windows": 4, "tokens": 128, "gradient_tokens": 0, "kept": 1.0}
    ckpt = older_checkpoint(tiny_llama_dir, tmp_path / "run", start=start, exact_start="pca", init_batches=2)
    args = tiny_args(tiny_llama_dir, tmp_path / "run", resume_from_checkpoint=str(ckpt))
    make_plan(args)
    assert (args.exact_start, args.init_batches) == ("pca", 2)
    for given, line in (({"exact_start": "fisher"}, "--exact_start 'pca' -> 'fisher'"),
                        ({"init_batches": 64}, "--init_batches 2 -> 64")):
        with pytest.raises(UserError, match=f"changed flags \\({line}\\)"):
            make_plan(tiny_args(tiny_llama_dir, tmp_path / "run", resume_from_checkpoint=str(ckpt), **given))


def test_resume_before_the_closed_form_start_may_choose_it(tiny_llama_dir, tmp_path):
    ckpt = older_checkpoint(tiny_llama_dir, tmp_path / "run", exact_start="pca")  # no closed_form_start recorded
    args = tiny_args(tiny_llama_dir, tmp_path / "run", resume_from_checkpoint=str(ckpt), exact_start="fisher")
    make_plan(args)
    assert args.exact_start == "fisher"


def test_resume_from_a_file_says_it_is_a_file(tiny_llama_dir, tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"{}")
    with pytest.raises(UserError, match="is a file: give a checkpoint directory") as e:
        make_plan(tiny_args(tiny_llama_dir, tmp_path / "out",
                            resume_from_checkpoint=str(tmp_path / "adapter_model.safetensors")))
    assert "not found" not in str(e.value)


@pytest.mark.parametrize("free, refused", [(200_000, True), (300_000, False)])
def test_the_output_disk_must_hold_one_checkpoint(monkeypatch, tiny_llama_dir, tmp_path, free, refused):
    """The exact target's checkpoint of the tiny Llama needs about 0.26 MB (12 bytes per adapter parameter +
    64 kB): 0.20 MB is refused before any work, 0.30 MB holds one and warns that it cannot hold the run's three."""
    import shutil

    total = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: total._replace(free=free))
    args = tiny_args(tiny_llama_dir, tmp_path / "out")  # save_steps 2 of 3 steps: checkpoint-2, -best, -final
    if refused:
        with pytest.raises(UserError, match="0.20 MB free on its disk, and one checkpoint of this run needs about "
                                            "0.26 MB"):
            make_plan(args)
        return
    with pytest.warns(UserWarning, match="has room for 1 of the 3 checkpoints"):
        make_plan(args)


@pytest.mark.parametrize("value", ["fast", None, float("nan"), 0.0, -1e-3, True])
def test_resume_refuses_a_checkpoints_value_the_flag_could_not_take(tiny_llama_dir, tmp_path, value):
    ckpt = older_checkpoint(tiny_llama_dir, tmp_path / "run", learning_rate=value)
    args = tiny_args(tiny_llama_dir, tmp_path / "run", resume_from_checkpoint=str(ckpt))
    args.learning_rate = None
    with pytest.raises(UserError, match="learning_rate") as e:
        make_plan(args)
    assert "\n" not in str(e.value)


def test_kernel_triton_without_a_gpu_is_refused_only_where_the_kernel_runs(monkeypatch, tiny_llama_dir, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="--kernel triton needs a CUDA GPU"):
        plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, "--kernel", "triton", "--modulation_target", "gate")
    caught = plan_warnings(monkeypatch, tiny_llama_dir, tmp_path, "--kernel", "triton")  # exact: never called
    assert len(caught) == 1 and caught[0].startswith("--kernel triton does nothing"), caught
