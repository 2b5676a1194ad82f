"""The equivalence objective training minimises: each NPT layer against the original one (layerwise on the
teacher's inputs, or end_to_end on the student's own trajectory), or the teacher's next-token distribution
against the student's (kl); the per-layer losses it is made of (update_error, also the equivalence report's
measure, and normalized_mse); built on npt's capture."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn

from npt import capture, masked_mean, npt_disabled, npt_layers, regularization


def run_captured(model: nn.Module, batch: dict, names=("input", "output"), teacher: bool = False,
                 logits: bool = False):
    """One forward capturing `names` of every NPT layer: (records, logits or None). teacher=True: the original layers
    (npt_disabled), no gradients; without `logits` the forward stops after the last NPT layer."""
    ctx = npt_disabled(model) if teacher else contextlib.nullcontext()
    grad = torch.no_grad() if teacher else contextlib.nullcontext()
    stop = contextlib.nullcontext() if logits else _stop_after_last_npt_layer(model)
    with capture(model, names) as records, ctx, grad, stop:
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward:  # without logits, layers after the last NPT layer are never run
            out = None
    return records, (out.logits if logits else None)


class _StopForward(Exception):
    pass


def _raise_stop(module, args, output):
    raise _StopForward


@contextlib.contextmanager
def _stop_after_last_npt_layer(model: nn.Module):
    """Ends a forward once the last NPT layer has run (its captures, registered before, have fired)."""
    layers = npt_layers(model)
    with contextlib.ExitStack() as stack:
        if layers:
            stack.callback(max(layers, key=lambda la: la.layer_idx).register_forward_hook(_raise_stop).remove)
        yield


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| per token in fp32; scaling by max|x| first keeps the norm from overflowing
    (huge states stay comparable instead of collapsing to 0; an Inf still gives NaN, which is reported)."""
    x = x.float()
    peak = x.abs().amax(-1, keepdim=True)
    x = x / torch.where(peak > 0, peak, 1)  # an all-zero token stays 0 with a finite gradient
    # sqrt of a clamped square sum, not a clamped norm: the norm's backward at 0 is 0/0 = NaN
    return x / x.square().sum(-1, keepdim=True).clamp_min(1e-12).sqrt()


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error between per-token L2-normalized hidden vectors (= 2 - 2 cos, in [0, 4]), averaged
    over real tokens (the seed's fix 4): bounded whatever the scale, so large early differences cannot
    explode the gradients. Summed over the hidden size rather than averaged, so that its weight against
    the regularizer does not shrink with d_model."""
    s, t = _unit(student), _unit(teacher)
    per_token = (s - t).square().sum(-1)  # (B, T)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


UPDATE_FLOOR = 1e-4  # a teacher update below 1% of the output's norm is measured against that 1%


def update_error(student: torch.Tensor, teacher: torch.Tensor, layer_input: torch.Tensor,
                 mask: torch.Tensor | None = None, per_token: bool = False) -> torch.Tensor:
    """How much of the layer's update the student misses: per token |y_s - y_t|^2 / |y_t - h|^2.

    1 for a student whose output is its input (it adds nothing), 0 for an exact match; each token weighs
    the same, so massive-activation tokens cannot dominate. Two guards keep it finite at any scale:
    every token is first divided by its teacher-side max |.| (so 1e-20 and 1e20 states give the same
    value as unit ones), and the denominator is floored at UPDATE_FLOOR * |y_t|^2 (a token whose update
    is tiny next to its state cannot blow the loss up). Averaged over real tokens (mask), or (B, T)."""
    t, h = teacher.detach().float(), layer_input.detach().float()
    scale = torch.maximum(t.abs().amax(-1, keepdim=True), h.abs().amax(-1, keepdim=True))
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)  # (B, T, 1)
    t, h = t / scale, h / scale
    miss = (student.float() / scale - t).square().sum(-1)  # (B, T)
    update = (t - h).square().sum(-1)
    floor = (UPDATE_FLOOR * t.square().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    err = miss / torch.maximum(update, floor)  # (B, T)
    return err if per_token else masked_mean(err, mask)


OBJECTIVES = ("layerwise", "end_to_end", "kl")
LOSSES = ("update", "cosine")  # update_error (the layer's update) | normalized_mse (2 - 2 cos of whole states)


@dataclasses.dataclass
class EquivalenceLoss:
    """The equivalence loss of one batch and its parts."""
    loss: torch.Tensor  # fit + regularization_lambda * reg: what backward runs on
    fit: torch.Tensor  # mean over NPT layers of layer_error (kl: next_token_kl)
    reg: torch.Tensor  # regularization(model, attention_mask)
    layer_fit: torch.Tensor | None  # (L,) layer_error per NPT layer, detached; kl: None (the loss has no such part)
    tokens: int  # real (non-padding) tokens
    logits: tuple | None = None  # kl: (teacher, student) next-token logits, detached, for the caller's metrics
    teacher: dict | None = None  # the teacher's captured input, attn, output per NPT layer (no grad): layerwise_fit;
    # kl and end_to_end: only with report=True


DEFAULT_OBJECTIVE = {"exact": "kl", "gate": "layerwise", "down": "layerwise", "gate+down": "layerwise"}  # per target


def layer_error(student: torch.Tensor, teacher: dict[str, torch.Tensor], mask: torch.Tensor,
                loss: str = "update") -> torch.Tensor:
    """How far one NPT layer's output is from the original layer's: the one per-layer comparison of the
    loss and of eval. `teacher` holds the original layer's captured "input" (h) and "output" (y).
    update: update_error (1 = the layer's update not reproduced, 0 = exact); cosine: normalized_mse."""
    if loss == "update":
        return update_error(student, teacher["output"], teacher["input"], mask)
    if loss == "cosine":
        return normalized_mse(student, teacher["output"], mask)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def equivalence_loss(model: nn.Module, batch: dict, objective: str | None = None,
                     regularization_lambda: float = 0.01, loss: str = "update",
                     report: bool = False) -> EquivalenceLoss:
    """Equivalence loss of one batch (input_ids, attention_mask): the fit + regularization_lambda * regularization.

    objective None: the model's target's (DEFAULT_OBJECTIVE: kl for exact, layerwise for the others).
    layerwise: one teacher pass (npt_disabled, no_grad) captures each NPT layer's input h, attention
    output and output y; each NPT layer's modulated MLP then runs on (h, attn) and is compared to y
    (no gradient crosses layers). end_to_end: the student runs its own trajectory. For both, the fit is the
    mean layer_error over NPT layers and real tokens. kl: the student runs its own trajectory and the fit is
    next_token_kl, the teacher's next-token distribution against the student's (`loss` unused); only the logits
    are computed. report=True: the teacher pass also captures what the equivalence report needs (`teacher`).
    """
    objective = objective or DEFAULT_OBJECTIVE[model.npt_config.modulation_target]
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    mask = batch["attention_mask"]
    names = ("input", "attn", "output") if report or objective == "layerwise" else ()
    if objective == "kl":
        teacher, t_logits = run_captured(model, batch, names, teacher=True, logits=True)
        _, s_logits = run_captured(model, batch, (), logits=True)
        fit, layer_fit = next_token_kl(s_logits, t_logits, mask), None
    elif objective == "layerwise":
        teacher, _ = run_captured(model, batch, names, teacher=True)
        layer_fit = layerwise_fit(model, teacher, mask, loss)
    else:
        teacher, _ = run_captured(model, batch, names or ("input", "output"), teacher=True)
        records, _ = run_captured(model, batch, ("output",))
        layer_fit = torch.stack([layer_error(records[layer.layer_idx]["output"], teacher[layer.layer_idx], mask,
                                             loss) for layer in npt_layers(model)])  # (L,)
    fit = fit if layer_fit is None else layer_fit.mean()
    reg = regularization(model, mask)
    return EquivalenceLoss(loss=fit + regularization_lambda * reg, fit=fit, reg=reg,
                           layer_fit=None if layer_fit is None else layer_fit.detach(), tokens=int(mask.sum()),
                           logits=(t_logits, s_logits.detach()) if objective == "kl" else None,
                           teacher=teacher if names else None)


def layerwise_fit(model: nn.Module, teacher: dict, mask: torch.Tensor, loss: str = "update") -> torch.Tensor:
    """(L,) layer_error of each NPT layer's modulated MLP run on the teacher's input h and attention output (the
    teacher's captured "input", "attn", "output"): no error passes from one layer to the next."""
    return torch.stack([layer_error(layer.modulated_mlp(teacher[layer.layer_idx]["input"],
                                                        teacher[layer.layer_idx]["attn"]),
                                    teacher[layer.layer_idx], mask, loss) for layer in npt_layers(model)])


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, in fp32, averaged over real tokens."""
    t = torch.log_softmax(teacher_logits.detach().float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    per_token = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return masked_mean(per_token, mask)
