"""One safe optimizer step over micro-batches: a micro-batch whose loss or gradient is not finite is skipped
without touching weights, optimizer or scheduler (the safe training of docs/NPT_FIX_SUMMARY.md); a step can be
undone; sums over processes.
The trainer and the fix checks (npt_tools.fix_checks) run on it."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import torch
import torch.nn as nn

from npt import get_adapter_params
from npt_tools.objective import equivalence_loss

@dataclasses.dataclass
class StepResult:
    """One optimizer step: token-weighted means over the micro-batches that counted (NaN if none)."""
    loss: float = math.nan
    fit: float = math.nan
    reg: float = math.nan
    grad_norm: float = math.nan
    skipped: int = 0  # micro-batches skipped (non-finite loss, gradient, or weights after the step)
    tokens: int = 0
    bad: list[int] = dataclasses.field(default_factory=list)  # indices of the skipped micro-batches
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)  # why (this process's micro-batches)
    previous: tuple | None = dataclasses.field(default=None, repr=False)  # the state before the step: undo_step

    @property
    def stepped(self) -> bool:
        return math.isfinite(self.loss)


def optimizer_step(model: nn.Module, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float = 0.5,
                   objective: str | None = None, regularization_lambda: float = 0.01,
                   autocast=contextlib.nullcontext, reduce=None, loss: str = "update") -> StepResult:
    """One optimizer step over `micro_batches` (dicts with input_ids, attention_mask).

    Gradients are token-weighted, so k micro-batches give the gradient of one batch of all their
    tokens. Each micro-batch's gradient is computed on its own (autograd.grad) and added only if its
    loss and gradient are finite; a skipped micro-batch changes nothing. If every micro-batch is
    skipped, weights, optimizer and scheduler stay exactly as they were.
    `reduce(tensor)` sums a tensor over processes (DDP); None in a single process. `objective` None: the model's
    target's (equivalence_loss).
    """
    params = [p for p in get_adapter_params(model) if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sums = torch.zeros(4, dtype=torch.float64)  # tokens, loss*tokens, fit*tokens, reg*tokens
    bad = torch.zeros(len(micro_batches), dtype=torch.float64)
    reasons = {}
    for i, mb in enumerate(micro_batches):
        n = int(mb["attention_mask"].sum())
        if n == 0:  # an empty shard (the tail of a stream under DDP): nothing to learn from
            continue
        with autocast():
            out = equivalence_loss(model, mb, objective, regularization_lambda, loss)
        value = out.loss.float()
        grads = torch.autograd.grad(value, params, allow_unused=True) if bool(torch.isfinite(value)) else None
        if grads is None or not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            bad[i], reasons[i] = 1, "non-finite loss" if grads is None else "non-finite gradient"
            continue
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.float(), alpha=n)
        sums += torch.tensor([n, n * value.item(), n * out.fit.item(), n * out.reg.item()], dtype=torch.float64)
    if reduce is not None:  # one gradient sync per optimizer step, as DDP's no_sync accumulation does
        *acc, sums, bad = sum_over_processes(reduce, [*acc, sums, bad], torch.float32)
    result = StepResult(skipped=int((bad > 0).sum()), tokens=int(sums[0]),
                        bad=[i for i in range(len(micro_batches)) if bad[i] > 0], reasons=reasons)
    total = float(sums[0])
    if total == 0:
        return result
    for p, a in zip(params, acc):
        p.grad = (a / total).to(p.dtype)
    result.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(result.grad_norm):  # finite parts summing to a non-finite whole: skip the step
        for p in params:
            p.grad = None
        result.skipped, result.bad = len(micro_batches), list(range(len(micro_batches)))
        return result
    before = _snapshot(params, optimizer), copy.deepcopy(scheduler.state_dict())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not weights_finite(params, optimizer):  # a finite gradient that still blew the weights up: undo it
        _restore(before[0], params, optimizer)
        result.skipped, result.bad = len(micro_batches), list(range(len(micro_batches)))
        result.reasons = {i: "non-finite weights after the step" for i in result.bad}
        return result
    scheduler.step()
    result.loss, result.fit, result.reg = (float(v) / total for v in sums[1:])
    result.previous = before
    return result


def undo_step(model: nn.Module, optimizer, scheduler, result: StepResult) -> None:
    """Put the adapters, optimizer and scheduler back as they were before the step `result` reports: for a
    step whose weights stayed finite but whose every later forward is not (found only afterwards)."""
    if result.previous is None:
        raise ValueError("this StepResult has no previous state to restore (the step was not taken)")
    (snapshot, schedule) = result.previous
    _restore(snapshot, [p for p in get_adapter_params(model) if p.requires_grad], optimizer)
    scheduler.load_state_dict(schedule)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    result.previous = None


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for st in optimizer.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()]


def weights_finite(params: list[torch.Tensor], optimizer=None) -> bool:
    """Every parameter and optimizer-state tensor finite, in one fused reduction (per-tensor norms). A
    tensor whose norm overflows fp32 (entries ~1e19 and up) counts as diverged too."""
    tensors = [p.detach() for p in params] + (_optimizer_tensors(optimizer) if optimizer is not None else [])
    norms = torch._foreach_norm([t.float() for t in tensors])
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def _snapshot(params: list[torch.Tensor], optimizer) -> tuple[list, dict]:
    """Copies of the adapters and their optimizer state (small), so a diverged step can be undone."""
    return ([p.detach().clone() for p in params],
            {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state})


def _restore(snapshot: tuple[list, dict], params: list[torch.Tensor], optimizer) -> None:
    values, state = snapshot
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    for p in params:
        if p in state:
            optimizer.state[p] = state[p]
        else:
            optimizer.state.pop(p, None)


def sum_over_processes(reduce, tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """`reduce` (a sum over processes) of many tensors in one call: flattened into one `dtype` tensor, summed,
    split back into their shapes and dtypes."""
    flat = reduce(torch.cat([t.flatten().to(dtype) for t in tensors]))
    return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@contextlib.contextmanager
def nan_embeddings(model: nn.Module, when=lambda input_ids: True):
    """NaN input embeddings for the forwards whose input_ids satisfy `when`: plants a non-finite
    micro-batch, to exercise the skipping above (tests and the trainer's hidden --inject_nan_steps)."""
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out * float("nan") if when(args[0]) else out)
    try:
        yield
    finally:
        handle.remove()


