"""The exact target's closed-form start: per NPT layer, mu the mean of the teacher's attention output a and a rank-r
code a_hat = mu + B A_proj (a - mu) chosen in closed form from moments gathered in float64 (summable over batches and
processes), in one of two metrics:

- fisher (the default): the error a - a_hat weighed by what it does to the next-token distributions. With
  M = E[g g^T], g the teacher's gradient of log p(y) at the attention output (y sampled from the teacher, so M is
  the Fisher information of the logits pulled back to a: to second order, KL(teacher || student) = 1/2 e^T M e
  for an error e), the code minimises E[(a - a_hat)^T M (a - a_hat)]: U the top-r eigenvectors of
  M^1/2 C M^1/2 (C the covariance of a), A_proj = U^T M^1/2, B = M^-1/2 U. One teacher backward per batch that
  gives gradients (`gradient_batches`: the first ones); the others give C alone, from a forward that stops after
  the last NPT layer. C needs more windows than M: measured, most of what more windows gain comes from C.
- pca: the principal directions of a (A_proj = P^T, B = P): the least-squares best rank-r code, forward passes only.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn

from npt import NPTConfig, NPTLayer, capture, convert_to_npt, npt_disabled, npt_layers
from npt_tools.objective import run_captured

# start -> (its name in the trainer's line, what init_exact's returned share is a share of)
STARTS = {"fisher": ("Fisher-weighted principal directions", "Fisher-weighted variance"),
          "pca": ("principal directions", "variance")}
METRIC_DAMPING = 1e-3  # M + METRIC_DAMPING * mean eigenvalue: directions the logits never felt stay invertible


def attention_moments(attn: torch.Tensor, grad: torch.Tensor | None = None,
                      with_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """(count, sum, sum of outer products) of attention outputs (N, D), and with `grad` (N, D) (count, sum of outer
    products) of the gradients at them (with_grad and no grad: zeros, a batch that gave none), in float64: what
    init_exact needs, summable over batches (and processes)."""
    a = attn.detach().reshape(-1, attn.shape[-1]).double()  # (N, D)
    out = (torch.tensor(float(len(a)), dtype=torch.float64), a.sum(0), a.T @ a)
    if grad is None:
        return (*out, out[0].new_zeros(()), out[2].new_zeros(out[2].shape)) if with_grad else out
    g = grad.detach().reshape(-1, grad.shape[-1]).double()  # (N, D)
    return (*out, torch.tensor(float(len(g)), dtype=torch.float64), g.T @ g)


def teacher_moments(model: nn.Module, batches, start: str = "fisher", seed: int = 0,
                    gradient_batches: int | None = None, device: str | torch.device | None = None) -> dict:
    """{layer_idx: attention_moments} of the teacher's attention outputs over the real tokens of `batches`, with the
    fisher start's gradient moments too (y drawn from the teacher's next-token distribution: draw_next_tokens) from
    the first `gradient_batches` of them (None: all). Summed in place, one layer at a time, into float64 tensors on
    `device` (None: the model's; moments_device says where they fit): a batch adds no d x d tensor of its own beside
    them (on another device than the model's, one layer's product at a time crosses over)."""
    _check_start(start)
    if gradient_batches is not None and gradient_batches < 1:
        raise ValueError(f"gradient_batches must be at least 1, got {gradient_batches}")
    stats, fisher = {}, start == "fisher"
    for k, batch in enumerate(batches):
        grads = fisher and (gradient_batches is None or k < gradient_batches)
        for i, attn, grad in _batch_attention(model, batch, seed if grads else None):
            accumulate_moments(stats, i, attn, grad, with_grad=fisher, device=device)
    return stats


def accumulate_moments(stats: dict, layer_idx: int, attn: torch.Tensor, grad: torch.Tensor | None = None,
                       with_grad: bool = False, device: str | torch.device | None = None) -> None:
    """Adds attention_moments(attn, grad, with_grad) to stats[layer_idx] in place (created on `device`, None: attn's,
    at the layer's first batch): the same sums as add_moments, without a new d x d tensor per batch."""
    a = attn.detach().reshape(-1, attn.shape[-1]).double()  # (N, D)
    g = None if grad is None else grad.detach().reshape(-1, grad.shape[-1]).double()  # (N, D)
    if layer_idx not in stats:
        dim, where = a.shape[-1], torch.device(device) if device is not None else a.device
        zeros = [torch.zeros(shape, dtype=torch.float64, device=where) for shape in ((), (dim,), (dim, dim))]
        stats[layer_idx] = (*zeros, *(torch.zeros_like(z) for z in zeros[::2])) if with_grad else tuple(zeros)
    acc = stats[layer_idx]
    if (len(acc) == 5) != (with_grad or g is not None):
        raise ValueError("cannot add attention moments with gradients to moments without (attention_moments)")
    acc[0].add_(len(a))
    acc[1].add_(a.sum(0).to(acc[1].device))
    _add_gram(acc[2], a)
    if g is not None:
        acc[3].add_(len(g))
        _add_gram(acc[4], g)


def _add_gram(out: torch.Tensor, x: torch.Tensor) -> None:
    """out += x^T x (x (N, D) float64) in place: fused on out's device, else one product copied over."""
    if out.device == x.device:
        out.addmm_(x.T, x)
    else:
        out.add_((x.T @ x).to(out.device))


def moments_device(model: nn.Module, start: str = "fisher", share: float = 0.25) -> torch.device:
    """Where teacher_moments keeps the start's moments: on the model's device when they take at most `share` of its
    memory (2 float64 d x d per NPT layer for fisher, 1 for pca: 8.6 GB at Llama-3.1-8B, 86 GB at 70B), else on the
    CPU (host memory)."""
    layers = npt_layers(model)
    device = next(model.parameters()).device
    if device.type != "cuda" or not layers:
        return device
    need = sum((2 if start == "fisher" else 1) * 8 * layer.d_model ** 2 for layer in layers)
    return device if need <= share * torch.cuda.get_device_properties(device).total_memory else torch.device("cpu")


def reduce_moments(stats: dict, reduce) -> dict:
    """`reduce` (a sum over processes, as the trainer's) of each tensor of each layer's moments, one at a time: no
    process ever holds every layer's moments twice (a single flat copy of them would not fit at 70B)."""
    return {i: tuple(reduce(t.reshape(-1)).view_as(t).to(device=t.device, dtype=t.dtype) for t in stats[i])
            for i in sorted(stats)}


def draw_next_tokens(logits: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """(T,) one token drawn from softmax(logits) (T, V) at each position of one window `ids` (T,), from a generator
    seeded by the window's tokens and `seed`: the same draw however the windows are batched or shared out among
    processes, so several processes gather one process's statistics."""
    key = zlib.crc32(ids.detach().cpu().numpy().tobytes(), seed % 2 ** 32)  # 32 bits: what the CPU generator keeps
    generator = torch.Generator().manual_seed(key)
    probs = torch.softmax(logits.detach().float(), -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def _batch_attention(model: nn.Module, batch: dict, seed: int | None):
    """One teacher pass: (layer_idx, attention output, its gradient or None) of each NPT layer over the batch's real
    tokens (N, D); with a seed, the gradient is that of sum log p(y), y ~ teacher, through every later layer."""
    real = batch["attention_mask"].bool()
    leaves = {}

    def tap(layer_idx, name, attn):  # a + 0: d/d(0) is the total derivative at a, through every later layer
        leaves[layer_idx] = torch.zeros_like(attn, requires_grad=True)
        return attn + leaves[layer_idx]

    if seed is None:
        records, _ = run_captured(model, batch, ("attn",), teacher=True)
        return [(i, rec["attn"][real], None) for i, rec in records.items()]
    with npt_disabled(model), capture(model, ("attn",), edit=tap) as records, torch.enable_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        y = torch.cat([draw_next_tokens(logits[b][real[b]], batch["input_ids"][b][real[b]], seed)
                       for b in range(len(real))])  # (N,) in the order of [real]
        logp = torch.log_softmax(logits[real].float(), -1)  # (N, V)
        order = sorted(leaves)
        grads = torch.autograd.grad(logp.gather(-1, y[:, None]).sum(), [leaves[i] for i in order])
    return [(i, records[i]["attn"][real], g[real]) for i, g in zip(order, grads)]


def add_moments(a: dict, b: dict) -> dict:
    """The sum of two {layer_idx: attention_moments} (a layer in one only keeps its moments)."""
    if any(len(a[i]) != len(b[i]) for i in a.keys() & b.keys()):
        raise ValueError("cannot add attention moments with gradients to moments without (attention_moments)")
    return {i: tuple(x + y for x, y in zip(a[i], b[i])) if i in a and i in b else a.get(i, b.get(i))
            for i in {*a, *b}}


@torch.no_grad()
def init_exact(model: nn.Module, batches=(), moments: dict | None = None, start: str = "fisher",
               seed: int = 0, gradient_batches: int | None = None) -> dict[int, float]:
    """The exact target's closed-form start (module docstring) from the teacher's passes over `batches` (dicts with
    input_ids, attention_mask; fisher: gradients from the first `gradient_batches`, None: all); `moments`
    ({layer_idx: attention_moments(...)}) adds statistics already at hand.
    Deterministic: statistics in float64, each code direction's largest entry positive. Returns {layer_idx: share
    of the error the code removes} (pca: of a's variance; fisher: of its Fisher-weighted variance)."""
    _check_start(start)
    layers = npt_layers(model)
    if not layers or not all(layer.config.exact for layer in layers):
        raise ValueError("init_exact needs a model converted with modulation_target='exact'")
    stats = add_moments(dict(moments or {}), teacher_moments(model, batches, start, seed, gradient_batches))
    if any(layer.layer_idx not in stats or stats[layer.layer_idx][0] < 1 for layer in layers):
        raise ValueError("init_exact needs at least one batch with a real token")
    if start == "fisher" and any(len(stats[layer.layer_idx]) < 5 or stats[layer.layer_idx][3] < 1
                                 for layer in layers):
        raise ValueError("the fisher start needs gradient moments: attention_moments(attn, grad)")
    return {layer.layer_idx: _set_code(layer, start, *stats[layer.layer_idx]) for layer in layers}


def convert_exact(model: nn.Module, batches, config: NPTConfig | None = None, start: str = "fisher", seed: int = 0,
                  gradient_batches: int | None = None) -> dict[int, float]:
    """Convert `model` to the exact target (config: NPTConfig(), the exact target at its default rank) and start it
    in closed form from `batches`, in one call: an exact model is only usable once started. init_exact's shares."""
    config = config or NPTConfig()
    if not config.exact:
        raise ValueError(f"convert_exact converts to the exact target, not {config.modulation_target!r}: use "
                         "npt.convert_to_npt for the others")
    convert_to_npt(model, config)
    return init_exact(model, batches, start=start, seed=seed, gradient_batches=gradient_batches)


def _check_start(start: str) -> None:
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")


def _set_code(layer: NPTLayer, start: str, n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor,
              grad_n: torch.Tensor | None = None, grad_outer: torch.Tensor | None = None) -> float:
    """Sets mu, A_proj, B of one exact layer from its moments, solved on the layer's device (one layer's d x d
    tensors at a time: at d 8192 a GPU's float64 eigh takes seconds where a CPU's takes minutes); the share of the
    (weighted) variance kept."""
    device = layer.adapter.mu.device
    n, total, outer = n.to(device), total.to(device), outer.to(device)
    mu = total / n
    cov = outer / n - torch.outer(mu, mu)  # (D, D)
    root = inverse_root = torch.eye(len(mu), dtype=cov.dtype, device=device)
    if start == "fisher":
        values, vectors = torch.linalg.eigh(grad_outer.to(device) / grad_n.to(device))  # M = E[g g^T]
        values = values.clamp_min(0) + METRIC_DAMPING * values.clamp_min(0).mean()
        values = values.clamp_min(torch.finfo(torch.float64).tiny)
        root = (vectors * values.sqrt()) @ vectors.T  # M^1/2
        inverse_root = (vectors * values.rsqrt()) @ vectors.T  # M^-1/2
    values, vectors = torch.linalg.eigh(root @ cov @ root)  # ascending
    r = layer.config.rank
    top = vectors[:, -r:].flip(-1)  # (D, r), largest first
    a_proj, b = top.T @ root, inverse_root @ top  # (r, D), (D, r): B A_proj = M^-1/2 U U^T M^1/2
    # balanced: |row k of A_proj| = |column k of B| (B A_proj unchanged), so training steps see both on one scale;
    # each column of B's largest entry positive: the sign convention that makes the start deterministic
    peak = b.gather(0, b.abs().argmax(0, keepdim=True))[0]  # (r,)
    scale = (b.norm(dim=0) / a_proj.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    scale = scale * torch.where(peak < 0, -1.0, 1.0).to(scale.dtype)  # (r,)
    ad = layer.adapter
    ad.mu.copy_(mu)
    ad.A_proj.weight.copy_(a_proj * scale[:, None])
    ad.B.weight.copy_(b / scale)
    values = values.clamp_min(0)
    return float(values[-r:].sum() / values.sum().clamp_min(torch.finfo(torch.float64).tiny))
