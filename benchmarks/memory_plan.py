#!/usr/bin/env python
"""What a whole NPT run takes at Llama-3.1-8B and 70B size, on one GPU: measured on the real layer shapes with a few
layers, short sequences and random weights (npt_tools.scale), extrapolated in the layer count and the sequence length.

`measure` runs each configuration in its own process: the model (random_llama, converted to the exact target at the
trainer's default rank 384), then the peak resident memory (Linux VmHWM, reset after the model is built and between
phases) of each phase, above the built model:
  start  the fisher start's teacher pass with its backward (as for the first --init_gradient_batches) over a second
         batch, the moments summed in place on the CPU since the first (counted: moments_mb)
  step   then two trainer steps (npt_tools.step.optimizer_step, kl objective, AdamW): activations, logits, the
         backward, gradients, optimizer state, the step's snapshot for undo
  solve  (one run) the start, then init_exact's per-layer float64 solve of its moments
`table` fits peak = a + b * layers from the 1- and 2-layer runs at each length (a and b linear in the tokens, from
128 and 256), checks the fit against the 4- and 8-layer runs and a 512-token run, and prints the plan for the full
models in RESULTS' form.

    python -m benchmarks.memory_plan measure                 # every configuration not in memory_plan.jsonl yet
    python -m benchmarks.memory_plan measure --only 70b      # the 70B-shaped rehearsal of the start only
    python -m benchmarks.memory_plan table                   # the plan, from memory_plan.jsonl
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # each configuration's process runs from here
from npt_tools.scale import SHAPES, adapter_params, reset_peak_rss, rss_mb, weight_bytes  # noqa: E402
RESULTS = Path(__file__).with_name("memory_plan.jsonl")
RANK = 384  # the exact target's default rank (npt_tools.arguments.EXACT_RANK)
SMALL_VOCAB = 32000  # the 70B-shaped rehearsal: the per-layer slope does not depend on the vocabulary


def grid() -> list[dict]:
    """The measured configurations, the most needed first: the fit's (1 and 2 layers at 128 and 256 tokens) and its
    checks (4 and 8 layers, 512 tokens) per precision and checkpointing; the 70B-shaped rehearsal of the start; the
    solve at 8B's width."""
    out = []

    def add(phase, precision, checkpointing, layers, seq, shape="llama-3.1-8b", vocab=None):
        out.append({"shape": shape, "phase": phase, "precision": precision, "checkpointing": checkpointing,
                    "layers": layers, "seq": seq, "vocab": vocab})

    fit_runs = ((1, 128), (2, 128), (1, 256), (2, 256))
    for checkpointing in (False, True):
        for layers, seq in (*fit_runs, (8, 128)):
            add("run", "bf16", checkpointing, layers, seq)
    add("run", "bf16", False, 2, 512)
    for layers in (1, 2, 3):
        add("start", "nf4", True, layers, 128, "llama-3.1-70b", SMALL_VOCAB)
    for checkpointing in (False, True):
        for layers, seq in fit_runs:
            add("run", "nf4", checkpointing, layers, seq)
    add("run", "nf4", False, 4, 128)
    add("solve", "bf16", False, 1, 128)
    for checkpointing in (False, True):  # bf16: the fit from 2 and 4 layers, checked at 1 and 8
        for seq in (128, 256):
            add("run", "bf16", checkpointing, 4, seq)
    return out


def _key(c: dict) -> str:
    return json.dumps({k: c[k] for k in ("shape", "phase", "precision", "checkpointing", "layers", "seq", "vocab")},
                      sort_keys=True)


class Memory:
    """Memory in MiB of `device`: CPU the resident set (VmRSS, its peak VmHWM), CUDA torch's allocated tensors."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def now(self) -> float:
        return self.torch.cuda.memory_allocated() / 2 ** 20 if self.cuda else rss_mb()

    def peak(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else rss_mb("VmHWM")

    def reset(self) -> float:
        """Starts a new peak; the seconds clock of a phase starts after it."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        return time.perf_counter()

    def seconds(self, t0: float) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0


def run_phase(c: dict) -> dict:
    """One configuration, in this process: its peak memory above the built model, and its seconds."""
    import torch

    import npt
    from npt_tools.closed_form import init_exact, moments_device, teacher_moments
    from npt_tools.models import gradient_checkpointing
    from npt_tools.scale import random_llama
    from npt_tools.step import optimizer_step

    device = c.get("device", "cpu")
    torch.set_num_threads(1)
    shape, mem = SHAPES[c["shape"]], Memory(device)
    torch.manual_seed(0)
    model = random_llama(shape, c["layers"], dtype=torch.bfloat16, device=device, vocab=c["vocab"],
                         quantize=c["precision"] == "nf4")
    npt.convert_to_npt(model, npt.NPTConfig(rank=min(RANK, shape.d_model), modulation_target="exact"))
    gradient_checkpointing(model, c["checkpointing"])
    ids = torch.randint(0, c["vocab"] or shape.vocab, (c.get("batch", 1), c["seq"]), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = {**c, "model_mb": mem.now()}
    t0 = mem.reset()
    if c["phase"] != "step":
        where, clock = "cpu" if device == "cpu" else moments_device(model), [t0]

        def two_batches():  # the second batch is measured: the moments are there from the first one on
            yield batch
            clock[0] = mem.reset()
            yield batch

        stats = teacher_moments(model, two_batches(), "fisher", device=where)
        t0 = clock[0]
        out["moments_device"] = str(where)
        out["moments_mb"] = sum(t.numel() * t.element_size() for v in stats.values() for t in v) / 2 ** 20
        out["start_seconds"], out["start_peak_mb"] = mem.seconds(t0), mem.peak() - out["model_mb"]
        if c["phase"] == "solve":
            before = mem.now()
            t0 = mem.reset()
            out["kept"] = min(init_exact(model, moments=stats).values())
            out["solve_seconds"], out["solve_peak_mb"] = mem.seconds(t0), mem.peak() - before
        del stats
        t0 = mem.reset()
    if c["phase"] in ("step", "run"):
        params = npt.get_adapter_params(model)
        opt = torch.optim.AdamW(params, lr=1e-5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        for _ in range(2):
            t0 = time.perf_counter()  # the second step's time: the first allocates the optimizer state
            result = optimizer_step(model, opt, sched, [batch], objective="kl")
        out["finite"] = result.stepped
        out["step_seconds"], out["step_peak_mb"] = mem.seconds(t0), mem.peak() - out["model_mb"]
    return out


def done() -> dict[str, dict]:
    if not RESULTS.is_file():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {_key(r): r for r in rows}


@click.group()
def main():
    """Memory plan of a whole run at Llama-3.1-8B / 70B size (module docstring)."""


@main.command()
@click.option("--only", default="", help="Run only the configurations whose key contains this text (e.g. 70b).")
@click.option("--_child", "child", hidden=True, default=None)
def measure(only, child):
    """Measure every configuration not yet in memory_plan.jsonl, each in its own process, appending there."""
    if child:
        print(json.dumps(run_phase(json.loads(child))))
        return
    have = done()
    for c in grid():
        if _key(c) in have or only not in _key(c):
            continue
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "measure", "--_child", json.dumps(c)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{_key(c)} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{_key(c)}: " + ", ".join(f"{k} {row[k]:.1f}" for k in row if k.endswith(("_mb", "_seconds"))),
              flush=True)


# ----------------------------------------------------------------------------- the model
GPU_GB = 80  # one H100 / A100 80 GB
HEADROOM = 0.9  # what counts as fitting: live tensors <= 90% of it (the CUDA context, the caching allocator's slack)
H100_FLOPS = {"bf16": 989e12, "nf4": 67e12}  # dense peak: bf16 tensor cores; nf4 computes in fp32 (no tensor cores)
UTILISATION = 0.4  # the share of that peak the time column assumes (an assumption, not a measurement)


FIT_LAYERS = (2, 4)  # the layer counts the fit is made from, where measured


def fit(rows: dict, phase: str, precision: str, checkpointing: bool, shape: str = "llama-3.1-8b"):
    """(a, b, measured) with a, b functions of the tokens T: peak(L, T) = a(T) + b(T) L above the built model, MiB;
    from the FIT_LAYERS runs at 128 and 256 tokens where measured (else the 1- and 2-layer ones), linear in T. Where
    b's growth with T is below this measurement's noise it comes from tensor sizes, around the mean of the two
    measured b: with checkpointing a layer keeps its input alone (T x d in the compute dtype); in 4-bit without it,
    bf16's growth twice over (fp32 compute: the same tensors at twice the bytes; a dequantized fp32 weight of 235 MB
    comes and goes at every matmul there). a (the logits, one layer's recompute) stays measured."""
    p = {(r["layers"], r["seq"]): r[f"{phase}_peak_mb"] for r in rows.values() if f"{phase}_peak_mb" in r
         and (r["precision"], r["checkpointing"], r["shape"]) == (precision, checkpointing, shape)}
    lo, hi = FIT_LAYERS if all((n, t) in p for n in FIT_LAYERS for t in (128, 256)) else (1, 2)
    b = {t: (p[hi, t] - p[lo, t]) / (hi - lo) for t in (128, 256)}
    if checkpointing or precision == "nf4":
        if checkpointing:
            kept = SHAPES[shape].d_model * (4 if precision == "nf4" else 2) / 2 ** 20  # MiB per token and layer
        else:  # 4-bit computes in fp32: bf16's tensors at twice the bytes
            bf16 = fit(rows, phase, "bf16", False, shape)[1]
            kept = 2 * (bf16(256) - bf16(128)) / 128
        mean = (b[128] + b[256]) / 2
        b = {128: mean - 64 * kept, 256: mean + 64 * kept}
    a = {t: p[lo, t] - lo * b[t] for t in (128, 256)}

    def line(v):
        return lambda t: v[128] + (v[256] - v[128]) * (t - 128) / 128

    return line(a), line(b), p


def checks(rows: dict) -> list[tuple]:
    """(what, measured MiB, predicted MiB, error) of every run the fit did not use."""
    out = []
    for phase, precision in (("start", "bf16"), ("step", "bf16"), ("start", "nf4"), ("step", "nf4")):
        for gc in (False, True):
            try:
                a, b, p = fit(rows, phase, precision, gc)
            except KeyError:  # not measured (yet)
                continue
            for (layers, t), peak in sorted(p.items()):
                used = FIT_LAYERS if all((n, s) in p for n in FIT_LAYERS for s in (128, 256)) else (1, 2)
                if layers not in used or t not in (128, 256):
                    predicted = a(t) + b(t) * layers
                    out.append((f"{phase} {precision}{' gc' if gc else ''}, {layers} layers, {t} tokens", peak,
                                predicted, predicted / peak - 1))
    return out


def step_flops(shape, tokens: int, checkpointing: bool) -> float:
    """FLOPs of one kl step (batch 1): teacher and student forwards with logits, the student's backward to its
    activations only (the base is frozen: no weight gradients), a second student forward with checkpointing.
    Attention causal (half of T^2); the adapters' matmuls (about 1%) left out."""
    layer = 2 * tokens * shape.layer_params + 2 * tokens ** 2 * shape.d_model
    logits = 2 * tokens * shape.vocab * shape.d_model
    forward = shape.layers * layer + logits
    return forward * (4 if checkpointing else 3)


def start_flops(shape, tokens: int, checkpointing: bool, batches: int = 64, gradient_batches: int = 32) -> float:
    """FLOPs of the closed-form start's passes at the trainer's defaults (--init_batches 64, the metric from the first
    32), one window of `tokens` each: a forward with logits and the backward to the activations (a second forward with
    checkpointing) for each gradient batch, a forward that stops after the last layer for the others. The per-layer
    float64 solves are not in it (device_check.sh times them)."""
    layers = shape.layers * (2 * tokens * shape.layer_params + 2 * tokens ** 2 * shape.d_model)
    logits = 2 * tokens * shape.vocab * shape.d_model
    return gradient_batches * (layers + logits) * (3 if checkpointing else 2) + (batches - gradient_batches) * layers


def plan_row(rows: dict, name: str, precision: str, tokens: int, gc: bool) -> dict:
    """The whole run's GPU memory (GB, live tensors) at full size from the fit, and its modelled step time. Terms:
    weights and adapters from tensor sizes; the step's and the start's memory above them from the 8B-shaped fit
    (a(T) + b(T) L); at 70B the per-layer part twice 8B's (d and F are twice 8B's; the start's measured at 70B's shape
    where the rehearsal ran), the intercept (logits over the same vocabulary) 8B's; the moments on the GPU where
    closed_form.moments_device puts them, else on the CPU with one d x d float64 product at a time on the GPU."""
    shape, gb, mib = SHAPES[name], 1e9, 2 ** 20
    scale = 2 if name == "llama-3.1-70b" else 1
    weights = weight_bytes(shape, precision) / gb
    adapters = shape.layers * adapter_params(shape, RANK) * 4 / gb
    a, b, _ = fit(rows, "step", precision, gc)
    step = (a(tokens) + scale * b(tokens) * shape.layers) * mib / gb
    a_s, b_s, _ = fit(rows, "start", precision, gc)
    layer_moments = 2 * 8 * shape.d_model ** 2  # fisher: C and M, float64, bytes per layer
    moments = layer_moments * shape.layers / gb
    on_gpu = moments <= 0.25 * GPU_GB  # closed_form.moments_device's rule
    pass_slope = b_s(tokens) - 2 * 8 * 4096 ** 2 / mib  # the 8B-shaped slope without its moments (on the CPU there)
    if scale == 2:  # the rehearsal (4-bit, checkpointing, 128 tokens) grown with T as fit() grows a checkpointed b
        measured = rehearsal_slope(rows) if precision == "nf4" and gc else None
        pass_slope = (scale * pass_slope if measured is None
                      else measured + (tokens - 128) * shape.d_model * 4 / mib)
    start = (a_s(tokens) + pass_slope * shape.layers) * mib / gb + (moments if on_gpu else layer_moments / 2 / gb)
    rate = H100_FLOPS[precision] * UTILISATION
    seconds, start_seconds = step_flops(shape, tokens, gc) / rate, start_flops(shape, tokens, gc) / rate
    peak = weights + adapters + max(step, start)
    return {"weights": weights, "adapters": adapters, "start": start, "step": step, "peak": peak,
            "fits": peak <= HEADROOM * GPU_GB, "moments": moments, "moments_where": "GPU" if on_gpu else "CPU",
            "seconds": seconds, "start_seconds": start_seconds, "checkpoint": 3 * adapters,
            "pass_slope_gb": pass_slope * mib / gb}


def rehearsal_slope(rows: dict) -> float | None:
    """MiB per layer of the start's pass at 70B's layer shape (4-bit, checkpointing, 128 tokens): the least-squares
    slope over its runs, their moments (on the CPU there, as at 70B) taken out; None where fewer than 2 ran."""
    p = {r["layers"]: r["start_peak_mb"] - r["moments_mb"] for r in rows.values() if r["shape"] == "llama-3.1-70b"}
    if len(p) < 2:
        return None
    mean_l, mean_p = sum(p) / len(p), sum(p.values()) / len(p)
    return sum((n - mean_l) * (v - mean_p) for n, v in p.items()) / sum((n - mean_l) ** 2 for n in p)


@main.command()
def table():
    """The plan from memory_plan.jsonl: the fit's checks, the 70B rehearsal, and the whole run by model, precision,
    length and checkpointing (markdown, as in RESULTS)."""
    rows = done()
    print("| run the fit did not use | measured MiB | predicted MiB | error |\n| --- | --- | --- | --- |")
    for what, measured, predicted, err in checks(rows):
        print(f"| {what} | {measured:.0f} | {predicted:.0f} | {100 * err:+.1f}% |")
    reh = sorted((r for r in rows.values() if r["shape"] == "llama-3.1-70b"), key=lambda r: r["layers"])
    if reh:
        print("\n| 70B-shaped start (nf4, gc, 128 tokens) | peak MiB above the model | of it moments (CPU) | "
              "the rest |")
        print("| --- | --- | --- | --- |")
        for r in reh:
            print(f"| {r['layers']} layer(s) | {r['start_peak_mb']:.0f} | {r['moments_mb']:.0f} | "
                  f"{r['start_peak_mb'] - r['moments_mb']:.0f} |")
        print(f"\nleast-squares slope of the rest: {rehearsal_slope(rows):.0f} MiB per layer")
    try:
        r = plan_row(rows, "llama-3.1-70b", "nf4", 2048, True)
        print(f"\n70B start, 4-bit, checkpointing, 2048 tokens: {r['pass_slope_gb']:.3f} GB per layer on the GPU "
              f"x 80 = "
              f"{80 * r['pass_slope_gb']:.1f} GB, + the 4-bit model {r['weights']:.1f} GB + adapters "
              f"{r['adapters']:.1f} GB + logits and the rest {r['start'] - 80 * r['pass_slope_gb']:.1f} GB = "
              f"{r['weights'] + r['adapters'] + r['start']:.1f} GB of {GPU_GB}; moments {r['moments']:.0f} GB on the "
              "CPU")
    except KeyError:
        pass
    print("\n| model | weights | T | gc | weights GB | adapters GB | start GB | step GB | peak GB | fits 80 GB | "
          "moments GB (where) | checkpoint GB | start s (model) | step s (model) |\n" + "| --- " * 14 + "|")
    for name in ("llama-3.1-8b", "llama-3.1-70b"):
        for precision in ("bf16", "nf4"):
            for tokens in (2048, 4096):
                for gc in (False, True):
                    try:
                        r = plan_row(rows, name, precision, tokens, gc)
                    except KeyError:  # a configuration not measured (yet)
                        continue
                    print(f"| {name} | {precision} | {tokens} | {'on' if gc else 'off'} | {r['weights']:.1f} | "
                          f"{r['adapters']:.2f} | {r['start']:.1f} | {r['step']:.1f} | {r['peak']:.1f} | "
                          f"{'yes' if r['fits'] else 'no'} | {r['moments']:.1f} ({r['moments_where']}) | "
                          f"{r['checkpoint']:.1f} | {r['start_seconds']:.0f} | {r['seconds']:.2f} |")


@main.command()
@click.option("--shape", type=click.Choice(list(SHAPES)), default="llama-3.1-8b", show_default=True)
@click.option("--phase", type=click.Choice(["step", "start", "solve"]), default="solve", show_default=True)
@click.option("--precision", type=click.Choice(["bf16", "nf4"]), default="bf16", show_default=True)
@click.option("--layers", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--seq", default=2048, show_default=True, type=click.IntRange(min=2))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpointing", is_flag=True, help="Gradient checkpointing of the NPT layers.")
@click.option("--device", default="cuda", show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the result to this JSON file.")
def one(json_path, **c):
    """Measure one configuration in this process (the device check runs it on a GPU: CUDA's allocated memory)."""
    row = run_phase({**c, "vocab": None})
    print(json.dumps(row))
    if json_path:
        Path(json_path).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
