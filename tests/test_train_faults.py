"""Faults a run meets from outside, through real processes on the tiny random Llama: an output disk too small for
one checkpoint (refused before any work), one that fills later (the newest checkpoint, checkpoint-best included,
named and resumed), error lines a log reader finds with grep '^error:', SIGTERM and Ctrl-C during the closed-form
start, a resume that changes the start's flags."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import FAST, ROOT, SCRIPT, assert_bitwise, ok, run, run_in_terminal

pytestmark = pytest.mark.integration  # trainings as subprocesses

SAVES = [*FAST, "--max_steps", 3, "--save_steps", 2, "--eval_steps", 0]  # best and checkpoint-2 at step 2, then 3


def error_lines(stderr: str) -> list[str]:
    """The lines grep '^error:' finds, after checking that no progress bar wrote to the log."""
    assert "\r" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_any_work(tiny_llama_dir, tmpfs):
    disk = tmpfs("200k")
    started = time.time()
    proc = run("--model_name", tiny_llama_dir, "--output_dir", disk / "out", *SAVES)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and error_lines(proc.stderr) == lines, proc.stderr[-2000:]
    assert "0.20 MB free" in lines[0] and "needs about 0.26 MB" in lines[0] and "--output_dir" in lines[0]
    assert "closed-form start" not in proc.stderr and list(disk.iterdir()) == []  # nothing written, not even the dir
    assert time.time() - started < 60


def test_a_full_disk_keeps_checkpoint_best_and_latest_resumes_it_to_the_same_adapters(tmp_path, tiny_llama_dir, tmpfs):
    """400 kB: checkpoint-best of step 2 fits, checkpoint-2 beside it does not. The message names checkpoint-best;
    after freeing space (the tmpfs grown), --resume_from_checkpoint latest continues from it through step 3 to the
    adapters of an uninterrupted run, bitwise."""
    lone, disk = tmp_path / "lone", tmpfs("400k")
    out = disk / "out"
    ok(run("--model_name", tiny_llama_dir, "--output_dir", lone, *SAVES))
    proc = run("--model_name", tiny_llama_dir, "--output_dir", out, *SAVES)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 4 and len(errors) == 1, proc.stderr[-2000:]
    best = out / "checkpoint-best"
    assert f"save {out / 'checkpoint-2'}" in errors[0] and f"resume from {best} (step 2" in errors[0], errors[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".npt-tmp"))) == [best.name]
    assert subprocess.run(["mount", "-o", "remount,size=4m", str(disk)]).returncode == 0  # space freed
    resumed = ok(run("--model_name", tiny_llama_dir, "--output_dir", out, *SAVES, "--resume_from_checkpoint", "latest"))
    assert f"resumed at step 2 from {best}" in resumed.stderr
    assert_bitwise(out / "checkpoint-final", lone / "checkpoint-final")


def test_a_full_disk_in_a_terminal_prints_the_error_on_its_own_line(tiny_llama_dir, tmpfs):
    code, shown = run_in_terminal(["--model_name", tiny_llama_dir, "--output_dir", tmpfs("400k") / "out", *SAVES],
                                  env={"PYTHONWARNINGS": "ignore"})
    lines = [line.split("\r")[-1] for line in shown.splitlines()]  # as the terminal shows them: after the last CR
    errors = [line for line in lines if "error:" in line]
    assert code == 4 and len(errors) == 1 and errors[0].startswith("error: no space left"), lines[-5:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_closed_form_start_says_aborted_and_leaves_nothing(tmp_path, tiny_llama_dir, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--model_name", str(tiny_llama_dir), "--output_dir", str(out),
                             *map(str, FAST), "--max_steps", "3", "--init_batches", "512"], cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the setup's summary line: the closed-form start comes next (512 batches: ~30 s)
        seen.append(line)
        if line.startswith("NPT pre-training:"):
            break
    time.sleep(2)
    assert proc.poll() is None, "".join(seen)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    errors = error_lines("".join(seen) + rest)
    assert proc.returncode == 1 and errors == ["error: aborted" + (" (SIGTERM)" if sig == signal.SIGTERM else "")], rest
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # lock files and the folder it created: gone


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("pca") / "out"
    ok(run("--model_name", tiny_llama_dir, "--output_dir", out, *FAST, "--max_steps", 1, "--save_steps", 1,
           "--eval_steps", 0, "--exact_start", "pca"))
    return out


def test_a_resume_with_another_closed_form_start_is_refused(pca_run, tiny_llama_dir):
    proc = run("--model_name", tiny_llama_dir, "--output_dir", pca_run, *FAST, "--max_steps", 2, "--save_steps", 1,
               "--eval_steps", 0, "--resume_from_checkpoint", "latest", "--exact_start", "fisher")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--exact_start 'pca' -> 'fisher'" in lines[0], proc.stderr


def test_a_resume_without_the_start_flags_keeps_and_records_the_runs_start(pca_run, tiny_llama_dir):
    ok(run("--model_name", tiny_llama_dir, "--output_dir", pca_run, *FAST, "--max_steps", 2, "--save_steps", 1,
           "--eval_steps", 0, "--resume_from_checkpoint", "latest"))
    state = json.loads((pca_run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["args"]["exact_start"] == "pca" and "principal" in state["closed_form_start"]["method"]
    assert "Fisher" not in state["closed_form_start"]["method"], state["closed_form_start"]
