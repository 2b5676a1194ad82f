"""The exact target's closed-form start: per NPT layer, the principal directions of the teacher's attention output
(mu its mean, A_proj = P^T, B = P with P the top-r eigenvectors of its covariance): the least-squares best rank-r
code of the attention, from two moments gathered in float64 (summable over batches and processes)."""
from __future__ import annotations

import torch
import torch.nn as nn

from npt import NPTLayer, npt_layers, run_captured

def attention_moments(attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, sum, sum of outer products) of attention outputs (N, D), in float64: what init_exact needs,
    summable over batches (and processes)."""
    a = attn.detach().reshape(-1, attn.shape[-1]).double()  # (N, D)
    return torch.tensor(float(len(a)), dtype=torch.float64), a.sum(0), a.T @ a


@torch.no_grad()
def teacher_attention_moments(model: nn.Module, batches) -> dict:
    """{layer_idx: attention_moments} of the teacher's attention outputs over the real tokens of `batches`."""
    stats = {}
    for batch in batches:
        records, _ = run_captured(model, batch, ("attn",), teacher=True)
        real = batch["attention_mask"].bool()
        stats = add_moments(stats, {i: attention_moments(rec["attn"][real]) for i, rec in records.items()})
    return stats


def add_moments(a: dict, b: dict) -> dict:
    return {i: tuple(x + y for x, y in zip(a[i], b[i])) if i in a and i in b else a.get(i, b.get(i))
            for i in {*a, *b}}


@torch.no_grad()
def init_exact(model: nn.Module, batches=(), moments: dict | None = None) -> dict[int, float]:
    """The exact target's closed-form start: per NPT layer, mu = the mean of the teacher's attention output a
    over the real tokens of `batches` (dicts with input_ids, attention_mask) and A_proj = P^T, B = P with P the
    top-`rank` principal directions of a (so a_hat = mu + P P^T (a - mu), the best rank-r estimate of a in the
    least-squares sense). `moments` ({layer_idx: attention_moments(...)}) replaces the teacher passes where the
    attention outputs are already at hand. Deterministic: statistics in float64, each direction's largest entry
    positive. Returns {layer_idx: share of a's variance the code keeps}."""
    layers = npt_layers(model)
    if not layers or not all(layer.config.exact for layer in layers):
        raise ValueError("init_exact needs a model converted with modulation_target='exact'")
    stats = add_moments(dict(moments or {}), teacher_attention_moments(model, batches))
    if any(layer.layer_idx not in stats or stats[layer.layer_idx][0] < 1 for layer in layers):
        raise ValueError("init_exact needs at least one batch with a real token")
    return {layer.layer_idx: _principal_start(layer, *stats[layer.layer_idx]) for layer in layers}


def _principal_start(layer: NPTLayer, n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> float:
    """Sets mu, A_proj, B of one exact layer from its attention moments; the share of variance kept."""
    mu = total / n
    values, vectors = torch.linalg.eigh((outer / n - torch.outer(mu, mu)).cpu())  # covariance (D, D), ascending
    r = layer.config.rank
    top = vectors[:, -r:].flip(-1)  # (D, r), largest first
    peak = top.gather(0, top.abs().argmax(0, keepdim=True))  # (1, r): the sign convention
    top = top * torch.where(peak < 0, -1.0, 1.0).to(top.dtype)
    ad = layer.adapter
    ad.mu.copy_(mu)
    ad.A_proj.weight.copy_(top.T)
    ad.B.weight.copy_(top)
    values = values.clamp_min(0)
    return float(values[-r:].sum() / values.sum().clamp_min(torch.finfo(torch.float64).tiny))
