"""pretrain_npt_safe.py as a user runs it: subprocesses on a tiny random Llama (and the embedded
model for the seed's recommended command)."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import FAST, ROOT, SCRIPT, adapters, assert_bitwise, assert_loadable, ok, rows, run


pytestmark = pytest.mark.integration  # trainings as subprocesses


def train_rows(out_dir):
    return [r for r in rows(out_dir) if "loss" in r]


# ----------------------------------------------------------------------------- 1. the seed's command
SEED_COMMAND = """--model_name meta-llama/Llama-3.1-8B --adapter_rank 16 --use_quantization --share_embeddings
    --safe_mode --streaming --batch_size 1 --gradient_accumulation_steps 8 --learning_rate 5e-5
    --regularization_lambda 0.01 --num_epochs 1 --warmup_steps 200 --output_dir ./outputs/npt-safe-pretrained
    --log_steps 10 --save_steps 500 --use_wandb""".split()


def test_seed_recommended_command_4bit(tmp_path):
    args = list(SEED_COMMAND)
    args[args.index("--model_name") + 1] = "smollm2-135m"
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    args.remove("--use_wandb")
    proc = ok(run(*args, "--max_steps", 2, "--max_length", 64, "--init_batches", 4, timeout=600))
    final = tmp_path / "out" / "checkpoint-final"
    keys = adapters(final).keys()  # the default exact target: no gate factor, so safe mode changes nothing there
    assert keys and all(k.split(".")[2] in ("A_proj", "B", "mu") for k in keys)
    assert not any("B_mult" in k or "B_add" in k for k in keys)
    cfg = json.loads((final / "npt_config.json").read_text())
    assert cfg["modulation_target"] == "exact" and cfg["rank"] == 16 and len(cfg["layer_indices"]) == 30
    assert cfg["modulation"] == "additive"  # what --safe_mode selects for the gate targets
    losses = [r["loss"] for r in train_rows(tmp_path / "out")]
    assert [r["step"] for r in train_rows(tmp_path / "out")] == [1, 2]  # the first and last steps are always logged
    assert losses and all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert not any(line.startswith("error") for line in proc.stderr.lower().splitlines())  # "update error" is fine


# ----------------------------------------------------------------------------- 4. non-finite micro-batches
def test_planted_nan_micro_batch_is_skipped_and_counted(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    proc = ok(run("--model_name", tiny_llama_dir, "--output_dir", out, "--max_steps", 4, *FAST,
                  "--inject_nan_steps", "2"))
    r = train_rows(out)
    skips = [x for x in r if x["skipped"]]
    assert len(skips) == 1 and skips[0]["skipped"] == 2 and skips[0]["step"] == 1 and skips[0]["loss"] is None
    assert [x["step"] for x in r if x["loss"] is not None] == [1, 2, 3, 4]  # training went on
    assert all(math.isfinite(x["loss"]) for x in r if x["loss"] is not None)
    assert rows(out)[-1]["skipped_total"] == 2
    assert "skipped micro-batch" in proc.stderr and "at step 1" in proc.stderr


def test_consecutive_nan_stops_with_last_good_checkpoint(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    proc = run("--model_name", tiny_llama_dir, "--output_dir", out, "--max_steps", 10, *FAST,
               "--save_steps", 1, "--gradient_accumulation_steps", 1, "--max_consecutive_nan", 3,
               "--inject_nan_steps", "3-100")
    assert proc.returncode not in (0, 2), proc.stderr[-2000:]
    assert "3 non-finite micro-batches in a row" in proc.stderr and "Traceback" not in proc.stderr
    state = assert_loadable(out / "checkpoint-final", tiny_llama_dir)
    assert state["step"] == 2 and state["skipped_total"] == 3
    assert_bitwise(out / "checkpoint-final", out / "checkpoint-2")  # the last good adapters
    assert not (out / "checkpoint-3").exists()


# ----------------------------------------------------------------------------- 5. resume
@pytest.mark.parametrize("data", ["builtin", "jsonl-streaming", "builtin, gate+down target"])
def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path, tiny_llama_dir, data):
    """The default exact target and kl objective (its closed-form start not redone), and gate+down layerwise."""
    extra = ["--adapter_rank", 8]
    if data.endswith("target"):
        extra = ["--modulation_target", "gate+down", "--objective", "layerwise"]
    if data == "jsonl-streaming":
        f = tmp_path / "docs.jsonl"
        rng = random.Random(0)
        words = "alpha beta gamma delta modulation attention layer token gradient".split()
        f.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))}) + "\n"
                             for _ in range(60)))
        extra += ["--dataset_name", f, "--streaming"]
    common = ["--model_name", tiny_llama_dir, "--max_steps", 6, *FAST, "--save_steps", 3, *extra]
    first = ok(run(*common, "--output_dir", tmp_path / "a"))
    a = tmp_path / "a"
    state = json.loads((a / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["position"] != [0, 0, 0]
    exact = "gate+down" not in data
    assert ("closed-form start" in first.stderr) == exact == (state["closed_form_start"] is not None)
    with pytest.raises(AssertionError):  # training moves the adapters after the checkpoint
        assert_bitwise(a / "checkpoint-3", a / "checkpoint-final")
    resumed = ok(run(*common, "--output_dir", tmp_path / "b", "--resume_from_checkpoint", a / "checkpoint-3"))
    assert "closed-form start" not in resumed.stderr  # the checkpoint's adapters hold it
    assert_bitwise(a / "checkpoint-final", tmp_path / "b" / "checkpoint-final")
    assert_bitwise(a / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    la = {r["step"]: r["loss"] for r in train_rows(a)}
    lb = {r["step"]: r["loss"] for r in train_rows(tmp_path / "b")}
    assert set(lb) == {4, 5, 6} and all(la[s] == lb[s] for s in lb)


def test_sigkill_at_random_moments_leaves_loadable_checkpoints(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    rng = random.Random(1)
    args = [sys.executable, SCRIPT, "--model_name", str(tiny_llama_dir), "--output_dir", str(out),
            "--max_steps", "100000", "--max_length", "16", "--batch_size", "1", "--gradient_accumulation_steps", "1",
            "--save_steps", "1", "--save_total_limit", "2", "--log_steps", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    steps = []
    for kill in range(10):
        resume = ["--resume_from_checkpoint", "latest"] if any(out.glob("checkpoint-*")) else []
        proc = subprocess.Popen(args + resume, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # wait for this run's first save, then kill at a random moment of steady saving
            deadline = time.time() + 120
            base = max(steps, default=0)
            while time.time() < deadline and proc.poll() is None:
                numbered = [int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if d.name[11:].isdigit()]
                if max(numbered, default=0) > base:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 1.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        present = sorted(d for d in out.iterdir() if d.name.startswith("checkpoint-"))
        numbered = [d for d in present if d.name[11:].isdigit()]
        assert numbered, "no checkpoint after a kill"
        newest = max(numbered, key=lambda d: int(d.name[11:]))
        for d in present:  # every visible checkpoint, the newest above all, loads
            assert_loadable(d, tiny_llama_dir)
        steps.append(int(newest.name[11:]))
    assert steps == sorted(steps) and steps[-1] > steps[0], f"resumed runs did not progress: {steps}"


# ----------------------------------------------------------------------------- 7. DDP
@pytest.mark.parametrize("target", ["gate+down", "exact"])
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_llama_dir, target):
    """gate+down layerwise: the gate and the down modulation's gradients both sync; exact with kl: the closed-form
    start (gradients from the first 2 of 3 batches a process), gathered in shards, is the one process's, and the kl
    gradients sync."""
    layout = (["--objective", "layerwise"] if target == "gate+down" else ["--adapter_rank", 8, "--init_batches", 3,
                                                                          "--init_gradient_batches", 2])
    common = ["--model_name", tiny_llama_dir, "--max_steps", 4, *FAST, "--gradient_accumulation_steps", 2,
              "--save_steps", 2, "--modulation_target", target, *layout]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    ddp = ok(run(*common, "--batch_size", 1, "--output_dir", tmp_path / "ddp", launcher=torchrun, timeout=400))
    ok(run(*common, "--batch_size", 2, "--output_dir", tmp_path / "one"))
    final = rows(tmp_path / "ddp")[-1]
    assert final["event"] == "final" and final["world_size"] == 2 and final["ranks_identical"] is True
    ld = {r["step"]: r["loss"] for r in train_rows(tmp_path / "ddp")}
    lo = {r["step"]: r["loss"] for r in train_rows(tmp_path / "one")}
    assert set(ld) == set(lo) == {1, 2, 3, 4}
    for s in ld:
        assert abs(ld[s] - lo[s]) < 1e-5 * max(1.0, abs(lo[s])) and ld[s] == pytest.approx(lo[s], rel=1e-4)
    a, b = adapters(tmp_path / "ddp" / "checkpoint-final"), adapters(tmp_path / "one" / "checkpoint-final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert ddp.stderr.count("NPT pre-training:") == 1  # rank 0 logs, once
    # resumed on two processes from the step-2 checkpoint: the same adapters, bit for bit
    ok(run(*common, "--batch_size", 1, "--output_dir", tmp_path / "ddp2", "--resume_from_checkpoint",
           tmp_path / "ddp" / "checkpoint-2", launcher=torchrun, timeout=400))
    assert_bitwise(tmp_path / "ddp" / "checkpoint-final", tmp_path / "ddp2" / "checkpoint-final")


# ----------------------------------------------------------------------------- 9. eval and sinks
def test_eval_metrics_curve_and_tensorboard(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    ok(run("--model_name", tiny_llama_dir, "--output_dir", out, "--max_steps", 4, *FAST, "--eval_steps", 2,
           "--eval_samples", 3, "--use_tensorboard", "--log_file", tmp_path / "train.log"))
    evals = [r for r in rows(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # at start, every 2 steps, at the end
    for r in evals:
        assert r["eval_teacher_ppl"] > 1 and r["eval_student_ppl"] > 1 and 0 <= r["eval_agreement"] <= 1
        assert len(r["eval_layer_update_error"]) == 2 and all(v >= 0 for v in r["eval_layer_update_error"])
        assert r["eval_update_error"] == sum(r["eval_layer_update_error"]) / 2
    for r in train_rows(out):
        assert {"step", "loss", "fit", "reg", "grad_norm", "lr", "skipped"} <= set(r)
    report = json.loads((out / "equivalence.json").read_text())  # the equivalence report: step 0 -> the end
    assert report["layers"] == [0, 1]
    assert report["update_error_start"] == evals[0]["eval_layer_update_error"]
    assert report["update_error_final"] == evals[-1]["eval_layer_update_error"]
    assert (report["student_ppl_start"], report["agreement_final"]) == (evals[0]["eval_student_ppl"],
                                                                       evals[-1]["eval_agreement"])
    best = json.loads((out / "checkpoint-best" / "trainer_state.json").read_text())["step"]
    losses = {r["step"]: r["eval_loss"] for r in evals}  # --save_steps 0: the start and the end are the candidates
    assert report["best_step"] == best and losses[best] == min(losses[0], losses[4])
    assert "update error per NPT layer" in (tmp_path / "train.log").read_text()
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert "eval @ step 2" in (tmp_path / "train.log").read_text()
    for name in ("checkpoint-final", "checkpoint-best"):
        assert_loadable(out / name, tiny_llama_dir)


def test_init_adapters_starts_a_new_run_from_saved_adapters(tmp_path, tiny_llama_dir):
    """end_to_end after layerwise: the second run's step-0 eval is the first run's last (same adapters)."""
    common = ["--model_name", tiny_llama_dir, *FAST, "--eval_steps", 2, "--eval_samples", 3,
              "--modulation_target", "down"]
    ok(run(*common, "--max_steps", 2, "--output_dir", tmp_path / "layerwise"))
    ok(run(*common, "--max_steps", 1, "--output_dir", tmp_path / "e2e", "--objective", "end_to_end",
           "--init_adapters", tmp_path / "layerwise" / "checkpoint-final"))
    first = [r for r in rows(tmp_path / "layerwise") if "eval_loss" in r]
    second = [r for r in rows(tmp_path / "e2e") if "eval_loss" in r]
    assert second[0]["step"] == 0 and first[-1]["eval_update_error"] < first[0]["eval_update_error"]
    assert second[0]["eval_layer_update_error"] == pytest.approx(first[-1]["eval_layer_update_error"], rel=1e-6)
    assert second[0]["eval_student_ppl"] == pytest.approx(first[-1]["eval_student_ppl"], rel=1e-6)
