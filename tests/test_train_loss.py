"""npt's equivalence loss and optimizer step against naive references, on a tiny random Llama.

- layerwise / end_to_end loss and gradients equal a naive computation (each NPT layer run on its own)
- k accumulated micro-batches give the gradient of one batch of the same tokens
- a non-finite micro-batch (NaN embeddings, Inf gradient) changes nothing
- padding never counts
"""
import copy

import pytest
import torch

import npt
from helpers import (LAMBDA, assert_same, layer_outputs, make_batch, naive_end_to_end, naive_layerwise, npt_model,
                     ref_update64)
from npt_tools.objective import equivalence_loss
from npt_tools.step import nan_embeddings, optimizer_step

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)


def grads_of(model, loss):
    params = npt.get_adapter_params(model)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("objective,naive", [("layerwise", naive_layerwise), ("end_to_end", naive_end_to_end)])
@pytest.mark.parametrize("modulation", ["both", "additive"])
@pytest.mark.parametrize("loss", ["update", "cosine"])
def test_loss_and_gradient_match_naive_reference(tiny_llama, objective, naive, modulation, loss):
    model = npt_model(tiny_llama, modulation)
    batch = make_batch([12, 7, 9])
    out = equivalence_loss(model, batch, objective, LAMBDA, loss)
    ref_loss, ref_mse, ref_reg = naive(model, batch, loss)
    # a non-trivial comparison (the regularizer is a mean over F = 64 now, no longer a sum: 1e-4 / 64)
    assert out.fit.item() > 1e-4 and out.reg.item() > 1e-4 / 64
    torch.testing.assert_close(out.fit, ref_mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.reg, ref_reg, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-7)
    mine, ref = grads_of(model, out.loss), grads_of(model, naive(model, batch, loss)[0])
    assert all(r.abs().max() > 0 for r in ref)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def naive_layer_fits64(model, batch, objective):
    """Float64, per NPT layer: the update error of its output against the teacher's. layerwise: only that layer
    is NPT (its input and attention exactly the teacher's); end_to_end: every NPT layer on (the student's own
    trajectory)."""
    layers, mask = npt.npt_layers(model), batch["attention_mask"]
    fits = []
    with torch.no_grad():
        with npt.npt_disabled(model):
            inputs, teacher = layer_outputs(model, batch)
        for layer in layers:
            for other in layers:
                other.npt_enabled = objective == "end_to_end" or other is layer
            try:
                _, student = layer_outputs(model, batch)
            finally:
                for other in layers:
                    other.npt_enabled = True
            i = layer.layer_idx
            fits.append(ref_update64(student[i], teacher[i], inputs[i], mask))
    return torch.stack(fits)


def test_layerwise_differs_from_end_to_end(tiny_llama):
    """The two objectives are different things (no gradient across layers in layerwise): the first NPT layer
    (0) sees the embeddings under both, so its fit is the same; layer 2 sees the teacher's input under
    layerwise and the student's own (through NPT layer 0) under end_to_end, and each fit is its float64
    reference."""
    model = npt_model(tiny_llama)
    batch = make_batch([10, 10])
    layerwise = equivalence_loss(model, batch, "layerwise", LAMBDA)
    end_to_end = equivalence_loss(model, batch, "end_to_end", LAMBDA)
    a, b = layerwise.fit.item(), end_to_end.fit.item()
    assert abs(a - b) > 1e-6
    ref_a, ref_b = naive_layer_fits64(model, batch, "layerwise"), naive_layer_fits64(model, batch, "end_to_end")
    assert ref_a[0].item() == pytest.approx(ref_b[0].item(), rel=1e-12)
    assert abs(ref_a[1] - ref_b[1]).item() > 0.01 * ref_a[1].item()  # the trajectories differ at layer 2
    torch.testing.assert_close(layerwise.layer_fit.double(), ref_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(end_to_end.layer_fit.double(), ref_b, rtol=1e-5, atol=1e-7)
    assert a - b == pytest.approx((ref_a.mean() - ref_b.mean()).item(), rel=1e-4)


class GradRecorder(torch.optim.Optimizer):
    """Records the gradient handed to step(); changes nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def recorder(model):
    opt = GradRecorder(npt.get_adapter_params(model))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@pytest.mark.parametrize("objective", ["layerwise", "end_to_end"])
def test_accumulation_equals_one_big_batch(tiny_llama, objective):
    model = npt_model(tiny_llama)
    lengths = [[16, 5], [11], [16, 16, 3]]  # uneven micro-batches and padding
    micro = [make_batch(n, seed=i, total=16) for i, n in enumerate(lengths)]
    big = {k: torch.cat([m[k] for m in micro]) for k in ("input_ids", "attention_mask")}
    opt, sched = recorder(model)
    out = optimizer_step(model, opt, sched, micro, max_grad_norm=1e9, objective=objective,
                         regularization_lambda=LAMBDA)
    assert out.skipped == 0 and out.tokens == int(big["attention_mask"].sum())
    big_out = equivalence_loss(model, big, objective, LAMBDA)
    assert out.loss == pytest.approx(big_out.loss.item(), rel=1e-5)
    for a, b in zip(opt.grads, grads_of(model, big_out.loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_gradient_is_clipped_at_max_grad_norm(tiny_llama):
    model = npt_model(tiny_llama)
    opt, sched = recorder(model)
    # the earlier loss exactly (cosine fit, regularizer summed over F = 64): its gradient is well above 1e-3
    out = optimizer_step(model, opt, sched, [make_batch([12, 12])], max_grad_norm=1e-3,
                         regularization_lambda=LAMBDA * 64, loss="cosine")
    assert out.grad_norm > 1e-3
    total = torch.sqrt(sum((g ** 2).sum() for g in opt.grads))
    assert total.item() == pytest.approx(1e-3, rel=1e-3)  # clip_grad_norm_ adds 1e-6 to the norm


def snapshot(model, opt, sched):
    return ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))


def adam(model):
    opt = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))


def test_nan_micro_batch_is_skipped_without_state_change(tiny_llama):
    model = npt_model(tiny_llama)
    opt, sched = adam(model)
    optimizer_step(model, opt, sched, [make_batch([8])])  # optimizer state exists before the bad step
    before = snapshot(model, opt, sched)
    bad = make_batch([8, 8], seed=5)
    with nan_embeddings(model, lambda ids: torch.equal(ids, bad["input_ids"])):
        out = optimizer_step(model, opt, sched, [bad, bad])
    assert out.skipped == 2 and out.bad == [0, 1]
    assert out.loss != out.loss  # NaN: no step
    assert_same(before, snapshot(model, opt, sched))
    assert all(p.grad is None for p in npt.get_adapter_params(model))
    # the good micro-batches of a group still train, exactly as if the bad one were absent
    good = make_batch([8, 6], seed=7)
    for layer in npt.npt_layers(model):
        layer.last_reg = None  # a graph tensor from the last forward: deepcopy refuses it
    twin = copy.deepcopy(model)
    twin_opt, twin_sched = adam(twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors otherwise
    twin_sched.load_state_dict(sched.state_dict())
    with nan_embeddings(model, lambda ids: torch.equal(ids, bad["input_ids"])):
        out = optimizer_step(model, opt, sched, [good, bad])
    ref = optimizer_step(twin, twin_opt, twin_sched, [good])
    assert out.skipped == 1 and ref.skipped == 0 and out.loss == ref.loss
    assert_same(snapshot(model, opt, sched), snapshot(twin, twin_opt, twin_sched))


def test_inf_gradient_is_skipped_without_state_change(tiny_llama):
    model = npt_model(tiny_llama)
    opt, sched = adam(model)
    optimizer_step(model, opt, sched, [make_batch([8])])
    before = snapshot(model, opt, sched)
    p = npt.get_adapter_params(model)[0]
    h = p.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
    try:
        out = optimizer_step(model, opt, sched, [make_batch([9, 4], seed=3)])
    finally:
        h.remove()
    assert out.skipped == 1 and out.reasons == {0: "non-finite gradient"}
    assert_same(before, snapshot(model, opt, sched))
    out = optimizer_step(model, opt, sched, [make_batch([9, 4], seed=3)])  # and training goes on
    assert out.skipped == 0 and out.loss == out.loss
    assert not torch.equal(before[0][next(iter(before[0]))], dict(model.named_parameters())[next(iter(before[0]))])


@pytest.mark.parametrize("objective", ["layerwise", "end_to_end"])
def test_padding_never_counts(tiny_llama, objective):
    model = npt_model(tiny_llama)
    a, b = make_batch([14], seed=1), make_batch([6], seed=2, total=6)
    padded = make_batch([14, 6], seed=0, total=14)
    padded["input_ids"][0], padded["input_ids"][1, :6] = a["input_ids"][0], b["input_ids"][0]
    padded["input_ids"][1, 6:] = 3  # arbitrary pad ids: they must not matter
    out = equivalence_loss(model, padded, objective, LAMBDA)
    la, lb = equivalence_loss(model, a, objective, LAMBDA), equivalence_loss(model, b, objective, LAMBDA)
    for key in ("loss", "fit", "reg"):
        # token-weighted, as one unpadded batch of 20 tokens
        expected = (14 * getattr(la, key) + 6 * getattr(lb, key)) / 20
        torch.testing.assert_close(getattr(out, key), expected, rtol=1e-5, atol=1e-8)
    alone = {"input_ids": padded["input_ids"][1:], "attention_mask": padded["attention_mask"][1:]}
    torch.testing.assert_close(equivalence_loss(model, alone, objective, LAMBDA).loss, lb.loss, rtol=1e-5, atol=1e-8)
