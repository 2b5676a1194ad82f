"""Bad input to pretrain_npt_safe.py: one line `error: ...`, exit 2, no traceback, nothing written."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, MixtralConfig

import npt
from npt_tools import trainer
from helpers import ROOT
from npt_tools.arguments import TrainArgs
from npt_tools.checkpoints import TrainerState, save_checkpoint

GATE = ["--modulation_target", "gate"]  # the layout the fixture's adapters were saved in


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir):
    """Files the bad inputs point at, and a real checkpoint with a corrupt adapter file."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("")
    (d / "blank.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    (d / "other_column.jsonl").write_text('{"content": "some text"}\n')
    (d / "a_file").write_text("not a directory")
    model = npt.convert_to_npt(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                               npt.NPTConfig(modulation_target="gate"))
    opt = torch.optim.AdamW(npt.get_adapter_params(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (d / "run").mkdir()
    ckpt = save_checkpoint(d / "run", "checkpoint-1", model, opt, sched, TrainerState(step=1))
    blob = (ckpt / "adapter_model.safetensors").read_bytes()
    (ckpt / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated by a crash
    broken_inputs(d, tiny_llama_dir, model, opt, sched)
    return d


def broken_inputs(d, tiny_llama_dir, model, opt, sched):
    """Broken inputs: broken models, datasets and checkpoints, another run's output dir."""
    shutil.copytree(tiny_llama_dir, d / "truncated")
    blob = (d / "truncated" / "model.safetensors").read_bytes()
    (d / "truncated" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    shutil.copytree(tiny_llama_dir, d / "gelu")
    config = json.loads((d / "gelu" / "config.json").read_text())
    (d / "gelu" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(d / "gpt2")
    tok.save_pretrained(d / "gpt2")
    (d / "one_doc.jsonl").write_text('{"text": "a single short document"}\n')
    (d / "latin1.txt").write_bytes("caf\xe9 na\xefve d\xe9j\xe0 vu\n".encode("latin-1") * 50)
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all" * 20)
    (d / "other_run").mkdir()
    (d / "other_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for p in npt.get_adapter_params(model):
        p.grad = torch.ones_like(p)
    opt.step()  # optimizer state to corrupt
    opt.zero_grad()
    args = TrainArgs(model_name=str(tiny_llama_dir))
    args.resolve()  # what the trainer saves: every flag at its value
    args.learning_rate = 3e-4  # the exact target's, as its closed-form start decides it
    args = args.saved()
    for name in ("lacks_keys", "wrong_types", "optim_shape", "optim_nan", "saved_args"):
        save_checkpoint(d / "run", name, model, opt, sched, TrainerState(step=1), {"args": args})
    edit_json(d / "run" / "lacks_keys" / "trainer_state.json", lambda s: s.pop("position"))
    edit_json(d / "run" / "wrong_types" / "trainer_state.json", lambda s: s.update(step="two"))
    optim = load_file(str(d / "run" / "optim_shape" / "optimizer.safetensors"))
    optim["0.exp_avg"] = optim["0.exp_avg"].flatten()[:3].contiguous()
    save_file(optim, str(d / "run" / "optim_shape" / "optimizer.safetensors"))
    optim = load_file(str(d / "run" / "optim_nan" / "optimizer.safetensors"))
    optim["0.exp_avg_sq"][0] = float("nan")
    save_file(optim, str(d / "run" / "optim_nan" / "optimizer.safetensors"))
    hostile_files(d, tiny_llama_dir, model, opt, sched, args)


STATE_EDITS = {  # trainer_state.json values a resume would feed into training
    "lr_negative": lambda s: s["optimizer_param_groups"][0].update(lr=-1e-3),
    "lr_string": lambda s: s["optimizer_param_groups"][0].update(lr="0.001"),
    "initial_lr_zero": lambda s: s["optimizer_param_groups"][0].update(initial_lr=0.0),
    "betas_one": lambda s: s["optimizer_param_groups"][0].update(betas=[0.9]),
    "betas_one_or_more": lambda s: s["optimizer_param_groups"][0].update(betas=[0.9, 1.0]),
    "maximize": lambda s: s["optimizer_param_groups"][0].update(maximize=True),
    "last_epoch_string": lambda s: s["scheduler"].update(last_epoch="1"),
    "base_lrs_negative": lambda s: s["scheduler"].update(base_lrs=[-1e-3]),
    "best_string": lambda s: s.update(best="low"),
    "args_list": lambda s: s.update(args=[1]),
    "args_learning_rate_string": lambda s: s["args"].update(learning_rate="fast"),  # taken when not given
    "rng_strings": lambda s: s.update(python_rng=[3, ["a"], None]),
}
CONFIG_EDITS = {  # npt_config.json of the wrong shape
    "add_scale_big": lambda c: c.update(add_scale="big"),
    "add_scale_nan": lambda c: c.update(add_scale=float("nan")),
    "num_layers_string": lambda c: c.update(num_layers="2"),
    "top_level_list": lambda c: [c],
}


def hostile_files(d, tiny_llama_dir, model, opt, sched, args):
    """Hostile files: hostile trainer states, npt configs, NaN adapters, datasets, model folders."""
    for name, change in {**STATE_EDITS, **CONFIG_EDITS}.items():
        save_checkpoint(d / "run", name, model, opt, sched, TrainerState(step=1), {"args": args})
        target = "npt_config.json" if name in CONFIG_EDITS else "trainer_state.json"
        data = json.loads((d / "run" / name / target).read_text())
        (d / "run" / name / target).write_text(json.dumps(change(data) or data))
    save_checkpoint(d / "run", "nan_adapters", model, opt, sched, TrainerState(step=1), {"args": args})
    weights = load_file(str(d / "run" / "nan_adapters" / "adapter_model.safetensors"))
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, str(d / "run" / "nan_adapters" / "adapter_model.safetensors"))
    (d / "numbers.jsonl").write_text('{"text": 5}\n{"text": [1, 2]}\n{"text": {"a": 1}}\n')
    (d / "bare_string.json").write_text('"just a string"')
    (d / "nul.txt").write_bytes(b"\0" * 5000)
    shutil.copytree(tiny_llama_dir, d / "no_tokenizer")
    for f in (d / "no_tokenizer").iterdir():
        if "token" in f.name or f.name.endswith((".jinja", ".txt")):
            f.unlink()
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d / "gpt2_config_only")  # no weights: refused first
    MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4).save_pretrained(d / "mixtral_config_only")
    other = d / "other_run_ckpt"  # another run's directory: its metrics and its checkpoint
    save_checkpoint(other, "checkpoint-1", model, opt, sched, TrainerState(step=1, run_id="theirs"),
                            {"args": args})
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def bad_cases(d, model):
    return {
        "nonexistent model": ["--model_name", str(d / "no-such-model")],
        "nonexistent dataset": ["--model_name", model, "--dataset_name", str(d / "no-such.jsonl")],
        "nonexistent checkpoint": ["--model_name", model, "--resume_from_checkpoint", str(d / "no-such-ckpt")],
        "latest without checkpoints": ["--model_name", model, "--resume_from_checkpoint", "latest"],
        "corrupt adapter file": ["--model_name", model, "--resume_from_checkpoint", str(d / "run" / "checkpoint-1")],
        "empty dataset file": ["--model_name", model, "--dataset_name", str(d / "empty.txt")],
        "dataset of blank texts": ["--model_name", model, "--dataset_name", str(d / "blank.jsonl")],
        "missing text column": ["--model_name", model, "--dataset_name", str(d / "other_column.jsonl")],
        "rank 0": ["--model_name", model, "--adapter_rank", "0"],
        "negative rank": ["--model_name", model, "--adapter_rank", "-4"],
        "rank above d_model": ["--model_name", model, "--adapter_rank", "65"],
        "batch size 0": ["--model_name", model, "--batch_size", "0"],
        "accumulation 0": ["--model_name", model, "--gradient_accumulation_steps", "0"],
        "max_length 1": ["--model_name", model, "--max_length", "1"],
        "negative learning rate": ["--model_name", model, "--learning_rate", "-1e-5"],
        "unknown objective": ["--model_name", model, "--objective", "distill"],
        "npt_layers out of range": ["--model_name", model, "--npt_layers", "1,5"],
        "npt_layers unparsable": ["--model_name", model, "--npt_layers", "top"],
        "output dir under a file": ["--model_name", model, "--output_dir", str(d / "a_file" / "out")],
        "wandb missing": ["--model_name", model, "--use_wandb"],
        "streaming without max_steps": ["--model_name", model, "--streaming", "--max_steps", "0"],
        "unknown mixed precision": ["--model_name", model, "--mixed_precision", "fp8"],
        **broken_input_cases(d, model),
        **hostile_file_cases(d, model),
    }


def broken_input_cases(d, model):
    return {
        "not SwiGLU (hidden_act gelu)": ["--model_name", str(d / "gelu")],
        "not Llama-shaped (GPT-2)": ["--model_name", str(d / "gpt2")],
        "truncated model weights": ["--model_name", str(d / "truncated")],
        "one-document dataset": ["--model_name", model, "--dataset_name", str(d / "one_doc.jsonl")],
        "non-UTF-8 file streaming": ["--model_name", model, "--dataset_name", str(d / "latin1.txt"), "--streaming",
                                     "--max_steps", "2"],
        "corrupt file streaming": ["--model_name", model, "--dataset_name", str(d / "corrupt.parquet"), "--streaming",
                                   "--max_steps", "2"],
        "log_file in a missing folder": ["--model_name", model, "--log_file", str(d / "no-such-dir" / "log.txt")],
        "state lacks keys": ["--model_name", model, "--resume_from_checkpoint", str(d / "run" / "lacks_keys")],
        "state of wrong types": ["--model_name", model, "--resume_from_checkpoint", str(d / "run" / "wrong_types")],
        "optimizer tensor of wrong shape": ["--model_name", model, "--resume_from_checkpoint",
                                            str(d / "run" / "optim_shape")],
        "optimizer state NaN": ["--model_name", model, "--resume_from_checkpoint", str(d / "run" / "optim_nan")],
        "resume with changed flags": ["--model_name", model, "--resume_from_checkpoint", str(d / "run" / "saved_args"),
                                      "--learning_rate", "0.1", "--seed", "7", "--max_length", "64"],
        "num_epochs inf": ["--model_name", model, "--num_epochs", "inf", "--max_steps", "0"],
        "num_epochs nan": ["--model_name", model, "--num_epochs", "nan", "--max_steps", "0"],
        "learning_rate nan": ["--model_name", model, "--learning_rate", "nan"],
        "learning_rate inf": ["--model_name", model, "--learning_rate", "inf"],
        "weight_decay nan": ["--model_name", model, "--weight_decay", "nan"],
        "max_grad_norm nan": ["--model_name", model, "--max_grad_norm", "nan"],
        "regularization_lambda inf": ["--model_name", model, "--regularization_lambda", "inf"],
        "seed 2**64": ["--model_name", model, "--seed", str(2 ** 64)],
        "seed -1": ["--model_name", model, "--seed", "-1"],
        "output_dir under /proc": ["--model_name", model, "--output_dir", "/proc/npt-out"],
        "npt_layers 0-10000000000": ["--model_name", model, "--npt_layers", "0-10000000000"],
        "output_dir of another run": ["--model_name", model, "--output_dir", str(d / "other_run")],
        # --init_adapters
        "init_adapters of another rank": ["--model_name", model, "--adapter_rank", "4", "--init_adapters",
                                          str(d / "run" / "checkpoint-1")],
        "init_adapters not a checkpoint": ["--model_name", model, "--init_adapters", str(d / "a_file")],
        "init_adapters corrupt weights": ["--model_name", model, "--init_adapters", str(d / "run" / "checkpoint-1")],
        "init_adapters and resume": ["--model_name", model, "--init_adapters", str(d / "run" / "checkpoint-1"),
                                     "--resume_from_checkpoint", str(d / "run" / "checkpoint-1")],
    }


def hostile_file_cases(d, model):
    run = d / "run"
    return {
        **{f"state {name}": ["--model_name", model, "--resume_from_checkpoint", str(run / name)] for name in STATE_EDITS},
        **{f"resume npt_config {name}": ["--model_name", model, "--resume_from_checkpoint", str(run / name)]
           for name in CONFIG_EDITS},
        **{f"init_adapters npt_config {name}": ["--model_name", model, "--init_adapters", str(run / name)]
           for name in CONFIG_EDITS},
        "init_adapters NaN": ["--model_name", model, "--init_adapters", str(run / "nan_adapters"), *GATE],
        "resume NaN adapters": ["--model_name", model, "--resume_from_checkpoint", str(run / "nan_adapters"), *GATE],
        "run_name under /proc": ["--model_name", model, "--use_tensorboard", "--run_name", "/proc/x"],
        "run_name absolute": ["--model_name", model, "--use_tensorboard", "--run_name", str(d / "tb-elsewhere")],
        "run_name ..": ["--model_name", model, "--use_tensorboard", "--run_name", "../../escape"],
        "text column of numbers": ["--model_name", model, "--dataset_name", str(d / "numbers.jsonl")],
        "json of a bare string": ["--model_name", model, "--dataset_name", str(d / "bare_string.json")],
        "txt of NUL bytes": ["--model_name", model, "--dataset_name", str(d / "nul.txt")],
        "model folder without tokenizer": ["--model_name", str(d / "no_tokenizer")],
        "GPT-2 config, no weights": ["--model_name", str(d / "gpt2_config_only")],
        "MoE (Mixtral) config, no weights": ["--model_name", str(d / "mixtral_config_only")],
        "max_length past the positions": ["--model_name", model, "--max_length", "513"],
        "use_fp16 changed on resume": ["--model_name", model, "--resume_from_checkpoint", str(run / "saved_args"),
                                       "--use_fp16"],
        "resume from elsewhere into another run": ["--model_name", model, "--resume_from_checkpoint",
                                                   str(run / "saved_args"), "--output_dir", str(d / "other_run_ckpt")],
        "resume from elsewhere into another run's metrics": [
            "--model_name", model, "--resume_from_checkpoint", str(run / "saved_args"), "--output_dir",
            str(d / "other_run")],
    }


# what the one line must say: what was actually wrong
MESSAGES = {
    "state lr_negative": "lr", "state betas_one": "betas", "state last_epoch_string": "last_epoch",
    "state lr_string": "lr", "state maximize": "maximize", "resume npt_config add_scale_big": "add_scale",
    "state args_learning_rate_string": "--learning_rate 'fast'",
    "init_adapters npt_config add_scale_big": "add_scale", "init_adapters npt_config add_scale_nan": "add_scale must be",
    "init_adapters npt_config num_layers_string": "num_layers must be a positive integer, got '2'",
    "init_adapters npt_config top_level_list": "JSON object", "init_adapters NaN": "not finite",
    "resume NaN adapters": "not finite", "run_name under /proc": "--run_name",
    "text column of numbers": "holds int values, not text", "json of a bare string": "not JSON records",
    "txt of NUL bytes": "no records", "model folder without tokenizer": "has no tokenizer",
    "GPT-2 config, no weights": "no gate_proj", "MoE (Mixtral) config, no weights": "mixture of experts",
    "max_length past the positions": "max_position_embeddings", "use_fp16 changed on resume": "--use_fp16 False -> True",
    "resume from elsewhere into another run": "holds another run",
    "resume from elsewhere into another run's metrics": "holds another run",
    "not Llama-shaped (GPT-2)": "cannot be converted",
    "nonexistent model": "no-such-model' not found", "corrupt adapter file": "checkpoint-1' is corrupt",
    "rank above d_model": "--adapter_rank 65 is out of range: it must lie in 1..64",
}


CASES = list(bad_cases(Path("/x"), "m"))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(case, inputs, tiny_llama_dir, tmp_path):
    pytest.importorskip("click")
    if case == "wandb missing":
        try:
            import wandb  # noqa: F401
            pytest.skip("wandb is installed here")
        except ImportError:
            pass
    out = tmp_path / "out"
    args = bad_cases(inputs, str(tiny_llama_dir))[case]
    if "--output_dir" not in args:
        args = args + ["--output_dir", str(out)]
    before = sorted(p.name for p in inputs.rglob("*"))
    result = CliRunner().invoke(trainer.main, args, catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {result.stderr!r}"
    assert MESSAGES.get(case, "") in lines[0], f"{case}: {lines[0]}"
    assert "An error occurred" not in lines[0] and not lines[0].rstrip().endswith(":"), lines[0]  # never cut off
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists(), f"{case}: {out} was created"
    assert sorted(p.name for p in inputs.rglob("*")) == before, f"{case}: files were written"


@pytest.mark.integration
@pytest.mark.parametrize("case", ["nonexistent model", "corrupt adapter file", "rank above d_model"])
def test_bad_input_as_a_process(case, inputs, tiny_llama_dir, tmp_path):
    """The same, through a real interpreter: no traceback, no warning noise, one line that names what was
    wrong."""
    args = bad_cases(inputs, str(tiny_llama_dir))[case] + ["--output_dir", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_npt_safe.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert MESSAGES[case] in lines[0], f"{case}: {lines[0]}"
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag():
    text = CliRunner().invoke(trainer.main, ["--help"]).output
    flags = """model_name adapter_rank use_quantization use_fp16 share_embeddings safe_mode streaming batch_size
        gradient_accumulation_steps learning_rate regularization_lambda num_epochs warmup_steps output_dir log_steps
        save_steps use_wandb dataset_name dataset_split num_samples max_length weight_decay max_steps max_grad_norm
        optimizer_type scheduler_type log_file use_tensorboard run_name mixed_precision npt_layers objective kernel
        text_column eval_steps resume_from_checkpoint save_total_limit seed max_consecutive_nan""".split()
    missing = [f for f in flags if f"--{f}" not in text]
    assert not missing, missing
    assert "default: 0.5" in " ".join(text.split()).replace("[", "").replace("]", "")  # --max_grad_norm


def test_help_states_each_targets_learning_rate():
    """The exact target's rate is decided by its closed-form start (a placeholder is never shown as its default)."""
    text = " ".join(CliRunner().invoke(trainer.main, ["--help"]).output.split())
    assert ("[default per --modulation_target: 0.003 x the share of the attention the closed-form start misses "
            "(1e-05 with --init_adapters) for exact; 0.003 for gate, down, gate+down]") in text
