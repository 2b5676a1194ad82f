"""One setting of the fine-tuning baseline (editors.finetune_edit) on single edits of the fact set: for each of the
first --records records (spread over the relations), fine-tune on the record's context ("The city of Lyon is in the
country of Spain."), score the edited model on the record (CounterFact's ES, PS, NS, S and top-1) and on held-out
builtin text (next-token KL and perplexity ratio against the unedited model), then put the weights back. Prints
one markdown row (the means and the time per edit) and appends the numbers to --json_file.

    python -m benchmarks.finetune_sweep --steps 10 --lr 3e-5 --params mlp
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click
import torch

from benchmarks.editors import FINETUNE_PARAMS, finetune_edit
from npt_tools.counterfact import HeldOutDrift, evaluate_records, load_records, mean_metrics
from npt_tools.edit import applied as edited
from npt_tools.models import EMBEDDED_MODEL, load_base_model

FACTS = Path(__file__).resolve().parent / "facts" / "counterfacts.json"


def spread(records: list, n: int) -> list:
    """The first n records taking the relations in turn (each relation's records in file order)."""
    by = {}
    for r in records:
        by.setdefault(r.relation, []).append(r)
    out, k = [], 0
    while len(out) < min(n, len(records)):
        out += [rs[k] for rs in by.values() if k < len(rs)][:n - len(out)]
        k += 1
    return out


def parse_layers(text: str) -> list[int] | None:
    """'all' -> None; '8-15' -> [8..15]; '3,5' -> [3, 5]."""
    if text == "all":
        return None
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--steps", type=int, default=10, show_default=True, help="Adam steps per edit.")
@click.option("--lr", type=float, default=3e-5, show_default=True, help="Adam's learning rate.")
@click.option("--params", type=click.Choice(FINETUNE_PARAMS), default="mlp", show_default=True,
              help="mlp: the MLP weights of --layers; all: every weight.")
@click.option("--layers", default="all", show_default=True, help="With --params mlp: 'all', a range '8-15' or '3,5'.")
@click.option("--records", "n_records", type=int, default=20, show_default=True, help="Records edited, one at a time.")
@click.option("--facts", type=click.Path(exists=True, dir_okay=False), default=str(FACTS), show_default=True)
@click.option("--windows", type=int, default=8, show_default=True, help="Held-out windows of 128 tokens for the drift.")
@click.option("--json_file", type=click.Path(dir_okay=False), default=None, help="Append the result as a JSON line.")
def main(steps, lr, params, layers, n_records, facts, windows, json_file):
    torch.set_num_threads(1)
    model, tok = load_base_model(EMBEDDED_MODEL)
    records = spread(load_records(facts), n_records)
    drift = HeldOutDrift(model, tok, windows=windows)
    each, kl, ppl, seconds = [], [], [], []
    for r in records:
        t0 = time.perf_counter()
        deltas = finetune_edit(model, tok, r.context, steps=steps, lr=lr, params=params, layers=parse_layers(layers))
        seconds.append(time.perf_counter() - t0)
        with edited(model, deltas):
            each += evaluate_records(model, tok, [r], per_record=True)["per_record"]
            d = drift.measure(model)
        kl.append(d["kl"])
        ppl.append(d["ppl_ratio"])
    out = {**mean_metrics(each), "kl": sum(kl) / len(kl), "ppl_ratio": sum(ppl) / len(ppl),
           "ppl_ratio_max": max(ppl), "seconds_per_edit": sum(seconds) / len(seconds),
           "steps": steps, "lr": lr, "params": params, "layers": layers,
           "command": "python -m benchmarks.finetune_sweep " + shlex.join(sys.argv[1:])}
    if json_file:
        with open(json_file, "a") as f:
            f.write(json.dumps(out) + "\n")
    print(f"| {params} {layers} | {steps} | {lr:g} | {out['es']:.2f} | {out['ps']:.2f} | {out['ns']:.2f} | "
          f"{out['s']:.2f} | {out['es_top1']:.2f} / {out['ps_top1']:.2f} / {out['ns_top1']:.2f} | {out['kl']:.4f} | "
          f"{out['ppl_ratio']:.4f}x (max {out['ppl_ratio_max']:.4f}x) | {out['seconds_per_edit']:.1f} s | "
          f"`{out['command']}` |")


if __name__ == "__main__":
    main()
