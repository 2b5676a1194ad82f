"""debug_nan.py on the embedded model: clean run, planted NaNs, poisoned checkpoints, bad input."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import debug_nan
import npt
from npt_tools.closed_form import init_exact
from npt_tools.models import load_base_model
from debug_nan import STAGES
from npt_tools.cli import UserError

pytestmark = pytest.mark.integration  # the embedded model, debug_nan.py as a process
ROOT = Path(__file__).resolve().parents[1]
ONE_TORCH_THREAD = True
NUM_LAYERS = 30
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "debug_nan.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=ENV)


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    """debug_nan's CLI in this process (no model reload per subprocess): (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        debug_nan.main.main(args=list(args), prog_name="debug_nan.py")
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def fresh_npt(embedded, **config):
    torch.manual_seed(0)
    return npt.convert_to_npt(copy.deepcopy(embedded[0]), npt.NPTConfig(**config))


@pytest.fixture(scope="module")
def npt_model(embedded):
    return fresh_npt(embedded)


def table_rows(stdout: str) -> dict:
    """{(layer, stage): (min, max, mean_abs, nan, inf) as printed} from the report's table."""
    rows = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"\s*(\d+)\s+(\w+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)(\s+<-- non-finite)?", line)
        if m and m.group(2) in STAGES:
            rows[int(m.group(1)), m.group(2)] = m.group(3, 4, 5, 6, 7)
    return rows


def verdict(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("first non-finite:"))


def assert_first(report, layer, stage):
    """The report names (layer, stage), that stage really holds a non-finite value, and nothing before it does."""
    assert report["first_nonfinite"] == {"layer": layer, "stage": stage}
    order = [(e["layer"], s) for e in report["layers"] for s in STAGES]
    stats = {(e["layer"], s): e["stages"][s] for e in report["layers"] for s in STAGES}
    assert stats[layer, stage]["nan"] + stats[layer, stage]["inf"] > 0
    for key in order[:order.index((layer, stage))]:
        assert stats[key] is None or stats[key]["nan"] + stats[key]["inf"] == 0, key


# ----------------------------------------------------------------------------- (1) clean run
def test_clean_run_prints_table_exits_0_and_json_agrees(tmp_path):
    out_json = tmp_path / "report.json"
    proc = run_cli("--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert verdict(proc.stdout) == "first non-finite: none found (every stage of every NPT layer and the logits are finite)"
    rows = table_rows(proc.stdout)
    off = ("delta_down", "a_hat", "norm_scale")  # the default gate target: the down and exact stages are off
    assert set(rows) == {(i, s) for i in range(NUM_LAYERS) for s in STAGES if s not in off}
    for stage in off:
        assert len(re.findall(rf"^\s*\d+\s+{stage}\s+off$", proc.stdout, re.M)) == NUM_LAYERS

    report = json.loads(out_json.read_text())
    assert report["first_nonfinite"] is None
    assert report["stages"] == list(STAGES)
    assert [e["layer"] for e in report["layers"]] == list(range(NUM_LAYERS))
    for entry in report["layers"]:
        assert list(entry["stages"]) == list(STAGES)
        assert all(entry["stages"].pop(stage) is None for stage in off)
        for stage, s in entry["stages"].items():
            assert s["nan"] == s["inf"] == 0 and s["numel"] > 0
            assert s["min"] <= s["max"] and s["mean_abs"] >= 0
            assert rows[entry["layer"], stage] == (f"{s['min']:.3e}", f"{s['max']:.3e}", f"{s['mean_abs']:.3e}",
                                                   "0", "0")
        # B_mult = 0 at init: the factor is exactly 1 everywhere
        assert entry["stages"]["delta_mult"]["min"] == entry["stages"]["delta_mult"]["max"] == 1.0
    assert report["model"]["npt_layers"] == list(range(NUM_LAYERS))
    assert report["logits"]["nan"] == report["logits"]["inf"] == 0
    loss = report["loss_check"]["rows"]
    assert loss[-1]["scale"] == 1e4 and loss[-1]["standard_mse"] > 1e6 and loss[-1]["normalized_mse"] <= 4
    fr = report["factor_ranges"]
    assert fr["old"]["min"] == 0.0 and fr["old"]["zeros"] > 0
    assert fr["new"]["min"] >= 0.5 and fr["new"]["max"] <= 1.5 and fr["new"]["zeros"] == 0
    assert fr["new"]["at_zero"] == 1.0
    assert "loss check" in proc.stdout and "1 + tanh(m)" in proc.stdout and "0.5 + sigmoid(m)" in proc.stdout


# ----------------------------------------------------------------------------- (2) planted NaNs
@pytest.mark.parametrize("layer", [0, 13, NUM_LAYERS - 1])
def test_injected_nan_is_found_at_exactly_that_layer_and_stage(npt_model, embedded, layer):
    tokenizer = embedded[1]
    for stage in (s for s in STAGES if s not in ("delta_down", "a_hat", "norm_scale")):  # off for the gate target
        report = debug_nan.inspect_model(npt_model, tokenizer, inject=(layer, stage))
        assert_first(report, layer, stage)
        # the NaN is real, not cosmetic: it flows on into the layer's output
        out = report["layers"][layer]["stages"]["layer_out"]
        assert out["nan"] > 0, stage
    # hooks removed and planted weights restored: a clean run afterwards finds nothing
    assert debug_nan.inspect_model(npt_model, tokenizer)["first_nonfinite"] is None


def test_injected_nan_subprocess_exit_1_and_json(tmp_path):
    out_json = tmp_path / "report.json"
    proc = run_cli("--inject_nan", "7:delta_mult", "--json", str(out_json), "--text", "Hello there, NaN.")
    assert proc.returncode == 1, proc.stderr
    assert verdict(proc.stdout) == "first non-finite: layer 7 stage delta_mult"
    report = json.loads(out_json.read_text())
    assert_first(report, 7, "delta_mult")
    assert report["inject_nan"]["layer"] == 7 and report["inject_nan"]["stage"] == "delta_mult"
    assert report["texts"] == ["Hello there, NaN."]
    assert "<-- non-finite" in [line for line in proc.stdout.splitlines() if re.match(r"\s*7\s+delta_mult", line)][0]


@pytest.mark.parametrize("precision", ["fp16", "4bit"])
def test_other_precisions(embedded, precision):
    model, tokenizer = load_base_model(use_fp16=precision == "fp16", use_quantization=precision == "4bit")
    torch.manual_seed(0)
    npt.convert_to_npt(model, npt.NPTConfig(layers="0-5"))
    assert debug_nan.inspect_model(model, tokenizer)["first_nonfinite"] is None
    report = debug_nan.inspect_model(model, tokenizer, inject=(4, "modulated_gate"))
    assert_first(report, 4, "modulated_gate")
    assert [e["layer"] for e in report["layers"]] == list(range(6))


@pytest.mark.parametrize("target", ["down", "gate+down"])
def test_down_target_stages(embedded, target):
    model = fresh_npt(embedded, layers="10-12", modulation_target=target)
    clean = debug_nan.inspect_model(model, embedded[1])
    assert clean["first_nonfinite"] is None
    assert all(e["stages"]["delta_down"]["numel"] > 0 for e in clean["layers"])
    assert all((e["stages"]["delta_add"] is None) == (target == "down") for e in clean["layers"])
    for stage in ("delta_down", "mlp_out", "low_rank"):
        report = debug_nan.inspect_model(model, embedded[1], inject=(11, stage))
        assert_first(report, 11, stage)
        assert report["layers"][1]["stages"]["layer_out"]["nan"] > 0, stage
    with pytest.raises(UserError, match="delta_down is off"):
        debug_nan.inspect_model(fresh_npt(embedded, layers="10"), embedded[1], inject=(10, "delta_down"))


def test_exact_target_stages(embedded):
    model = fresh_npt(embedded, layers="10-12", modulation_target="exact", rank=16)
    ids = embedded[1](["The attention output, seen through a rank-16 code."] * 2, return_tensors="pt")
    init_exact(model, [dict(ids)])
    clean = debug_nan.inspect_model(model, embedded[1])
    assert clean["first_nonfinite"] is None
    for e in clean["layers"]:
        assert all(e["stages"][s] is None for s in ("delta_add", "delta_mult", "delta_down"))
        assert e["stages"]["a_hat"]["numel"] > 0 and e["stages"]["a_hat"]["mean_abs"] > 0
        scale = e["stages"]["norm_scale"]  # s = rms(h) / rms(h + a_hat): the attention changes the norm a little
        assert 0.2 < scale["min"] <= scale["max"] < 5 and scale["min"] != scale["max"]
    for stage in ("low_rank", "a_hat"):
        report = debug_nan.inspect_model(model, embedded[1], inject=(11, stage))
        assert_first(report, 11, stage)
        assert report["layers"][1]["stages"]["norm_scale"]["nan"] > 0 and report["layers"][1]["stages"]["layer_out"]["nan"] > 0
    with pytest.raises(UserError, match="norm_scale is derived"):
        debug_nan.inspect_model(model, embedded[1], inject=(11, "norm_scale"))
    with pytest.raises(UserError, match="a_hat is off"):
        debug_nan.inspect_model(fresh_npt(embedded, layers="10"), embedded[1], inject=(10, "a_hat"))


def test_partial_conversion_and_safe_mode(embedded):
    model = fresh_npt(embedded, modulation="additive", layers="upper_half")
    report = debug_nan.inspect_model(model, embedded[1], inject=(20, "delta_add"))
    assert [e["layer"] for e in report["layers"]] == list(range(15, 30))
    assert all(e["stages"]["delta_mult"] is None for e in report["layers"])  # branch off, shown as "off"
    assert_first(report, 20, "delta_add")
    assert " off" in debug_nan.render(report)


# ----------------------------------------------------------------------------- (3) poisoned checkpoints
POISON = {"A_proj": "low_rank", "B_add": "delta_add", "B_mult": "delta_mult"}


def poisoned_checkpoint(model, path: Path, layer: int, tensor: str) -> Path:
    npt.save_adapters(model, path)
    weights = path / npt.WEIGHTS_NAME
    state = load_file(str(weights))
    state[f"layers.{layer}.{tensor}.weight"][1, 2] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("tensor", list(POISON))
def test_poisoned_checkpoint_names_first_affected_stage(npt_model, embedded, tmp_path, tensor):
    ckpt = poisoned_checkpoint(npt_model, tmp_path / "ckpt", 11, tensor)
    model = npt.load_adapters(copy.deepcopy(embedded[0]), ckpt)
    assert_first(debug_nan.inspect_model(model, embedded[1]), 11, POISON[tensor])


def test_poisoned_checkpoint_cli_4bit(npt_model, tmp_path):
    ckpt = poisoned_checkpoint(npt_model, tmp_path / "checkpoint-100", 4, "B_add")
    proc = run_cli("--checkpoint", str(ckpt), "--use_quantization")
    assert proc.returncode == 1, proc.stderr
    assert verdict(proc.stdout) == "first non-finite: layer 4 stage delta_add"
    assert "checkpoint: " + str(ckpt) in proc.stdout and "4-bit" in proc.stdout


# ----------------------------------------------------------------------------- (4) bad input
def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs_subprocess():
    proc = run_cli("--inject_nan", "3:nonsense")
    assert_one_line_error(proc.returncode, proc.stderr, "--inject_nan", "3:nonsense")
    assert proc.stdout == ""
    proc = run_cli("--model_name", "/nonexistent/model/dir")
    assert_one_line_error(proc.returncode, proc.stderr, "/nonexistent/model/dir")


@pytest.mark.parametrize("args, fragments", [
    (["--inject_nan", "3"], ["LAYER:STAGE"]),
    (["--inject_nan", "x:attn_out"], ["LAYER:STAGE"]),
    (["--inject_nan", "-1:attn_out"], ["LAYER:STAGE"]),
    (["--checkpoint", "/nonexistent/ckpt"], ["--checkpoint", "/nonexistent/ckpt"]),
    (["--checkpoint", "/nonexistent/ckpt", "--adapter_rank", "4"], ["--adapter_rank", "--checkpoint"]),
    (["--adapter_rank", "0"], ["rank"]),
    (["--npt_layers", "banana"], ["banana"]),
    (["--json", "/nonexistent/dir/report.json"], ["--json"]),
    (["--no_such_flag"], ["--no_such_flag"]),
    (["--inject_nan", "99:attn_out"], ["layer 99", "0-29"]),  # needs the model: after loading, before the forward
    (["--safe_mode", "--inject_nan", "2:delta_mult"], ["delta_mult", "off"]),
    (["--npt_layers", "0-40"], ["0-40"]),
    (["--adapter_rank", "10000"], ["rank"]),
])
def test_bad_inputs_in_process(capsys, args, fragments):
    code, out, err = run_in_process(capsys, *args)
    assert_one_line_error(code, err, *fragments)
    assert "first non-finite" not in out


def test_corrupt_checkpoint_is_one_line(capsys, tmp_path, npt_model):
    npt.save_adapters(npt_model, tmp_path)
    (tmp_path / npt.WEIGHTS_NAME).write_bytes(b"not safetensors")
    code, _, err = run_in_process(capsys, "--checkpoint", str(tmp_path))
    assert_one_line_error(code, err, "--checkpoint", "corrupt")


def test_stats_match_an_independent_forward(npt_model, embedded):
    """layer_out / input_norm stats agree with output_hidden_states and a hand-made RMSNorm, real tokens only."""
    tokenizer = embedded[1]
    texts = ["A short one.", "A somewhat longer text, so that the first one is padded."]
    report = debug_nan.inspect_model(npt_model, tokenizer, texts)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        hidden = npt_model(**enc, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(NUM_LAYERS):
        stats = report["layers"][i]["stages"]
        if i < NUM_LAYERS - 1:  # the last entry of hidden_states is after the final norm
            h = hidden[i + 1][real].double()
            assert stats["layer_out"]["numel"] == h.numel()
            assert stats["layer_out"]["min"] == pytest.approx(h.min().item(), rel=1e-5)
            assert stats["layer_out"]["max"] == pytest.approx(h.max().item(), rel=1e-5)
            assert stats["layer_out"]["mean_abs"] == pytest.approx(h.abs().mean().item(), rel=1e-4)
        norm = npt_model.model.layers[i].layer.input_layernorm
        x = hidden[i][real].double()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
        assert stats["input_norm"]["max"] == pytest.approx(x.max().item(), rel=1e-4)
        assert stats["input_norm"]["mean_abs"] == pytest.approx(x.abs().mean().item(), rel=1e-4)


# ----------------------------------------------------------------------------- --max_length and the model's positions
def measured_run(args: list, timeout=120) -> tuple[subprocess.CompletedProcess, float, int]:
    """debug_nan.py as a process: (the result, seconds, its peak resident memory in bytes, from a fresh parent
    whose only child it is)."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
             "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
             "sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "debug_nan.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    seconds, peak = proc.stdout.splitlines()[-1].split()
    return proc, float(seconds), int(peak)


@pytest.mark.parametrize("max_length", [100000, 2000, 513])
def test_max_length_past_the_models_positions_is_one_line_within_seconds(tiny_llama_dir, max_length):
    """Before: 100000 with a long text grew to 22.6 GB and was OOM-killed; 2000 ran past the 512 positions silently."""
    proc, seconds, peak = measured_run(["--model_name", str(tiny_llama_dir), "--max_length", str(max_length),
                                        "--text", "the lazy dog " * 9000])  # ~27000 tokens
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f"error: --max_length {max_length} exceeds the model's 512 positions (max_position_embeddings):"
                        " use --max_length 512 or less")
    assert seconds < 60 and peak < 1e9, (seconds, peak)


def test_the_default_max_length_stays_within_a_short_models_positions(tmp_path, tiny_llama_dir):
    """A model of 16 positions: the default (256) becomes 16, and a long --text is cut there."""
    import shutil

    model = tmp_path / "short"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    report = tmp_path / "report.json"
    proc = run_cli("--model_name", str(model), "--text", "the lazy dog " * 100, "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(report.read_text())["num_tokens"] == 16
