"""Running at Llama-3.1-8B / 70B size (issue 29): the closed-form start's moments summed in place (the same start as
the per-batch sums of attention_moments), gradient checkpointing (the same loss and gradients), the memory plan's
fit, and benchmarks/device_check.sh without a GPU."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import npt
from npt_tools.closed_form import (_batch_attention, accumulate_moments, add_moments, attention_moments, init_exact,
                                   reduce_moments, teacher_moments)
from npt_tools.models import gradient_checkpointing
from npt_tools.objective import equivalence_loss
from helpers import tiny_model

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)
ROOT = Path(__file__).resolve().parent.parent


def batches(n=3, vocab=128, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # left padding: never counted
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def summed_per_batch(model, data, start, gradient_batches=None) -> dict:
    """The reference: each batch's attention_moments (a new tensor per batch and layer) summed by add_moments, as
    the start summed them before the in-place sums."""
    stats, fisher = {}, start == "fisher"
    for k, batch in enumerate(data):
        seed = 0 if fisher and (gradient_batches is None or k < gradient_batches) else None
        stats = add_moments(stats, {i: attention_moments(a, g, with_grad=fisher)
                                    for i, a, g in _batch_attention(model, batch, seed)})
    return stats


def exact(model, rank):
    return npt.convert_to_npt(model, npt.NPTConfig(rank=rank, modulation_target="exact"))


def assert_same_start(model, data, start, gradient_batches=None, rtol=1e-12):
    """Moments float64-close to the per-batch sums; the adapters init_exact sets from them close too."""
    inplace = teacher_moments(model, data, start, gradient_batches=gradient_batches)
    reference = summed_per_batch(model, data, start, gradient_batches)
    assert sorted(inplace) == sorted(reference)
    for i in reference:
        for x, y in zip(inplace[i], reference[i]):
            assert x.dtype == torch.float64 and torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max()))
    init_exact(model, moments=reference, start=start)
    before = copy.deepcopy(npt._adapter_state(model))
    init_exact(model, data, start=start, gradient_batches=gradient_batches)
    for name, value in npt._adapter_state(model).items():
        assert torch.allclose(value, before[name], rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("start", ["fisher", "pca"])
def test_in_place_moments_give_the_same_start(start):
    model = exact(tiny_model("llama", layers=3), rank=6)
    assert_same_start(model, batches(4), start, gradient_batches=2 if start == "fisher" else None)


def test_moments_kept_on_another_device_and_reduced_per_tensor():
    """device= keeps the sums there (here float64 on 'cpu' as for a CUDA model whose moments do not fit); a
    mismatch of with/without gradients is refused; reduce_moments sums each tensor (here: doubles them)."""
    model = exact(tiny_model("qwen2", layers=2), rank=4)
    data = batches(2, seed=3)
    stats = teacher_moments(model, data, "fisher", device="cpu")
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for v in stats.values() for t in v)
    doubled = reduce_moments(stats, lambda t: 2 * t)
    assert all(torch.equal(a * 2, b) for i in stats for a, b in zip(stats[i], doubled[i]))
    with pytest.raises(ValueError, match="with gradients to moments without"):
        accumulate_moments(stats, 0, torch.randn(3, stats[0][1].shape[0]))


@pytest.mark.integration
def test_in_place_start_on_the_embedded_model_matches_the_per_batch_sums():
    from npt_tools.models import load_base_model

    model, _ = load_base_model("smollm2-135m")
    model = exact(model, rank=64)
    assert_same_start(model, batches(2, vocab=40000, length=32, seed=5), "fisher")


def loss_and_grads(model, batch, objective):
    """(loss, adapter gradients); the layers' regularizer terms after the backward are the forward's own."""
    params = npt.get_adapter_params(model)
    loss = equivalence_loss(model, batch, objective).loss
    terms = [layer.last_reg for layer in npt.npt_layers(model)]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(layer.last_reg is term for layer, term in zip(npt.npt_layers(model), terms))
    return loss.detach(), grads


@pytest.mark.parametrize("target,objective", [("exact", "kl"), ("gate", "end_to_end"), ("gate+down", "kl")])
def test_gradient_checkpointing_keeps_loss_and_gradients(target, objective):
    """The same loss and adapter gradients with each NPT layer recomputed in the backward; far fewer bytes kept for
    the backward; the forward's regularizer term is not replaced by the recompute's; off again, the layers are as
    before."""
    torch.manual_seed(0)
    config = npt.NPTConfig(rank=8, modulation_target=target)
    model = npt.convert_to_npt(tiny_model("llama", layers=3, hidden=64, ffn=192), config)
    for p in npt.get_adapter_params(model):  # away from the identity start: every adapter gets a gradient
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1, 128, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kept = {}

    def measured(on):
        gradient_checkpointing(model, on)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = loss_and_grads(model, batch, objective)
        kept[on] = sum(sizes)
        return out

    (loss, grads), (loss_c, grads_c) = measured(False), measured(True)
    assert torch.allclose(loss, loss_c, rtol=1e-6, atol=0)
    for g, g_c in zip(grads, grads_c):
        assert (g is None) == (g_c is None)
        if g is not None:
            assert torch.allclose(g, g_c, rtol=1e-5, atol=1e-7 * float(g.abs().max()))
    assert kept[True] < kept[False] / 3
    gradient_checkpointing(model, False)
    assert all("forward" not in la.__dict__ for la in npt.npt_layers(model))


def test_gradient_checkpointing_keeps_the_fisher_start():
    """The fisher start's teacher backward recomputed per layer: the same moments (its tap on the attention output
    runs again in the recompute)."""
    model = exact(tiny_model("mistral", layers=3), rank=4)
    data = batches(2, seed=7)
    plain = teacher_moments(model, data, "fisher")
    checkpointed = teacher_moments(gradient_checkpointing(model), data, "fisher")
    assert all(torch.allclose(a, b, rtol=1e-10, atol=0) for i in plain for a, b in zip(plain[i], checkpointed[i]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh runs it)")
def test_start_on_cuda_matches_the_cpu_one():
    """On a GPU: the moments kept on the GPU or on the host give the same start, solved on the GPU, as the CPU's."""
    model = exact(tiny_model("llama", layers=3), rank=6)
    data = batches(3)
    init_exact(model, data)
    expected = {la.layer_idx: la.adapter.B.weight.double() @ la.adapter.A_proj.weight.double()
                for la in npt.npt_layers(model)}
    model.cuda()
    on_gpu = [{k: v.cuda() for k, v in b.items()} for b in data]
    for where in ("cuda", "cpu"):
        init_exact(model, moments=teacher_moments(model, on_gpu, "fisher", device=where))
        for la in npt.npt_layers(model):
            got = (la.adapter.B.weight.double() @ la.adapter.A_proj.weight.double()).cpu()
            assert torch.allclose(got, expected[la.layer_idx], rtol=1e-3, atol=1e-4), where


@pytest.mark.integration
def test_device_check_without_gpu(tmp_path):
    """benchmarks/device_check.sh on a machine without a GPU: exit 0, its CPU parts run, each GPU part skipped and
    saying so in the table it writes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    assert "no CUDA GPU" in table.splitlines()[0]
    for part in ("gpu_tests", "kernel_bench", "train_8b_bf16", "train_8b_nf4", "start_8b"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {part} |"))
        assert "skipped: no CUDA GPU" in row
    for part in ("environment", "memory_plan"):
        assert f"| {part} | ok |" in table
        assert (tmp_path / "out" / f"{part}.log").stat().st_size > 0
    assert "torch" in (tmp_path / "out" / "environment.log").read_text()


def test_trainer_runs_the_same_with_gradient_checkpointing(tiny_llama_dir, tmp_path, monkeypatch):
    """--gradient_checkpointing through the trainer (exact target, kl: the closed-form start's teacher backward and
    the student passes recomputed): the same losses and gradient norms, step by step, as without."""
    import json

    import torch.utils.checkpoint

    from npt_tools import trainer
    from npt_tools.arguments import TrainArgs

    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    logged, recomputed = {}, {}
    for on in (False, True):
        out = tmp_path / f"run-{on}"
        args = TrainArgs(model_name=str(tiny_llama_dir), output_dir=str(out), max_steps=3, max_length=32, batch_size=2,
                         gradient_accumulation_steps=1, warmup_steps=0, log_steps=1, eval_steps=0, save_steps=0,
                         seed=3, init_batches=2, init_gradient_batches=1, gradient_checkpointing=on)
        assert trainer.train(args) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged[on] = [(r["loss"], r["grad_norm"]) for r in rows if "grad_norm" in r]
        recomputed[on], calls[:] = len(calls), []
    assert recomputed == {False: 0, True: recomputed[True]} and recomputed[True] >= 2 * (1 + 3)  # start + 3 steps
    assert len(logged[True]) == len(logged[False]) == 3
    for plain, checkpointed in zip(logged[False], logged[True]):
        assert plain == pytest.approx(checkpointed, rel=1e-5)


def test_gradient_checkpointing_warns_where_nothing_backpropagates(tiny_llama_dir, tmp_path):
    import warnings

    from npt_tools.arguments import TrainArgs
    from npt_tools.plan import make_plan

    for target, expected in (("gate", 1), ("exact", 0)):  # layerwise (gate's default): no backward through layers
        args = TrainArgs(model_name=str(tiny_llama_dir), output_dir=str(tmp_path / target), modulation_target=target,
                         gradient_checkpointing=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_plan(args)
        lines = [str(w.message) for w in caught]
        assert len(lines) == expected, lines
        expected_start = "--gradient_checkpointing does nothing with --objective layerwise ("
        assert all(line.startswith(expected_start) for line in lines)
