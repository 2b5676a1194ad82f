"""Hostile input as a user meets it, through real processes on the tiny random Llama: a model's own code never
runs, a diverging run keeps its last finite adapters, a second run in the same --output_dir loses nothing,
a cut-off metrics.jsonl line does not stop a resume, debug_nan --json to an unwritable path is exit 2."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import debug_nan
import npt
import test_fixed_npt
from helpers import FAST, GATE, ROOT, SCRIPT, adapters, assert_bitwise, assert_loadable, ok, rows, run, run_in_terminal


def remote_code_model(tmp_path, tiny_llama_dir):
    """(a model folder only its own evil.py can load, the file that code creates when it runs)."""
    model, marker = tmp_path / "remote-model", tmp_path / "remote-code-ran"
    shutil.copytree(tiny_llama_dir, model)
    (model / "evil.py").write_text(f"""import pathlib
pathlib.Path({str(marker)!r}).write_text('ran')
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = 'evil-llama'
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
""")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil-llama"  # unknown to transformers: only the folder's code can load it
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


@pytest.mark.integration
def test_remote_code_never_runs_even_when_y_is_typed(tmp_path, tiny_llama_dir):
    model, marker = remote_code_model(tmp_path, tiny_llama_dir)
    code, output = run_in_terminal(["--model_name", model, "--output_dir", tmp_path / "out", "--max_steps", 1],
                                   b"y\n", {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONWARNINGS": "ignore"})
    lines = [line for line in output.splitlines() if line.strip() not in ("", "y")]  # less the echo of "y"
    assert not marker.exists(), "the model folder's code ran"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--trust_remote_code" in lines[0], output
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
@pytest.mark.parametrize("lr", ["1e30", "1e10"])
@pytest.mark.parametrize("warmup", [0, 2])
def test_diverging_learning_rate_keeps_the_last_finite_adapters(tmp_path, tiny_llama_dir, warmup, lr):
    """lr 1e30: every step with a non-zero rate blows the adapters up and is undone at once. lr 1e10: the
    step leaves finite adapters (~1e10) whose every forward is non-finite; found at the abort, it is undone
    then, and its checkpoint removed. With warmup 2 the first step runs at rate 0 (finite), so checkpoint-final
    must equal checkpoint-1, else the initial adapters."""
    out = tmp_path / "out"
    proc = run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--learning_rate", lr,
               "--warmup_steps", warmup, "--gradient_accumulation_steps", 1, "--max_consecutive_nan", 2,
               "--save_steps", 1, "--max_steps", 6, "--eval_steps", 0, *GATE)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    good = warmup // 2  # steps that stayed finite
    assert f"holds the adapters of step {good}" in proc.stderr
    if lr == "1e30":
        assert "non-finite weights after the step" in proc.stderr
    else:
        assert f"step {good + 1} left finite adapters whose forward is non-finite and was undone" in proc.stderr
    assert not (out / f"checkpoint-{good + 1}").exists()
    final = adapters(out / "checkpoint-final")
    assert all(torch.isfinite(v).all() for v in final.values())
    if good:
        assert_bitwise(out / "checkpoint-final", out / f"checkpoint-{good}")
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        torch.manual_seed(3)  # FAST's --seed: the trainer's adapter init
        npt.convert_to_npt(model, npt.NPTConfig())
        init = {f"layers.{la.layer_idx}.{k}": v for la in npt.npt_layers(model) for k, v in la.adapter.state_dict().items()}
        assert final.keys() == init.keys() and all(torch.equal(final[k], init[k]) for k in init)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_llama_dir):
    """A finished 2-step run with checkpoint-1 and checkpoint-2, and a user's own .old-* / .tmp-* folders."""
    out = tmp_path_factory.mktemp("first") / "out"
    out.mkdir()
    (out / ".old-mine").mkdir()
    (out / ".tmp-mine").mkdir()
    ok(run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--max_steps", 2, "--save_steps", 1,
           "--eval_steps", 0))  # a user's folders do not make a directory another run's
    return out


def run_id(ckpt) -> str:
    return json.loads((ckpt / "trainer_state.json").read_text())["run_id"]


@pytest.mark.integration
def test_second_run_in_the_same_output_dir_loses_nothing(tmp_path, tiny_llama_dir, first_run):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    refused = run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--max_steps", 1)
    assert refused.returncode == 2 and "--overwrite_output_dir" in refused.stderr
    ok(run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--max_steps", 1, "--save_steps", 1,
           "--save_total_limit", 1, "--eval_steps", 0, "--overwrite_output_dir"))
    mine, theirs = run_id(out / "checkpoint-1"), run_id(first_run / "checkpoint-2")
    assert mine != theirs and run_id(out / "checkpoint-2") == theirs  # pruning kept its own and left theirs
    assert (out / ".old-mine").is_dir() and (out / ".tmp-mine").is_dir()  # the user's folders survive
    latest = run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--max_steps", 3,
                 "--resume_from_checkpoint", "latest")
    assert latest.returncode == 2 and "ambiguous" in latest.stderr  # never silently the other run


@pytest.mark.integration
def test_cut_off_metrics_line_does_not_stop_a_resume(tmp_path, tiny_llama_dir, first_run):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5, "ms')  # a crash mid-write
    ok(run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--max_steps", 2, "--save_steps", 1,
           "--eval_steps", 0, "--resume_from_checkpoint", out / "checkpoint-1"))
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2]  # every line parses; step 2 written again


def test_debug_nan_json_to_an_unwritable_path_is_exit_2(tiny_llama_dir, tmp_path):
    for target in ("/proc/npt-report.json", "/proc/self/status"):  # root may "access" both; neither is writable
        result = CliRunner().invoke(debug_nan.main, ["--model_name", str(tiny_llama_dir), "--json", target],
                                    catch_exceptions=False)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--json" in lines[0], result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize("script", [debug_nan, test_fixed_npt])
def test_other_scripts_refuse_remote_code_without_the_flag(tmp_path, tiny_llama_dir, script, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    assert "--trust_remote_code" in CliRunner().invoke(script.main, ["--help"]).output
    model, marker = remote_code_model(tmp_path, tiny_llama_dir)
    result = CliRunner().invoke(script.main, ["--model_name", str(model)], input="y\n", catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--trust_remote_code" in lines[0], result.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- one run per output dir
RACE = [*FAST, "--save_steps", 1, "--eval_steps", 0]


def launch(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def without_timing(rows_):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows_]


@pytest.mark.integration
def test_two_trainers_on_one_output_dir_exactly_one_trains(tmp_path, tiny_llama_dir):
    lone, out = tmp_path / "lone", tmp_path / "out"
    ok(run("--model_name", tiny_llama_dir, "--output_dir", lone, *RACE, "--max_steps", 4))
    procs = [launch("--model_name", tiny_llama_dir, "--output_dir", out, *RACE, "--max_steps", 4) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [o[1][-1500:] for o in outputs]
    won, lost = codes.index(0), codes.index(2)
    line = one_error_line(outputs[lost][1])
    assert "in use by another run" in line and f"pid {procs[won].pid}" in line, line
    # refused at once, not after training: the loser wrote its one line and nothing else (no run header, no
    # output), the winner trained
    assert "NPT pre-training:" in outputs[won][1] and outputs[lost][0] == "", outputs[lost]
    names = sorted(p.name for p in lone.iterdir() if p.name.startswith("checkpoint-"))
    assert names == sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    for name in names:
        assert_bitwise(out / name, lone / name)
    assert without_timing(rows(out)) == without_timing(rows(lone))


@pytest.mark.integration
def test_resume_while_the_run_trains_is_refused_and_a_killed_runs_lock_is_not(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    first = launch("--model_name", tiny_llama_dir, "--output_dir", out, *RACE, "--max_steps", 40)
    deadline = time.time() + 240
    while not (out / "checkpoint-1").is_dir() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    second = run("--model_name", tiny_llama_dir, "--output_dir", out, *RACE, "--max_steps", 40,
                 "--resume_from_checkpoint", "latest")
    assert second.returncode == 2 and "in use by another run" in one_error_line(second.stderr)
    assert first.poll() is None, "the running trainer died"
    first.kill()  # kill -9: its lock goes with it
    first.communicate()
    steps = [r["step"] for r in rows(out) if "loss" in r]
    assert steps == sorted(set(steps)), steps  # nothing interleaved
    ok(run("--model_name", tiny_llama_dir, "--output_dir", out, *RACE, "--max_steps", max(steps) + 1,
           "--resume_from_checkpoint", "latest"))


def user_files(out):
    return {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else None) for p in sorted(out.rglob("*"))}


@pytest.mark.integration
@pytest.mark.parametrize("overwrite", [True, False])
def test_output_dir_with_a_users_checkpoint_names_is_left_untouched(tmp_path, tiny_llama_dir, first_run, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    if overwrite:  # another run's files beside the user's
        shutil.copytree(first_run / "checkpoint-1", out / "checkpoint-1")
        shutil.copy(first_run / "metrics.jsonl", out)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "notes.txt").write_text("my notes")
    (out / "checkpoint-3").write_text("a user's file")
    (out / "checkpoint-final").mkdir()
    (out / "checkpoint-final" / "precious.txt").write_text("precious")
    before = user_files(out)
    result = CliRunner().invoke(trainer_main(), ["--model_name", str(tiny_llama_dir), "--output_dir", str(out), *map(
        str, RACE), "--max_steps", "3", *(["--overwrite_output_dir"] if overwrite else [])], catch_exceptions=False)
    assert result.exit_code == 2 and "not written by this trainer" in one_error_line(result.stderr)
    assert "checkpoint-2" in result.stderr
    assert user_files(out) == before


def test_overwrite_help_says_what_it_replaces_and_keeps():
    text = " ".join(CliRunner().invoke(trainer_main(), ["--help"]).output.split())
    assert ("Replaced: metrics.jsonl, loss_curve.png, equivalence.json, and that run's checkpoints of the names this "
            "run saves. Kept: its other checkpoints (never pruned or resumed) and everything this trainer did not "
            "write") in text


def trainer_main():
    import pretrain_npt_safe

    return pretrain_npt_safe.main


# ----------------------------------------------------------------------------- a full disk
@pytest.mark.integration
def test_full_disk_while_saving_exits_4_and_the_last_checkpoint_resumes_bitwise(tmp_path, tiny_llama_dir, tmpfs):
    lone, out = tmp_path / "lone", tmpfs("400k") / "out"  # sized for the gate target's checkpoints
    ok(run("--model_name", tiny_llama_dir, "--output_dir", lone, *RACE, *GATE, "--max_steps", 3))
    proc = run("--model_name", tiny_llama_dir, "--output_dir", out, *RACE, *GATE, "--max_steps", 3)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 4 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no space left" in errors[0] and str(out) in errors[0] and "MB" in errors[0], errors[0]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".npt-tmp")]  # nothing half-written
    steps = sorted(int(p.name.split("-")[1]) for p in out.iterdir() if p.name.split("-")[-1].isdigit())
    assert steps and steps[-1] < 3
    last = out / f"checkpoint-{steps[-1]}"
    assert_loadable(last, tiny_llama_dir)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ok(run("--model_name", tiny_llama_dir, "--output_dir", copy, *RACE, *GATE, "--max_steps", 3,
           "--resume_from_checkpoint", copy / last.name))
    assert_bitwise(copy / "checkpoint-3", lone / "checkpoint-3")
    assert_bitwise(copy / "checkpoint-final", lone / "checkpoint-final")


# ----------------------------------------------------------------------------- the other scripts
@pytest.mark.integration
@pytest.mark.parametrize("edit, field", [(lambda c: [c], "JSON object"), (lambda c: {**c, "add_scale": "big"}, "add_scale"),
                                         (lambda c: {**c, "num_layers": "2"}, "num_layers")])
def test_debug_nan_refuses_a_malformed_npt_config(tmp_path, tiny_llama_dir, first_run, edit, field):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(first_run / "checkpoint-1", ckpt)
    config = json.loads((ckpt / "npt_config.json").read_text())
    (ckpt / "npt_config.json").write_text(json.dumps(edit(config)))
    result = CliRunner().invoke(debug_nan.main, ["--model_name", str(tiny_llama_dir), "--checkpoint", str(ckpt)],
                                catch_exceptions=False)
    assert result.exit_code == 2 and field in one_error_line(result.stderr) and result.stdout == ""


@pytest.mark.parametrize("model", ["gpt2", "gelu", "mixtral"])
def test_fixed_npt_refuses_an_unconvertible_model_with_one_line(tmp_path, tiny_llama_dir, model):
    from transformers import GPT2Config, MixtralConfig

    folder = tmp_path / model
    if model == "gelu":
        shutil.copytree(tiny_llama_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    elif model == "gpt2":
        GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    else:
        MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_local_experts=4).save_pretrained(folder)
    result = CliRunner().invoke(test_fixed_npt.main, ["--model_name", str(folder)], catch_exceptions=False)
    assert result.exit_code == 2 and "cannot be converted to NPT" in one_error_line(result.stderr)
    assert result.stdout == ""


def test_warmup_longer_than_the_run_warns_once():
    import pretrain_npt_safe

    with pytest.warns(UserWarning, match="peaks at 3% of --learning_rate") as caught:
        assert pretrain_npt_safe.count_steps(pretrain_npt_safe.TrainArgs(max_steps=3, warmup_steps=100), None, 1) == 3
    assert len(caught) == 1
