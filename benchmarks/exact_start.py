#!/usr/bin/env python
"""The exact target's closed-form start, no training: how close the converted smollm2-135m is to its teacher
at each code rank, for each start (fisher, pca).

The teacher's moments of every chosen layer are gathered once (npt_tools.closed_form.teacher_moments over packed
128-token windows of the builtin corpus: the attention's and, for fisher, the gradients' at it), then for each rank
and start init_exact sets the code and the converted model is scored on held-out windows of the same corpus
(layer_fit.py's: perplexity and top-1 agreement against the teacher's, and each layer's update error on its own
trajectory) and on windows of an off-domain text (--off_domain, default the GPL-3 licence text).

    python -m benchmarks.exact_start --layers all --rank 16 --rank 64 --rank 128 --rank 256
    python -m benchmarks.exact_start --rank 64 --rank 128 --start fisher --windows 448 --gradient_windows 64
"""
from __future__ import annotations

import json
import time

import click
import torch

import npt
from benchmarks.common import HELD_OUT, agreement, moments, text_windows, windows
from npt_tools.closed_form import STARTS, init_exact
from npt_tools.models import EMBEDDED_MODEL, load_base_model
from npt_tools.objective import equivalence_loss


@click.command()
@click.option("--layers", default="all", show_default=True, help="NPT layers, as --npt_layers takes them.")
@click.option("--rank", "ranks", type=int, multiple=True, default=(16, 64, 128, 256), show_default=True)
@click.option("--start", "starts", type=click.Choice(STARTS), multiple=True, default=STARTS, show_default=True)
@click.option("--windows", "n_windows", type=int, default=64, show_default=True,
              help="128-token windows the start is computed from (the trainer's default: --init_batches 64 x 2).")
@click.option("--gradient_windows", type=int, default=None,
              help="fisher: the first this many of them give the gradient metric (default: all; the trainer's "
                   "default: --init_gradient_batches 32 x 2).")
@click.option("--off_domain", default="/usr/share/common-licenses/GPL-3", show_default=True,
              help="A text file of another domain, scored too ('' for none).")
@click.option("--json", "json_file", default=None, help="Also write the rows to this file.")
def main(layers, ranks, starts, n_windows, gradient_windows, off_domain, json_file):
    model, tok = load_base_model(EMBEDDED_MODEL)
    model.eval().requires_grad_(False)
    ids = windows(tok, 128, n_windows + HELD_OUT)
    cut = min(n_windows, 64)  # layer_fit.py's held-out windows 64-79 whatever the count: rows compare
    held, ids = ids[cut:cut + HELD_OUT], torch.cat([ids[:cut], ids[cut + HELD_OUT:]])
    other = text_windows(tok, off_domain) if off_domain else None
    rows, stats = [], None
    for rank in ranks:
        npt.convert_to_npt(model, npt.NPTConfig(rank=rank, layers=layers, modulation_target="exact"))
        if stats is None:
            t0 = time.time()
            stats = moments(model, ids, gradient_windows=gradient_windows)
            print(f"moments of {len(ids)} windows: {time.time() - t0:.1f} s", flush=True)
        for start in starts:
            kept = init_exact(model, moments=stats, start=start)
            with torch.no_grad():
                errors = equivalence_loss(model, {"input_ids": held, "attention_mask": torch.ones_like(held)},
                                          "end_to_end", 0.0).layer_fit
            row = {"layers": layers, "rank": rank, "start": start, **agreement(model, held),
                   "kept": sum(kept.values()) / len(kept), "update_error_own_trajectory": errors.mean().item()}
            if other is not None:
                row.update({f"off_domain_{k}": v for k, v in agreement(model, other).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
        npt.unconvert(model)  # back to the plain model for the next rank
    if json_file:
        with open(json_file, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: held-out (same corpus) and off-domain ratio to the teacher and agreement."""
    off = "off_domain_agreement" in rows[0]
    lines = ["| layers | rank | start | kept | ppl ratio (teacher) | top-1 agreement | update error |"
             + (" off-domain ppl ratio (teacher) | off-domain agreement |" if off else ""),
             "| --- " * (9 if off else 7) + "|"]
    for r in rows:
        line = (f"| {r['layers']} | {r['rank']} | {r['start']} | {r['kept']:.3f} | "
                f"{r['student_ppl'] / r['teacher_ppl']:.3f}x ({r['teacher_ppl']:.2f}) | {r['agreement']:.3f} | "
                f"{r['update_error_own_trajectory']:.4f} |")
        if off:
            line += (f" {r['off_domain_student_ppl'] / r['off_domain_teacher_ppl']:.3f}x "
                     f"({r['off_domain_teacher_ppl']:.2f}) | {r['off_domain_agreement']:.3f} |")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
