#!/usr/bin/env python
"""How near can a rank-r linear code of each attention output bring smollm2-135m to its teacher? The exact target's
fisher start is the best rank-r code under the second-order model KL = sum over layers of 1/2 E[e^T M e] (e the
error of the code, M the Fisher metric at the attention output, a and g apart); this compares that model with what
is measured, all 30 layers converted, on layer_fit.py's 16 held-out windows:

- floor: the model's KL for the start's own moments (64 training windows), the sum over layers of half the
  Fisher-weighted variance the code misses (the least any rank-r code can have under the model, in sample);
- held-out model: the same sum with the held-out windows' moments (another draw of y), the start fixed;
- single layers: the measured KL with one layer converted at a time, summed over layers;
- all layers: the measured KL with every layer converted, and its perplexity ratio and top-1 agreement.

    python -m benchmarks.exact_floor --rank 64 --rank 128
"""
from __future__ import annotations

import json
import sys

import click
import torch

import npt
from benchmarks.common import HELD_OUT, agreement, moments, windows
from npt_tools.closed_form import init_exact
from npt_tools.models import EMBEDDED_MODEL, load_base_model
from npt_tools.objective import next_token_kl


def model_kl(stats: dict, model) -> float:
    """Sum over NPT layers of 1/2 tr(M (I - P) C' (I - P)^T), P = B A_proj the code, C' the second moment of a - mu
    (mu the code's), M the metric of `stats` (attention_moments with gradients)."""
    total = 0.0
    for layer in npt.npt_layers(model):
        n, s, outer, grad_n, grad_outer = stats[layer.layer_idx]
        ad = layer.adapter
        mu = ad.mu.double()
        second = outer / n - torch.outer(s / n, mu) - torch.outer(mu, s / n) + torch.outer(mu, mu)
        residual = torch.eye(len(mu), dtype=mu.dtype) - ad.B.weight.double() @ ad.A_proj.weight.double()
        total += 0.5 * torch.trace(grad_outer / grad_n @ residual @ second @ residual.T).item()
    return total


@torch.no_grad()
def measured_kl(model, held: torch.Tensor) -> float:
    student = model(input_ids=held, use_cache=False).logits
    with npt.npt_disabled(model):
        teacher = model(input_ids=held, use_cache=False).logits
    return next_token_kl(student, teacher).item()


@click.command()
@click.option("--rank", "ranks", type=int, multiple=True, default=(64, 128), show_default=True)
@click.option("--single/--no-single", default=True, show_default=True, help="Also one layer at a time (slow).")
def main(ranks, single):
    model, tok = load_base_model(EMBEDDED_MODEL)
    model.eval().requires_grad_(False)
    ids = windows(tok, 128, 64 + HELD_OUT)
    train, held = ids[:64], ids[64:]
    npt.convert_to_npt(model, npt.NPTConfig(rank=1, modulation_target="exact"))
    stats = moments(model, train)
    held_stats = moments(model, held, seed=1)  # another draw of y
    print("| rank | floor (model, in sample) | model, held-out | single layers, summed | all layers | ppl ratio | "
          "top-1 agreement |\n| --- | --- | --- | --- | --- | --- | --- |")
    for rank in ranks:
        npt.unconvert(model)
        npt.convert_to_npt(model, npt.NPTConfig(rank=rank, modulation_target="exact"))
        init_exact(model, moments=stats)
        row = {"rank": rank, "floor": model_kl(stats, model), "held_out_model": model_kl(held_stats, model),
               "all_layers": measured_kl(model, held), **agreement(model, held)}
        if single:
            layers = npt.npt_layers(model)
            row["single_layers"] = 0.0
            for one in layers:
                for layer in layers:
                    layer.npt_enabled = layer is one
                row["single_layers"] += measured_kl(model, held)
            for layer in layers:
                layer.npt_enabled = True
        print(json.dumps(row), file=sys.stderr, flush=True)
        single_sum = row.get("single_layers", float("nan"))
        print(f"| {rank} | {row['floor']:.4f} | {row['held_out_model']:.4f} | {single_sum:.4f}"
              f" | {row['all_layers']:.4f} | {row['student_ppl'] / row['teacher_ppl']:.3f}x | {row['agreement']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
