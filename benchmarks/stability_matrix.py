#!/usr/bin/env python
"""The stability matrix: non-finite training steps per seed and precision, this project's configuration
against the seed's original one, on smollm2-135m.

Each cell trains the adapters of the chosen NPT layers for --steps optimizer steps with the layerwise
objective (each layer on the teacher's input) on packed windows of the builtin corpus, and counts the
steps whose loss or adapter gradient was not finite.

- fixed: this project. Factor 0.5 + sigmoid(m), A_proj ~ N(0, 0.02), B_add ~ N(0, 0.001), add scale 0.1;
  optimizer_step: the update-error loss, clipping at 0.5, a non-finite micro-batch skipped, a step that
  blows the weights up undone (a step counts as non-finite when any of that happened).
- original: the seed's first version, as docs/NPT_FIX_SUMMARY.md describes it. Factor 1 + tanh(m) (it
  reaches 0), A_proj with nn.Linear's Kaiming init, B_add ~ N(0, 0.01), no add scale, plain MSE between
  the student's and the teacher's hidden states, its regularizer (sum over F of the squared codes, in the
  forward's precision), no clipping, no skipping (backward, step), and with a 4-bit base the fp16 autocast
  that --use_quantization --use_fp16 together gave.

Precisions: fp32; bf16 and fp16 (the base's weights in that dtype, adapters fp32); 4bit (NF4 base, fp32
compute; original: + fp16 autocast).

    python -m benchmarks.stability_matrix --lr 1e-1          # the lr where the original fails (RESULTS.md)
    python -m benchmarks.stability_matrix --lr 3e-2 --configs original --precisions 4bit,fp16
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
import types
from unittest import mock

import click
import torch
import torch.nn as nn
import torch.nn.functional as F

import npt
from benchmarks.common import windows
from npt_tools.inspection import tanh_factor  # the seed's 1 + tanh(m) factor, a demonstration
from npt_tools.models import EMBEDDED_MODEL, load_base_model
from npt_tools.objective import run_captured
from npt_tools.step import optimizer_step, weights_finite

KERNEL = sys.modules["npt_kernels.modulated_swiglu"]  # where modulated_gate looks the factor up

PRECISIONS = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "fp16": {"use_fp16": True},
              "4bit": {"use_quantization": True}}


def build(precision: str, config: str, layers: str, seed: int):
    model, tokenizer = load_base_model(EMBEDDED_MODEL, **PRECISIONS[precision])
    torch.manual_seed(seed)
    npt.convert_to_npt(model, npt.NPTConfig(modulation_target="gate",
                                            rank=16, layers=layers, add_scale=1.0 if config == "original" else 0.1))
    if config == "original":  # the seed's first initialisation
        for layer in npt.npt_layers(model):
            layer.adapter.A_proj.reset_parameters()  # nn.Linear's Kaiming-uniform default
            nn.init.normal_(layer.adapter.B_add.weight, std=0.01)
    model.eval()
    return model, tokenizer


def seed_regularizer(layer, attn: torch.Tensor) -> torch.Tensor:
    """The seed's regularizer of one layer: mean over tokens of sum over F of a^2 + m^2, in whatever
    precision the forward runs (fp16 under autocast), as its code computed it."""
    ad = layer.adapter
    z = ad.A_proj(attn.float())
    return (ad.B_add(z).square().sum(-1) + ad.B_mult(z).square().sum(-1)).mean()


def original_step(model, optimizer, batch: dict, autocast, lam: float) -> str | None:
    """The seed's first training step: plain MSE of the layers' outputs, its regularizer, no clipping, no
    skipping. What was not finite ("loss", "gradient"), or None."""
    with autocast():
        teacher, _ = run_captured(model, batch, ("input", "attn", "output"), teacher=True)
        fit, reg = [], []
        for layer in npt.npt_layers(model):
            t = teacher[layer.layer_idx]
            fit.append(F.mse_loss(layer.modulated_mlp(t["input"], t["attn"]).float(), t["output"].float()))
            reg.append(seed_regularizer(layer, t["attn"]))
        loss = torch.stack(fit).mean() + lam * torch.stack(reg).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = npt.get_adapter_params(model)
    grads = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    optimizer.step()
    return "loss" if not bool(torch.isfinite(loss)) else None if grads else "gradient"


def run_cell(config: str, precision: str, seed: int, args) -> dict:
    model, tokenizer = build(precision, config, args.layers, seed)
    data = windows(tokenizer, args.tokens, args.steps * args.batch)
    params = npt.get_adapter_params(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    fp16_autocast = config == "original" and precision == "4bit"
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.float16)) if fp16_autocast else contextlib.nullcontext)
    factor = (mock.patch.object(KERNEL, "modulation_factor", tanh_factor)
              if config == "original" else contextlib.nullcontext())
    bad, t0 = collections.Counter(), time.time()
    with factor:
        for step in range(args.steps):
            ids = data[(step * args.batch) % len(data):][:args.batch]
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if config == "original":
                what = original_step(model, optimizer, batch, autocast, args.lam)
            else:
                out = optimizer_step(model, optimizer, scheduler, [batch], regularization_lambda=args.lam)
                what = next(iter(out.reasons.values()), "step") if out.skipped or not out.stepped else None
            if what:
                bad[what] += 1
    finite = weights_finite(params, optimizer)
    return {"bad": sum(bad.values()), "what": bad, "finite_end": finite, "seconds": time.time() - t0}


@click.command()
@click.option("--steps", default=100, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--precisions", default="fp32,bf16,fp16,4bit", show_default=True)
@click.option("--configs", default="fixed,original", show_default=True)
@click.option("--lr", default=3e-3, show_default=True, help="Adam learning rate, both configurations.")
@click.option("--lam", default=0.01, show_default=True, help="Regularization lambda.")
@click.option("--layers", default="0-7", show_default=True,
              help="NPT layers (as --npt_layers); forwards stop after the last, so few low layers run fast.")
@click.option("--tokens", default=64, show_default=True, help="Tokens per window.")
@click.option("--batch", default=1, show_default=True, help="Windows per step.")
def main(**kw):
    """Count non-finite steps per (configuration, precision, seed); prints a markdown table."""
    args = types.SimpleNamespace(**kw)
    seeds = [int(s) for s in kw["seeds"].split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"steps {args.steps}, lr {args.lr}, lambda {args.lam}, layers {args.layers}, "
          f"{args.batch} x {args.tokens} tokens per step; non-finite steps per seed {seeds}", flush=True)
    print("| configuration | precision | " + " | ".join(f"seed {s}" for s in seeds)
          + " | what was non-finite | weights finite at the end |")
    print("| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |")
    for config in kw["configs"].split(","):
        for precision in kw["precisions"].split(","):
            cells = [run_cell(config, precision, s, args) for s in seeds]
            ends = "yes" if all(c["finite_end"] for c in cells) else "no (" + ", ".join(
                str(s) for s, c in zip(seeds, cells) if not c["finite_end"]) + ")"
            what = sum((c["what"] for c in cells), collections.Counter())
            print(f"| {config} | {precision} | " + " | ".join(str(c["bad"]) for c in cells)
                  + f" | {', '.join(f'{k} {v}' for k, v in what.items()) or '-'} | {ends} |"
                  + f"  <!-- {sum(c['seconds'] for c in cells):.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
