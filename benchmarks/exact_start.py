#!/usr/bin/env python
"""The exact target's closed-form start, no training: how close the converted smollm2-135m is to its teacher
at each code rank.

The teacher's attention moments of every chosen layer are gathered once (npt_tools.closed_form.attention_moments over the real
tokens of packed 128-token windows of the builtin corpus), then for each rank init_exact sets the
principal directions and the converted model is scored on held-out windows (layer_fit.py's: perplexity and
top-1 agreement against the teacher's, and each layer's update error on its own trajectory).

    python benchmarks/exact_start.py --layers all --rank 16 --rank 64 --rank 128 --rank 256
"""
from __future__ import annotations

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import npt  # noqa: E402
from npt_tools.closed_form import init_exact, teacher_attention_moments  # noqa: E402
from npt_tools.models import EMBEDDED_MODEL, load_base_model  # noqa: E402
from npt_tools.objective import equivalence_loss  # noqa: E402
from layer_fit import HELD_OUT, agreement, windows  # noqa: E402


def moments(model, ids: torch.Tensor, batch: int = 8) -> dict:
    """{layer_idx: attention moments} of the teacher over the windows `ids`."""
    return teacher_attention_moments(model, ({"input_ids": c, "attention_mask": torch.ones_like(c)}
                                                 for c in ids.split(batch)))


@click.command()
@click.option("--layers", default="all", show_default=True, help="NPT layers, as --npt_layers takes them.")
@click.option("--rank", "ranks", type=int, multiple=True, default=(16, 64, 128, 256), show_default=True)
@click.option("--windows", "n_windows", type=int, default=64, show_default=True,
              help="128-token windows the start is computed from (the trainer's --init_batches 32 x 2).")
@click.option("--json", "json_file", default=None, help="Also write the rows to this file.")
def main(layers, ranks, n_windows, json_file):
    model, tok = load_base_model(EMBEDDED_MODEL)
    model.eval().requires_grad_(False)
    ids = windows(tok, 128, n_windows + HELD_OUT)
    held = ids[-HELD_OUT:]
    rows = []
    stats = None
    for rank in ranks:
        npt.convert_to_npt(model, npt.NPTConfig(rank=rank, layers=layers, modulation_target="exact"))
        t0 = time.time()
        stats = stats or moments(model, ids[:-HELD_OUT])
        kept = init_exact(model, moments=stats)
        seconds = time.time() - t0
        with torch.no_grad():
            errors = equivalence_loss(model, {"input_ids": held, "attention_mask": torch.ones_like(held)},
                                          "end_to_end", 0.0).layer_fit
        row = {"layers": layers, "rank": rank, **agreement(model, held),
               "variance_kept": sum(kept.values()) / len(kept),
               "update_error_own_trajectory": errors.mean().item(), "start_seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for i, layer in enumerate(model.model.layers):  # back to the plain model for the next rank
            if isinstance(layer, npt.NPTLayer):
                model.model.layers[i] = layer.layer
        del model.npt_config
    if json_file:
        with open(json_file, "w") as f:
            json.dump(rows, f, indent=1)
    print("| layers | rank | variance kept | student ppl (teacher) | ratio | top-1 agreement | update error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['layers']} | {r['rank']} | {r['variance_kept']:.3f} | "
              f"{r['student_ppl']:.2f} ({r['teacher_ppl']:.2f}) "
              f"| {r['student_ppl'] / r['teacher_ppl']:.3f}x | {r['agreement']:.3f} | "
              f"{r['update_error_own_trajectory']:.4f} |")


if __name__ == "__main__":
    main()
