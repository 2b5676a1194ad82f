#!/usr/bin/env python
"""Where `kv`'s efficacy is lost: in the value (the residual change at the subject's last token after the band's top
layer, which `Editor.value` searches for) or in the write (the down_proj edit that should produce it). For each
record and each value direction (`pullback`, forward passes only; `gradient`, one backward pass a step), the value
alone is added to the model's own residual (layers 0..top replayed) and the edit is written and undone; a record
counts where the new object's first token beats the old one's on every query (the prompt alone and behind each
prefix). Also the cosine, at the first step, between the pull-back and the exact gradient.

    python -m benchmarks.value_reach --records 98
"""
from __future__ import annotations

import random

import click
import torch

from npt_tools import plasticity as P
from npt_tools.counterfact import load_records
from npt_tools.models import EMBEDDED_MODEL, load_base_model


def margins(model, tokenizer, fact: P.Fact, q: P.Queries) -> torch.Tensor:
    """(n,) log-odds of the new object's first token over the old one's, per query."""
    logits = P.last_logits(model, q)
    return logits[:, P.first_token(tokenizer, fact.target_new)] - logits[:, P.first_token(tokenizer, fact.target_true)]


@torch.no_grad()
def first_cosine(editor: P.Editor, fact: P.Fact) -> float:
    """Mean over the queries of cos(pull-back, gradient) at the first step (no change yet), on the search's model."""
    q = P.fact_queries(editor.tokenizer, fact, editor.prefixes, align=True)
    model, top, new = editor.searcher(sync=True), editor.layers[-1], P.first_token(editor.tokenizer, fact.target_new)
    paths = P.attention_paths(model, q, top)
    pull = P.pullback(editor.model, q, paths.inputs, paths.attn, P.unembedding_pull(editor.model, paths.logits, new))
    grad = P.value_gradient(model, q, top, paths.hidden, torch.zeros_like(pull), paths.prefix, new)
    return float(torch.nn.functional.cosine_similarity(pull, grad, dim=-1).mean())


@click.command()
@click.option("--facts", default="benchmarks/facts/counterfacts.json", show_default=True)
@click.option("--records", default=98, show_default=True, help="Dev records (seed 1, outside the benchmark's 200).")
@click.option("--threads", default=2, show_default=True)
def main(facts, records, threads):
    torch.set_num_threads(threads)
    recs = load_records(facts)
    held = {id(r) for r in random.Random(0).sample(recs, min(200, len(recs)))}
    recs = random.Random(1).sample([r for r in recs if id(r) not in held], records)
    model, tokenizer = load_base_model(EMBEDDED_MODEL)
    editors = {d: P.Editor(model, tokenizer, direction=d) for d in P.DIRECTIONS}
    weights = {i: P.decoder_mlp(model, i).down_proj.weight for i in editors["pullback"].layers}
    original = {i: w.detach().clone() for i, w in weights.items()}
    counts = {d: {"value": 0, "written": 0, "norm": 0.0} for d in P.DIRECTIONS}
    cosines = []
    for r in recs:
        fact = P.fact_from_record(r)
        for d, editor in editors.items():
            found = editor.value(fact)
            q, paths, _, change = found
            top = editor.layers[-1]
            with P.replayed(model, top, P.with_change(paths.hidden, q, change)):
                counts[d]["value"] += bool((margins(model, tokenizer, fact, q) > 0).all())
            counts[d]["norm"] += float((change.norm(dim=-1) / paths.inputs[top + 1].norm(dim=-1)).mean())
            editor.write(fact, remember=False, found=found)  # the value just scored
            counts[d]["written"] += bool((margins(model, tokenizer, fact, q) > 0).all())
            with torch.no_grad():
                for i, w in weights.items():
                    w.copy_(original[i])
        cosines.append(first_cosine(editors["pullback"], fact))
    n = len(recs)
    print(f"{n} dev records; cos(pull-back, gradient) at the first step: mean {sum(cosines) / n:.2f}, "
          f"range {min(cosines):.2f} .. {max(cosines):.2f}")
    print("| direction | value alone wins | written edit wins | value norm / residual norm |")
    print("| --- | --- | --- | --- |")
    for d, c in counts.items():
        print(f"| {d} | {c['value'] / n:.3f} | {c['written'] / n:.3f} | {c['norm'] / n:.2f} |")


if __name__ == "__main__":
    main()
