#!/usr/bin/env python
"""KL training from the exact target's closed-form start on smollm2-135m, all layers converted: does the held-out KL
fall from step 0, at which learning rate, at which rank?

The teacher's moments (npt_tools.closed_form.teacher_moments over layer_fit.py's 64 training windows) are gathered
once (--moments FILE caches them); for each rank and learning rate the converted model starts in closed form and takes
--steps optimizer steps of the trainer's own step (npt_tools.step.optimizer_step: objective kl, AdamW, 4 x 128 tokens
a step, clipping at 0.5, --warmup steps of linear warmup then linear decay) on fresh windows, and is scored every
--every steps on 8 held-out windows: KL(teacher || student), perplexity ratio and top-1 agreement.

    python -m benchmarks.exact_lr --run 64:1e-3 --run 64:3e-3 --run 128:3e-4 --moments /tmp/moments.pt
"""
from __future__ import annotations

import json
import os
import time

import click
import torch

import npt
from benchmarks.common import HELD_OUT, agreement, moments, windows
from npt_tools.closed_form import STARTS, init_exact
from npt_tools.models import EMBEDDED_MODEL, load_base_model
from npt_tools.objective import next_token_kl
from npt_tools.step import optimizer_step


def score(model, held: torch.Tensor) -> dict:
    """Held-out KL(teacher || student), perplexity ratio and top-1 agreement."""
    with torch.no_grad():
        student = model(input_ids=held, use_cache=False).logits
        with npt.npt_disabled(model):
            teacher = model(input_ids=held, use_cache=False).logits
    a = agreement(model, held)
    return {"kl": next_token_kl(student, teacher).item(), "ratio": a["student_ppl"] / a["teacher_ppl"],
            "agreement": a["agreement"]}


def run(model, stats, rank, lr, start, steps, warmup, every, train, held) -> list[dict]:
    if hasattr(model, "npt_config"):  # converted at another rank before
        npt.unconvert(model)
    torch.manual_seed(0)
    npt.convert_to_npt(model, npt.NPTConfig(rank=rank, modulation_target="exact"))
    init_exact(model, moments=stats, start=start)
    params = npt.get_adapter_params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * max(0.0, 1 - s / steps))
    rows = [{"rank": rank, "lr": lr, "start": start, "step": 0, **score(model, held)}]
    print(json.dumps(rows[-1]), flush=True)
    t0 = time.time()
    for s in range(steps):
        group = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in train[4 * s:4 * s + 4].split(2)]
        optimizer_step(model, opt, sched, group, 0.5, "kl", 0.0)
        if (s + 1) % every == 0 or s + 1 == steps:
            rows.append({"rank": rank, "lr": lr, "start": start, "step": s + 1, **score(model, held),
                         "seconds_per_step": (time.time() - t0) / (s + 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


@click.command()
@click.option("--run", "runs", multiple=True, required=True, help="RANK:LEARNING_RATE, repeatable.")
@click.option("--start", type=click.Choice(list(STARTS)), default="fisher", show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--every", type=int, default=10, show_default=True)
@click.option("--moments", "moments_file", default=None, help="Cache of the teacher's moments (read if it exists).")
def main(runs, start, steps, warmup, every, moments_file):
    model, tok = load_base_model(EMBEDDED_MODEL)
    model.eval().requires_grad_(False)
    ids = windows(tok, 128, 64 + HELD_OUT + 4 * steps)
    train, held = ids[64 + HELD_OUT:], ids[64:64 + HELD_OUT][:8]
    if moments_file and os.path.exists(moments_file):
        stats = torch.load(moments_file)
    else:
        npt.convert_to_npt(model, npt.NPTConfig(rank=1, modulation_target="exact"))
        stats = moments(model, ids[:64])
        if moments_file:
            torch.save(stats, moments_file)
    pairs = [(int(r), float(lr)) for r, lr in (spec.split(":") for spec in runs)]
    rows = [row for r, lr in pairs for row in run(model, stats, r, lr, start, steps, warmup, every, train, held)]
    print("| rank | lr | held-out KL, step 0 -> end | ppl ratio | top-1 agreement |")
    print("| --- | --- | --- | --- | --- |")
    for r, lr in pairs:
        mine = [x for x in rows if (x["rank"], x["lr"]) == (r, lr)]
        first, last = mine[0], mine[-1]
        print(f"| {r} | {lr:g} | {first['kl']:.4g} -> {last['kl']:.4g} | {first['ratio']:.3f}x -> {last['ratio']:.3f}x"
              f" | {first['agreement']:.3f} -> {last['agreement']:.3f} |")


if __name__ == "__main__":
    main()
