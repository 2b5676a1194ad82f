#!/usr/bin/env python
"""Fit NPT layers of smollm2-135m on cached teacher tensors: a fast way to compare adapter designs.

The teacher's input h, attention output and output y of each chosen layer are captured once, in one
forward pass per batch, for packed 128-token windows of the builtin corpus (Python's reference text).
Each variant then trains the adapters of those layers jointly with the layerwise objective (the mean
over layers of update_error on the teacher's inputs, + lambda * regularization; Adam, warmup then
linear decay, clipping at 0.5: what `pretrain_npt_safe.py --objective layerwise` computes, without a
teacher pass per step) and reports, on 16 held-out windows, the update error per layer at start and
end, and the converted model's perplexity and top-1 agreement against the teacher's.

    python -m benchmarks.layer_fit --layers 15 --target gate --target down --lam 0 --lam 1e-2
    python -m benchmarks.layer_fit --layers 15 --target exact --rank 16 --rank 64   # closed-form start, then trained
"""
from __future__ import annotations

import itertools
import json
import time

import click
import torch

import npt
from benchmarks.common import HELD_OUT, agreement, windows
from npt_tools.closed_form import attention_moments, init_exact
from npt_tools.models import EMBEDDED_MODEL, load_base_model
from npt_tools.objective import update_error

@torch.no_grad()
def capture(model, indices: list[int], ids: torch.Tensor, batch: int = 8) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {h, attn, y}} of the teacher for every window (forwards stop after the last chosen layer)."""
    layers = model.model.layers
    keep = layers[max(indices) + 1:]
    del layers[max(indices) + 1:]
    rec = {i: {} for i in indices}
    hooks = []
    for i in indices:
        r = rec[i]
        hooks += [layers[i].register_forward_pre_hook(lambda m, a, kw, r=r: r.update(h=a[0] if a else kw["hidden_states"]),
                                                       with_kwargs=True),
                  layers[i].self_attn.register_forward_hook(lambda m, a, o, r=r: r.update(attn=o[0])),
                  layers[i].register_forward_hook(lambda m, a, o, r=r: r.update(y=o[0] if isinstance(o, tuple) else o))]
    out = {i: {"h": [], "attn": [], "y": []} for i in indices}
    try:
        for b in range(0, len(ids), batch):
            model.model(input_ids=ids[b:b + batch], use_cache=False)
            for i in indices:
                for k in out[i]:
                    out[i][k].append(rec[i][k].clone())
    finally:
        for hk in hooks:
            hk.remove()
        layers.extend(keep)
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in out.items()}


def layer_errors(model, data, rows=None) -> torch.Tensor:
    """(L,) update error of each NPT layer on the cached teacher tensors (rows: a subset of windows)."""
    errs = []
    for layer in npt.npt_layers(model):
        h, attn, y = (data[layer.layer_idx][k] if rows is None else data[layer.layer_idx][k][rows]
                      for k in ("h", "attn", "y"))
        errs.append(update_error(layer.modulated_mlp(h, attn), y, h))
    return torch.stack(errs)


def fit(config: npt.NPTConfig, data, held, held_ids, steps, lr, lam, batch, seed=0) -> dict:
    model, _ = load_base_model(EMBEDDED_MODEL)
    model.eval()
    torch.manual_seed(seed)
    npt.convert_to_npt(model, config)
    if config.exact:  # the closed-form start from the cached training windows' attention outputs
        init_exact(model, moments={i: attention_moments(d["attn"]) for i, d in data.items()})
    params = npt.get_adapter_params(model)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    with torch.no_grad():
        start, start_eval = layer_errors(model, held), agreement(model, held_ids)
    n = len(next(iter(data.values()))["h"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    t0 = time.time()
    for step in range(steps):
        rows = order[torch.arange(step * batch, (step + 1) * batch) % n]
        loss = layer_errors(model, data, rows).mean() + lam * npt.regularization(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        sched.step()
    seconds = time.time() - t0
    with torch.no_grad():
        end, end_eval = layer_errors(model, held), agreement(model, held_ids)
        reg = npt.regularization(model).item()
    return {"target": config.modulation_target, "layers": [la.layer_idx for la in npt.npt_layers(model)],
            "rank": config.rank, "down_rank": config.down_rank, "lam": lam, "lr": lr, "steps": steps,
            "update_error_start": start.tolist(), "update_error_final": end.tolist(),
            "mean_start": start.mean().item(), "mean_final": end.mean().item(), "reg_final": reg,
            "teacher_ppl": start_eval["teacher_ppl"], "student_ppl_start": start_eval["student_ppl"],
            "student_ppl_final": end_eval["student_ppl"], "agreement_start": start_eval["agreement"],
            "agreement_final": end_eval["agreement"], "train_seconds": seconds}


@click.command()
@click.option("--layers", default="15", show_default=True, help="NPT layers, as --npt_layers takes them.")
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True, help="Windows per step (4 x 128: the trainer's default).")
@click.option("--windows", "n_windows", type=int, default=400, show_default=True, help="Training windows cached.")
@click.option("--target", "targets", multiple=True, default=("gate", "down"), show_default=True)
@click.option("--lam", "lams", type=float, multiple=True, default=(0.01,), show_default=True)
@click.option("--lr", "lrs", type=float, multiple=True, default=(1e-3,), show_default=True)
@click.option("--rank", "ranks", type=int, multiple=True, default=(16,), show_default=True)
@click.option("--down_rank", "down_ranks", type=int, multiple=True, default=(4,), show_default=True)
@click.option("--json", "json_file", default=None, help="Also write the rows to this file.")
def main(layers, steps, batch, n_windows, targets, lams, lrs, ranks, down_ranks, json_file):
    model, tok = load_base_model(EMBEDDED_MODEL)
    model.eval().requires_grad_(False)
    indices = npt.NPTConfig(layers=layers).layer_indices(model.config.num_hidden_layers)
    ids = windows(tok, 128, n_windows + HELD_OUT)
    data = capture(model, indices, ids)
    held = {i: {k: v[-HELD_OUT:] for k, v in d.items()} for i, d in data.items()}
    data = {i: {k: v[:-HELD_OUT] for k, v in d.items()} for i, d in data.items()}
    del model
    rows = []
    for target, lam, lr, rank, k in itertools.product(targets, lams, lrs, ranks, down_ranks):
        cfg = npt.NPTConfig(rank=rank, modulation_target=target, down_rank=k, layers=indices)
        rows.append(fit(cfg, data, held, ids[-HELD_OUT:], steps, lr, lam, batch))
        print(json.dumps(rows[-1]), flush=True)
    if json_file:
        with open(json_file, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The rows as the RESULTS.md table: held-out update error (mean over layers), perplexity, agreement."""
    lines = ["| layers | target | rank | lr | lambda | update error start -> end (ratio) | student ppl start -> end "
             "(teacher) | top-1 agreement start -> end | code size (reg) |", "|" + " --- |" * 9]
    for r in rows:
        span = f"{r['layers'][0]}-{r['layers'][-1]}" if len(r["layers"]) > 1 else str(r["layers"][0])
        lines.append(f"| {span} | {r['target']} | {r['rank']} | {r['lr']:g} | {r['lam']:g} | {r['mean_start']:.3f} -> "
                     f"{r['mean_final']:.3f} ({r['mean_final'] / r['mean_start']:.2f}) | {r['student_ppl_start']:.2f} -> "
                     f"{r['student_ppl_final']:.2f} ({r['teacher_ppl']:.2f}) | {r['agreement_start']:.3f} -> "
                     f"{r['agreement_final']:.3f} | {r['reg_final']:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
