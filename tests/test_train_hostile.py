"""Issue 12 as a user meets it, through real processes on the tiny random Llama: a model's own code never
runs, a diverging run keeps its last finite adapters, a second run in the same --output_dir loses nothing,
a cut-off metrics.jsonl line does not stop a resume, debug_nan --json to an unwritable path is exit 2."""
import json
import os
import pty
import select
import shutil
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import debug_nan
import npt
import test_fixed_npt
from test_train_cli import FAST, ROOT, SCRIPT, adapters, assert_bitwise, ok, rows, run


def run_in_terminal(args, typed: bytes, env: dict, timeout=120) -> tuple[int, str]:
    """The trainer under a pseudo-terminal (so transformers could prompt), `typed` waiting in its input;
    (exit code, what the terminal showed, the typed echo included)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the trainer, its stdin/stdout/stderr the terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, SCRIPT, *map(str, args)], {**os.environ, **env})
    out, deadline = b"", time.time() + timeout
    os.write(fd, typed)
    while time.time() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


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


def test_remote_code_never_runs_even_when_y_is_typed(tmp_path, tiny_llama_dir):
    model, marker = remote_code_model(tmp_path, tiny_llama_dir)
    code, output = run_in_terminal(["--model_name", model, "--output_dir", tmp_path / "out", "--max_steps", 1],
                                   b"y\n", {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONWARNINGS": "ignore"})
    lines = [line for line in output.splitlines() if line.strip() not in ("", "y")]  # less the echo of "y"
    assert not marker.exists(), "the model folder's code ran"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--trust_remote_code" in lines[0], output
    assert not (tmp_path / "out").exists()


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
               "--save_steps", 1, "--max_steps", 6, "--eval_steps", 0)
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
