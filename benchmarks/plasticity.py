#!/usr/bin/env python
"""Plasticity, side by side on CounterFact-format records (issue 26): a context such as "The capital of France is
Rome." written into the weights, scored without the context. Methods:

    bare         no edit
    context      the rewrite prepended to every prompt (IKE-style), no edit
    consolidate  today's npt.consolidate (the context's last token's exact patches) on an `exact` NPT model at full
                 rank, which is the original model
    kv           npt_tools.plasticity.compute_edit, the library's method (forward passes only)
    finetune     Adam on the context's tokens (benchmarks/editors.py)
    rome         a ROME-style rank-1 edit with an optimised value (benchmarks/rome.py)

Single edits (edit, score the record, undo): ES, PS, NS (CounterFact's probability comparison and top-1), S, the
held-out next-token KL and perplexity ratio on builtin text (over the first --drift_edits edits), time per edit.
Sequential (--points 1,10,100,1000): the edits applied one after the other, scored at each point on the records
edited so far (at most --eval_records of them, a fixed sample) with the held-out drift, and NS once more on only
those neighbourhood prompts that name no subject edited so far (`ns_unedited`: in a small fact set a record's
neighbours are often other records' subjects, whose answers the sequence rewrites on purpose).

    python -m benchmarks.plasticity --records 200 --methods bare,context,kv,rome --points 1,10,100

--dev scores records the benchmark's default sample (seed 0, 200) leaves out: tune there, report here.
"""
from __future__ import annotations

import copy
import json
import math
import random
import sys
import time

import click
import torch

import npt
from npt_tools import plasticity as P
from npt_tools.closed_form import init_exact
from npt_tools.counterfact import (HeldOutDrift, evaluate_records, in_context, load_records, mean_metrics,
                                   unedited_ns)
from npt_tools.models import EMBEDDED_MODEL, load_base_model
from npt_tools.edit import applied as edited, apply_edit, base_parameters
from benchmarks.editors import finetune_edit
from benchmarks.rome import rome_edit

METHODS = ("bare", "context", "consolidate", "kv", "finetune", "rome")
EDITORS = ("consolidate", "kv", "finetune", "rome")


class Consolidate:
    """Today's npt.consolidate on a full-rank `exact` copy of the model (the original model): deltas of the base
    parameters it changes, by their plain Hugging Face names."""

    def __init__(self, model, tokenizer):
        self.tokenizer = tokenizer
        self.npt_model = npt.convert_to_npt(copy.deepcopy(model), npt.NPTConfig(
            rank=model.config.hidden_size, modulation_target="exact"))
        ids = tokenizer("\n\n".join(P.builtin_prefixes(tokenizer, 8, 64, 1)), return_tensors="pt").input_ids
        init_exact(self.npt_model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], start="pca")
        self.params = base_parameters(self.npt_model)

    def __call__(self, record, keep: bool = False) -> dict[str, torch.Tensor]:
        """The deltas of one consolidation; keep: the copy keeps the edit (sequential edits)."""
        before = {n: p.detach().clone() for n, p in self.params.items() if "mlp" in n or "post_attention" in n}
        npt.consolidate(self.npt_model, self.tokenizer(record.context, return_tensors="pt").input_ids)
        deltas = {n: self.params[n].detach().float() - w.float() for n, w in before.items()
                  if not torch.equal(self.params[n], w)}
        if not keep:
            with torch.no_grad():
                for n, w in before.items():
                    self.params[n].copy_(w)
        return deltas


def make_editor(name: str, model, tokenizer, kv_options: dict):
    """record -> deltas for one edit computed on the model as it is now."""
    if name == "kv":
        editor = P.Editor(model, tokenizer, **kv_options)
        return KvEditor(editor)
    if name == "finetune":
        return lambda r: finetune_edit(model, tokenizer, r.context)
    if name == "rome":
        return lambda r: rome_edit(model, tokenizer, r.context, r)
    return Consolidate(model, tokenizer)


class KvEditor:
    """The library's method with its covariance loaded once: compute_edit's work for one record."""

    def __init__(self, editor: P.Editor):
        self.editor, self.kept = editor, False
        self.base = {i: editor.inverse(i).clone() for i in editor.layers}

    def __call__(self, record, keep: bool = False):
        """The deltas of one edit; keep: the model keeps the edit and the editor its keys (sequential edits)."""
        ed = self.editor
        if keep:
            self.kept = True
            return {P.down_proj_name(ed.model, i): d for i, d in ed.write(P.fact_from_record(record)).items()}
        if self.kept:  # the keys of earlier kept edits forgotten
            ed.inverses, self.kept = {i: v.clone() for i, v in self.base.items()}, False
        weights = {i: P.decoder_mlp(ed.model, i).down_proj.weight for i in ed.layers}
        original = {i: w.detach().clone() for i, w in weights.items()}
        ed.write(P.fact_from_record(record), remember=False)
        deltas = {P.down_proj_name(ed.model, i): w.detach().float() - original[i].float() for i, w in weights.items()}
        with torch.no_grad():
            for i, w in weights.items():
                w.copy_(original[i])
        return deltas


def single_edits(model, tokenizer, records, name: str, editor, drift: HeldOutDrift, drift_edits: int) -> dict:
    """Edit, score the record, undo, for every record: mean metrics, held-out drift over the first edits, time."""
    each, drifts, times = [], [], []
    for j, r in enumerate(records):
        start = time.perf_counter()
        deltas = editor(r)
        times.append(time.perf_counter() - start)
        with edited(model, deltas):
            each.append(evaluate_records(model, tokenizer, [r], per_record=True)["per_record"][0])
            if j < drift_edits:
                drifts.append(drift.measure(model))
        if not all(torch.isfinite(d).all() for d in deltas.values()):
            print(f"{name}: non-finite delta for record {j}", file=sys.stderr)
    out = mean_metrics(each)
    out.update(kl=_mean(d["kl"] for d in drifts), ppl_ratio=_mean(d["ppl_ratio"] for d in drifts),
               drift_edits=len(drifts), seconds_per_edit=_mean(times))
    return out


def sequential(model, tokenizer, records, name: str, editor, points, drift: HeldOutDrift, eval_records: int,
               seed: int = 0) -> list[dict]:
    """The edits one after the other (each computed on the model with the earlier ones); at each point the records
    edited so far (a fixed sample of at most eval_records) scored with the held-out drift. The model is put back."""
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, times = [], []
    try:
        for j, r in enumerate(records[:max(points)]):
            start = time.perf_counter()
            deltas = editor(r, keep=True) if isinstance(editor, (KvEditor, Consolidate)) else editor(r)
            if not isinstance(editor, KvEditor):
                apply_edit(model, deltas)
            times.append(time.perf_counter() - start)
            if j + 1 in points:
                done = records[:j + 1]
                sample = random.Random(seed).sample(done, min(eval_records, len(done)))
                row = {"method": name, "edits": j + 1, **evaluate_records(model, tokenizer, sample),
                       **unedited_ns(model, tokenizer, sample, done), **drift.measure(model),
                       "seconds_per_edit": _mean(times)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(snapshot[n])
    return rows


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


@click.command()
@click.option("--model_name", default=EMBEDDED_MODEL, show_default=True)
@click.option("--facts", default="benchmarks/facts/counterfacts.json", show_default=True)
@click.option("--records", default=200, show_default=True,
              help="N records drawn at random (seed 0) in a fixed order, the same for every method (0: all, in order).")
@click.option("--dev", is_flag=True, help="Draw the records (seed 1) from those outside the seed-0 sample of 200 "
              "instead: the dev records the method was tuned on.")
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--single/--no_single", default=True, show_default=True, help="Single edits (edit, score, undo).")
@click.option("--points", default="1,10,100", show_default=True, help="Sequential points ('' : none).")
@click.option("--eval_records", default=200, show_default=True, help="Records scored at a sequential point.")
@click.option("--drift_edits", default=20, show_default=True, help="Single edits whose held-out drift is measured.")
@click.option("--kv_options", default="{}", show_default=True, help="JSON: EditOptions for kv.")
@click.option("--threads", default=2, show_default=True)
@click.option("--output", default=None, help="JSON file for the rows.")
def main(model_name, facts, records, dev, methods, single, points, eval_records, drift_edits, kv_options, threads,
         output):
    torch.set_num_threads(threads)
    chosen = [m for m in methods.split(",") if m]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise click.UsageError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    recs = load_records(facts)
    if dev:
        held = {id(r) for r in random.Random(0).sample(recs, min(200, len(recs)))}
        recs = [r for r in recs if id(r) not in held]
        recs = random.Random(1).sample(recs, min(records or len(recs), len(recs)))
    elif 0 < records < len(recs):
        recs = random.Random(0).sample(recs, records)
    points = sorted({int(p) for p in points.split(",") if p})
    model, tokenizer = load_base_model(model_name)
    drift = HeldOutDrift(model, tokenizer)
    rows = []
    for name in chosen:
        if name in ("bare", "context"):
            row = {"method": name, "edits": 0, **evaluate_records(model, tokenizer, recs,
                                                                  in_context if name == "context" else "")}
            row.update(kl=0.0, ppl_ratio=1.0, seconds_per_edit=0.0)
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        editor = make_editor(name, model, tokenizer, json.loads(kv_options))
        if single:
            row = {"method": name, "edits": "single", **single_edits(model, tokenizer, recs, name, editor, drift,
                                                                     drift_edits)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if points:
            rows += sequential(model, tokenizer, recs, name, editor, points, drift, eval_records)
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
