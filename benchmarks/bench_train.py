#!/usr/bin/env python
"""Per-optimizer-step time and peak memory of NPT training objectives, side by side.

    layerwise   one teacher forward (npt_disabled) + each NPT layer's MLP on the teacher's input
    end_to_end  one teacher forward + one student forward/backward through the whole model
    kl          the exact target's step (the trainer's default): teacher and student forwards to the logits, the
                next-token KL, backward through the whole student (--rank: the exact code's rank)
    seed        the seed trainer's way: a second full model copy as teacher, the student forward
                run twice (the first result thrown away), backward through the whole student

Each variant runs in its own process so that peak memory is its own. On CPU, memory is the
peak resident set size during the steps (VmHWM, reset once the model is built) above the process's
footprint after `import torch` (models included); on CUDA it is torch.cuda.max_memory_allocated.
"model MB" is what the built, converted model holds (CPU: resident; CUDA: memory_allocated).

    python -m benchmarks.bench_train                          # smollm2-135m, 256 tokens, CPU
    python -m benchmarks.bench_train --model llama8b-random --device cuda --dtype bf16 --seq_len 2048
    python -m benchmarks.bench_train --target down --variants layerwise,end_to_end   # the down target
    python -m benchmarks.bench_train --variants kl --rank 384 --seq_len 512          # the exact target's kl step
    python -m benchmarks.bench_train --rank 384 --variants kl --checkpointing both   # with and without checkpointing
    python -m benchmarks.bench_train --model llama8b-random --device cuda --dtype nf4 --variants kl
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # each variant's process runs from here
VARIANTS = ("layerwise", "end_to_end", "seed", "kl")


def build_model(name: str, dtype, device, quantize: bool = False):
    from npt_tools.models import load_base_model
    from npt_tools.scale import SHAPES, random_llama

    if name == "llama8b-random":  # Llama-3.1-8B shapes, random weights: no download
        shape = SHAPES["llama-3.1-8b"]
        return random_llama(shape, dtype=dtype, device=device, quantize=quantize), shape.vocab
    model, tok = load_base_model(name, use_quantization=quantize, dtype=None if quantize else dtype, device=device)
    return model, len(tok)


def run_variant(variant: str, model_name: str, seq_len: int, steps: int, device: str, dtype_name: str, rank: int,
                target: str = "gate", checkpointing: bool = False):
    import copy

    import torch
    import npt
    from npt_tools.models import gradient_checkpointing
    from npt_tools.scale import reset_peak_rss, rss_mb
    from npt_tools.objective import equivalence_loss, normalized_mse

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "nf4": torch.float32}[dtype_name]
    cuda = device.startswith("cuda")
    base_mb = rss_mb()
    model, vocab = build_model(model_name, dtype, device, quantize=dtype_name == "nf4")
    teacher = copy.deepcopy(model) if variant == "seed" else None  # the seed loads the model twice
    target = {"seed": "gate", "kl": "exact"}.get(variant, target)  # the seed's own form; kl: the exact target
    npt.convert_to_npt(model, npt.NPTConfig(rank=rank, modulation_target=target))
    gradient_checkpointing(model, checkpointing)
    model_mb = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb() - base_mb
    if not cuda:
        reset_peak_rss()  # the peak below is the steps' (loading may peak above what it keeps)
    params = npt.get_adapter_params(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def seed_step():
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=True).hidden_states[-1]
        model(**batch)  # the seed ran the student forward once and threw the result away
        s = model(**batch, output_hidden_states=True).hidden_states[-1]
        return normalized_mse(s, t, batch["attention_mask"]) + 0.01 * npt.regularization(model)

    times = []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = seed_step() if variant == "seed" else equivalence_loss(model, batch, objective=variant).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM") - base_mb
    return {"variant": variant, "target": target, "checkpointing": checkpointing, "step_s": statistics.median(times),
            "peak_mb": peak, "model_mb": model_mb}


@click.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="smollm2-135m, a hub id / local path, or llama8b-random (Llama-3.1-8B shapes).")
@click.option("--seq_len", default=256, show_default=True)
@click.option("--steps", default=5, show_default=True, help="Timed optimizer steps (median reported).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", "dtype_name", type=click.Choice(["fp32", "bf16", "fp16", "nf4"]), default="fp32",
              show_default=True, help="nf4: 4-bit NF4 with fp32 compute, as the trainer's --use_quantization.")
@click.option("--rank", default=16, show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--target", type=click.Choice(["gate", "down", "gate+down", "exact"]), default="gate", show_default=True,
              help="The NPT modulation target (the seed variant always measures its own gate form).")
@click.option("--checkpointing", type=click.Choice(["off", "on", "both"]), default="off", show_default=True,
              help="Gradient checkpointing of the NPT layers (npt_tools.models.gradient_checkpointing); both: a row "
                   "each.")
@click.option("--json", "json_path", default=None, help="Also write the rows to this JSON file.")
@click.option("--_child", hidden=True, default=None)
def main(model_name, seq_len, steps, device, dtype_name, rank, variants, target, checkpointing, json_path, _child):
    if _child:
        variant, _, on = _child.partition(":")
        print(json.dumps(run_variant(variant, model_name, seq_len, steps, device, dtype_name, rank, target,
                                     on == "on")))
        return
    rows = []
    for v in variants.split(","):
        for on in (("off", "on") if checkpointing == "both" else (checkpointing,)):
            cmd = [sys.executable, "-m", "benchmarks.bench_train", "--model", model_name, "--seq_len", str(seq_len), "--steps", str(steps),
                   "--device", device, "--dtype", dtype_name, "--rank", str(rank), "--target", target,
                   "--_child", f"{v}:{on}"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    seed = next((r for r in rows if r["variant"] == "seed"), None)
    mem = "peak MB (RSS above import)" if device == "cpu" else "peak MB (max_memory_allocated)"
    print(f"\n{model_name}, {seq_len} tokens, {device}, {dtype_name}, rank {rank}, target {target}, "
          f"median of {steps} steps\n")
    print(f"| objective | checkpointing | step time (s) | {mem} | model MB | time vs seed | memory vs seed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rt = f"{r['step_s'] / seed['step_s']:.2f}x" if seed else "-"
        rm = f"{r['peak_mb'] / seed['peak_mb']:.2f}x" if seed else "-"
        print(f"| {r['variant']} | {'on' if r['checkpointing'] else 'off'} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | "
              f"{r['model_mb']:.0f} | {rt} | {rm} |")


if __name__ == "__main__":
    main()
