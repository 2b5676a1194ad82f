"""The `exact` modulation target, its closed-form start, its consolidation and the kl objective, against
float64 references written from the formulas (no project code), on tiny random Llama, Mistral and Qwen2."""
import copy
import functools

import pytest
import torch

import npt
from npt_tools.closed_form import (add_moments, attention_moments, convert_exact, draw_next_tokens, init_exact,
                                   teacher_moments)
from npt_tools.objective import equivalence_loss, next_token_kl
from helpers import ARCHS, capture_layer_io, rel_err, rms_norm64, tiny_model

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)


def random_batches(n=3, batch=2, length=20, seed=1, pad=3):
    """Batches with left padding on their second row (garbage ids there)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def exact_model(arch="llama", rank=8, layers="all", init=True, **kw):
    model = npt.convert_to_npt(tiny_model(arch, **kw), npt.NPTConfig(rank=rank, layers=layers, modulation_target="exact"))
    if init:
        init_exact(model, random_batches())
    return model


def mlp64(dec, x):
    gate = x @ dec.mlp.gate_proj.weight.double().T
    up = x @ dec.mlp.up_proj.weight.double().T
    return (gate * torch.sigmoid(gate) * up) @ dec.mlp.down_proj.weight.double().T


def original_layer64(dec, h, attn):
    """The decoder layer after its attention: h + a + MLP(LN2(h + a)), float64."""
    r = h.double() + attn.double()
    return r + mlp64(dec, rms_norm64(r, dec.post_attention_layernorm))


def a_hat64(ad, attn):
    mu = ad.mu.double()
    return mu + (attn.double() - mu) @ ad.A_proj.weight.double().T @ ad.B.weight.double().T


def forward_records(model, batch):
    records, handles = capture_layer_io(model)
    with torch.no_grad():
        logits = model(**batch).logits
    for h in handles:
        h.remove()
    return records, logits


@pytest.mark.parametrize("start", ["fisher", "pca"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_rank_closed_form_start_is_the_original_layer(arch, start):
    model = exact_model(arch, rank=64, init=False)  # d_model 64: full rank
    init_exact(model, random_batches(), start=start)
    batch = random_batches(1, seed=7)[0]  # fresh inputs, not the ones the start saw
    records, logits = forward_records(model, batch)
    real = batch["attention_mask"].bool()
    for layer in npt.npt_layers(model):
        rec = records[layer.layer_idx]
        ref = original_layer64(layer.layer, rec["h"], rec["attn"])
        assert rel_err(rec["out"][real], ref[real]) <= 1e-5, (arch, layer.layer_idx)
    with torch.no_grad(), npt.npt_disabled(model):
        teacher = model(**batch).logits
    assert rel_err(logits[real], teacher[real].double()) <= 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_layer_matches_float64_reference_below_full_rank(arch):
    model = exact_model(arch, rank=6, layers="0,2")
    with torch.no_grad():
        for layer in npt.npt_layers(model):  # away from the closed-form start: any adapters
            layer.adapter.mu.normal_(std=0.1)
            layer.adapter.B.weight.add_(torch.randn_like(layer.adapter.B.weight) * 0.1)
    batch = random_batches(1, seed=8)[0]
    records, _ = forward_records(model, batch)
    real = batch["attention_mask"].bool()
    for layer in npt.npt_layers(model):
        rec = records[layer.layer_idx]
        ref = original_layer64(layer.layer, rec["h"], a_hat64(layer.adapter, rec["attn"]))
        assert rel_err(rec["out"][real], ref[real]) <= 1e-5, (arch, layer.layer_idx)
        assert rel_err(rec["out"][real], original_layer64(layer.layer, rec["h"], rec["attn"])[real]) > 1e-3
    assert npt.regularization(model, batch["attention_mask"]).item() == 0.0


def test_pca_start_is_deterministic_and_equals_its_definition():
    model = exact_model("mistral", rank=5, init=False)
    batches = random_batches(3, seed=4)
    kept = init_exact(model, batches, start="pca")
    first = {k: v.clone() for k, v in npt._adapter_state(model).items()}
    assert init_exact(model, batches, start="pca") == kept
    assert all(torch.equal(first[k], v) for k, v in npt._adapter_state(model).items())
    # the definition, in float64 from the teacher's attention outputs on real tokens only
    attn = {}
    handles = [layer.layer.self_attn.register_forward_hook(
        lambda m, args, out, i=layer.layer_idx: attn.setdefault(i, []).append(out[0].detach()))
        for layer in npt.npt_layers(model)]
    with torch.no_grad(), npt.npt_disabled(model):
        for b in batches:
            b = {**b, "input_ids": torch.where(b["attention_mask"].bool(), b["input_ids"], 5)}  # other padding ids
            model(**b)
    for h in handles:
        h.remove()
    real = torch.cat([b["attention_mask"].bool() for b in batches])
    for layer in npt.npt_layers(model):
        a = torch.cat(attn[layer.layer_idx])[real].double()  # (N, D)
        mu = a.mean(0)
        values, vectors = torch.linalg.eigh((a - mu).T @ (a - mu) / len(a))
        top = vectors[:, -5:]
        ad = layer.adapter
        assert rel_err(ad.mu, mu) <= 1e-6
        assert torch.equal(ad.A_proj.weight, ad.B.weight.T)
        torch.testing.assert_close(ad.B.weight.double() @ ad.A_proj.weight.double(), top @ top.T, atol=1e-6, rtol=0)
        peak = ad.B.weight.gather(0, ad.B.weight.abs().argmax(0, keepdim=True))
        assert (peak > 0).all()  # the sign convention
        assert kept[layer.layer_idx] == pytest.approx((values[-5:].sum() / values.sum()).item(), rel=1e-9)


def sampled_fisher64(model, batches, seed=0):
    """{layer_idx: E[g g^T]} in float64, g the gradient of sum log p(y) at each attention output, by another route
    than the project's: a float64 copy of the teacher with its weights requiring grad and retain_grad on the attention
    outputs; y drawn as the start draws it (draw_next_tokens on the fp32 teacher's logits)."""
    ref = copy.deepcopy(model).double().requires_grad_(True)
    sums, count = {}, 0
    for b in batches:
        real = b["attention_mask"].bool()
        with torch.no_grad(), npt.npt_disabled(model):
            logits = model(**b).logits
        y = torch.cat([draw_next_tokens(logits[i][real[i]], b["input_ids"][i][real[i]], seed) for i in range(len(real))])
        outs = {}

        def keep(module, args, out, i):
            out[0].retain_grad()
            outs[i] = out[0]

        handles = [layer.layer.self_attn.register_forward_hook(functools.partial(keep, i=layer.layer_idx))
                   for layer in npt.npt_layers(ref)]
        with npt.npt_disabled(ref):
            logp = torch.log_softmax(ref(**b).logits[real], -1)
        logp[torch.arange(len(y)), y].sum().backward()
        for h in handles:
            h.remove()
        for i, a in outs.items():
            g = a.grad[real]  # (N, D)
            sums[i] = sums.get(i, 0) + g.T @ g
        count += int(real.sum())
    return {i: v / count for i, v in sums.items()}


def test_fisher_start_equals_its_definition():
    """B A_proj = the best rank-r map in the metric M = E[g g^T]: with M = L L^T (Cholesky), the top-r eigenvectors V
    of L^T C L give B A_proj = L^-T V V^T L^T; the gradients' moments match a float64 reference; the factors are
    balanced and the start deterministic."""
    model = exact_model("qwen2", rank=5, init=False)
    batches = random_batches(3, seed=6)
    kept = init_exact(model, batches)  # fisher: the default
    first = {k: v.clone() for k, v in npt._adapter_state(model).items()}
    assert init_exact(model, batches, start="fisher") == kept
    assert all(torch.equal(first[k], v) for k, v in npt._adapter_state(model).items())
    stats = teacher_moments(model, batches, "fisher")
    fisher = sampled_fisher64(model, batches)
    for layer in npt.npt_layers(model):
        n, total, outer, grad_n, grad_outer = stats[layer.layer_idx]
        assert grad_n == n
        assert rel_err(grad_outer / n, fisher[layer.layer_idx]) <= 1e-4
        mu = total / n
        cov = outer / n - torch.outer(mu, mu)
        metric = grad_outer / n
        metric = metric + 1e-3 * torch.linalg.eigvalsh(metric).clamp_min(0).mean() * torch.eye(len(mu), dtype=mu.dtype)
        chol = torch.linalg.cholesky(metric)
        vectors = torch.linalg.eigh(chol.T @ cov @ chol).eigenvectors[:, -5:]
        expected = torch.linalg.solve(chol.T, vectors) @ vectors.T @ chol.T
        ad = layer.adapter
        product = ad.B.weight.double() @ ad.A_proj.weight.double()
        assert rel_err(product, expected) <= 1e-5
        assert rel_err(ad.B.weight.norm(dim=0), ad.A_proj.weight.norm(dim=1)) <= 1e-5  # balanced
        pca = torch.linalg.eigh(cov).eigenvectors[:, -5:]
        assert rel_err(product, pca @ pca.T) > 1e-2  # another code than the principal directions


def test_fisher_gradients_from_the_first_batches_only():
    """gradient_batches=k: the covariance from every batch, the metric from the first k alone (the others run a
    forward only), so the start is the one from those two moments; adding moments with gradients to moments
    without is refused, not truncated."""
    model = exact_model("mistral", rank=4, init=False)
    batches = random_batches(4, seed=9)
    part = teacher_moments(model, batches, "fisher", gradient_batches=1)
    first = teacher_moments(model, batches[:1], "fisher")
    every = teacher_moments(model, batches, "pca")
    for i, (n, total, outer, grad_n, grad_outer) in part.items():
        assert n == every[i][0] > grad_n == first[i][3] > 0
        assert rel_err(total, every[i][1]) <= 1e-12 and rel_err(outer, every[i][2]) <= 1e-12
        assert rel_err(grad_outer, first[i][4]) <= 1e-12
    kept = init_exact(model, batches, gradient_batches=1)
    product = {la.layer_idx: la.adapter.B.weight @ la.adapter.A_proj.weight for la in npt.npt_layers(model)}
    mixed = {i: (*every[i], *first[i][3:]) for i in every}  # the covariance of all, the gradients of the first
    assert init_exact(model, moments=mixed) == kept
    assert all(torch.equal(la.adapter.B.weight @ la.adapter.A_proj.weight, product[la.layer_idx])
               for la in npt.npt_layers(model))
    assert init_exact(model, batches) != kept  # the other batches' gradients change the start
    with pytest.raises(ValueError, match="with gradients to moments without"):
        add_moments(first, every)
    with pytest.raises(ValueError, match="at least 1"):
        teacher_moments(model, batches, "fisher", gradient_batches=0)


def test_draws_do_not_depend_on_batching():
    """Each window's draw depends on its tokens and the seed only: batched together or alone, the same tokens (so
    several processes, each with its share of the windows, gather one process's statistics)."""
    logits, ids = torch.randn(2, 7, 50), torch.randint(0, 50, (2, 7))
    together = [draw_next_tokens(logits[i], ids[i], 3) for i in range(2)]
    assert torch.equal(draw_next_tokens(logits[1], ids[1], 3), together[1])
    assert not torch.equal(draw_next_tokens(logits[1], ids[1], 4), together[1])  # another seed, another draw
    draws = torch.stack([draw_next_tokens(logits[0], ids[0], s) for s in range(400)])  # (400, 7)
    probs = torch.softmax(logits[0], -1)
    assert (draws == probs.argmax(-1)).float().mean(0).sub(probs.max(-1).values).abs().max() < 0.12  # from p


def test_fisher_start_minimises_the_error_in_its_metric():
    """What the metric is for: of the rank-r codes, the fisher start has the least E[e^T M e] (e = a - a_hat, M the
    damped metric, a and g apart), less than the principal directions and than the fisher code nudged at random."""
    model = exact_model("llama", rank=4, init=False)
    stats = teacher_moments(model, random_batches(6, seed=2), "fisher")

    def cost() -> float:
        total = 0.0
        for layer in npt.npt_layers(model):
            n, s, outer, grad_n, grad_outer = stats[layer.layer_idx]
            mu = s / n
            metric = grad_outer / grad_n
            metric = metric + 1e-3 * torch.linalg.eigvalsh(metric).clamp_min(0).mean() * torch.eye(len(mu)).double()
            ad = layer.adapter
            residual = torch.eye(len(mu), dtype=mu.dtype) - ad.B.weight.double() @ ad.A_proj.weight.double()
            total += torch.trace(residual.T @ metric @ residual @ (outer / n - torch.outer(mu, mu))).item()
        return total

    init_exact(model, moments=stats, start="pca")
    pca = cost()
    init_exact(model, moments=stats, start="fisher")
    fisher = cost()
    assert fisher < pca
    with torch.no_grad():
        for layer in npt.npt_layers(model):
            layer.adapter.B.weight.mul_(1 + 0.05 * torch.randn_like(layer.adapter.B.weight))
    assert fisher < cost()


def test_init_exact_refuses_other_targets_and_empty_batches():
    with pytest.raises(ValueError, match="exact"):
        init_exact(npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=4)), random_batches(1))
    empty = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="real token"):
        init_exact(exact_model(init=False), [empty])
    with pytest.raises(ValueError, match="start must be one of fisher, pca"):
        init_exact(exact_model(init=False), random_batches(1), start="svd")
    model = exact_model(init=False)
    pca_only = {i: attention_moments(torch.randn(10, 64)) for i in range(len(npt.npt_layers(model)))}
    with pytest.raises(ValueError, match="gradient moments"):
        init_exact(model, moments=pca_only)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_consolidated_patches_reproduce_the_exact_layer_for_the_token(arch):
    """The patch form: W_gate, W_up, W_down and the norm's scale patched, then the plain layer h + MLP(LN2(h))
    (no attention) gives the exact layer's output on the chosen token's h."""
    model = exact_model(arch, rank=6)
    ids = torch.randint(1, 128, (1, 9))
    records, _ = forward_records(model, {"input_ids": ids})
    expected = {layer.layer_idx: original_layer64(layer.layer, records[layer.layer_idx]["h"][0, 4],
                                                  a_hat64(layer.adapter, records[layer.layer_idx]["attn"][0, 4]))
                for layer in npt.npt_layers(model)}
    half = copy.deepcopy(model)
    patches = npt.consolidate(model, ids, token_index=4, alpha=1.0)
    for layer in npt.npt_layers(model):
        h, dec = records[layer.layer_idx]["h"][0, 4].double(), layer.layer
        plain = h + mlp64(dec, rms_norm64(h, dec.post_attention_layernorm))
        assert rel_err(plain, expected[layer.layer_idx]) <= 1e-5, (arch, layer.layer_idx)
    halves = npt.consolidate(half, ids, token_index=4, alpha=0.5)
    for i, p in patches.items():
        assert set(p) == {"gate", "up", "down", "norm_scale"}
        torch.testing.assert_close(halves[i]["gate"], 0.5 * p["gate"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(halves[i]["norm_scale"] - 1, 0.5 * (p["norm_scale"] - 1), rtol=1e-5, atol=1e-7)


def test_exact_adapters_save_load_and_teacher_bitwise(tmp_path):
    model = exact_model("qwen2", rank=4, layers="1-2")
    npt.save_adapters(model, tmp_path)
    fresh = tiny_model("qwen2")
    npt.load_adapters(fresh, tmp_path)
    assert fresh.npt_config.modulation_target == "exact"
    batch = random_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
        with npt.npt_disabled(model):
            assert torch.equal(model(**batch).logits, tiny_model("qwen2")(**batch).logits)
    gate = npt.convert_to_npt(tiny_model("qwen2"), npt.NPTConfig(modulation_target="gate", rank=4, layers="1-2"))
    with pytest.raises(ValueError, match="modulation_target"):
        npt.load_adapters(gate, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_target_on_half_precision_bases(dtype):
    model = exact_model("llama", rank=64).to(dtype)  # full rank: only the base's precision is off
    for p in npt.get_adapter_params(model):
        p.data = p.data.float()  # fp32 master adapters on a half-precision base
    batch = random_batches(1, seed=10)[0]
    out = equivalence_loss(model, batch, "layerwise", 0.01)
    grads = torch.autograd.grad(out.loss, npt.get_adapter_params(model))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in npt.get_adapter_params(model))
    assert out.fit.item() < 0.01  # the closed-form start reproduces the updates at half precision too


def kl64(s_logits, t_logits, mask):
    t, s = torch.log_softmax(t_logits.double(), -1), torch.log_softmax(s_logits.double(), -1)
    per = (t.exp() * (t - s)).sum(-1)
    return torch.where(mask.bool(), per, 0).sum() / mask.sum()


def test_next_token_kl_and_its_gradient_match_float64():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 5, 50, generator=g) * 3).requires_grad_()
    t = torch.randn(2, 5, 50, generator=g) * 3
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    s.data[0, 0] = float("nan")  # padding never counts
    value = next_token_kl(s, t, mask)
    (grad,) = torch.autograd.grad(value, s)
    s64 = s.detach().double().requires_grad_()
    ref = kl64(s64, t, mask)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad[mask.bool()].double(), ref_grad[mask.bool()], rtol=1e-4, atol=1e-7)
    assert next_token_kl(t, t, mask).abs().item() < 1e-6


@pytest.mark.parametrize("start", ["fisher", "pca"])
def test_kl_objective_trains_the_exact_adapters_toward_the_teacher(start):
    model = exact_model("llama", rank=2, init=False)
    init_exact(model, random_batches(), start=start)
    batch = random_batches(1, seed=11)[0]
    out = equivalence_loss(model, batch, "kl", 0.01)
    with torch.no_grad(), npt.npt_disabled(model):
        t_logits = model(**batch).logits
    with torch.no_grad():
        s_logits = model(**batch).logits
    assert out.fit.item() == pytest.approx(kl64(s_logits, t_logits, batch["attention_mask"]).item(), rel=1e-4)
    assert out.layer_fit is None and out.teacher is None  # the step computes the loss only: no per-layer captures
    params = npt.get_adapter_params(model)
    opt = torch.optim.Adam(params, lr=3e-3)
    before = out.fit.item()
    for _ in range(20):
        opt.zero_grad()
        equivalence_loss(model, batch, "kl", 0.0).loss.backward()
        opt.step()
    assert equivalence_loss(model, batch, "kl", 0.0).fit.item() < 0.5 * before


def test_the_kl_step_captures_nothing_the_report_captures_the_teacher(monkeypatch):
    """A kl training step runs two forwards that keep no per-layer state (the logits only); report=True (what
    evaluate asks) captures the teacher's input, attention and output in the same teacher pass."""
    import npt_tools.objective as objective

    model = exact_model("llama", rank=2, init=False)
    init_exact(model, random_batches())
    batch = random_batches(1, seed=11)[0]
    calls = []
    real = objective.run_captured
    monkeypatch.setattr(objective, "run_captured",
                        lambda m, b, names, **k: calls.append(tuple(names)) or real(m, b, names, **k))
    step = equivalence_loss(model, batch)  # the exact model's default objective: kl
    assert calls == [(), ()] and step.logits is not None and step.teacher is None
    calls.clear()
    report = equivalence_loss(model, batch, report=True)
    assert calls == [("input", "attn", "output"), ()] and sorted(report.teacher) == [0, 1, 2]
    assert report.loss.item() == step.loss.item()


def test_the_library_defaults_are_the_clis():
    """NPTConfig() is the exact target at the trainer's default rank (capped at d_model); its objective is kl,
    in equivalence_loss as in the CLI; saved configs that name no target are the seed's gate form."""
    from npt_tools.arguments import TrainArgs
    from npt_tools.objective import DEFAULT_OBJECTIVE

    config = npt.NPTConfig()
    assert config.modulation_target == "exact" and config.rank is None
    assert npt.convert_to_npt(tiny_model(), config).npt_config == npt.NPTConfig(rank=64)  # d_model 64 < 384
    assert npt.NPTConfig().at_width(576).rank == 384 and npt.NPTConfig(modulation_target="gate").at_width(576).rank == 16
    args = TrainArgs()
    args.resolve()
    assert args.npt_config(576) == npt.NPTConfig().at_width(576)
    assert args.objective == DEFAULT_OBJECTIVE[config.modulation_target] == "kl"
    assert npt.NPTConfig.from_dict({"rank": 4}) == npt.NPTConfig(rank=4, modulation_target="gate")


def test_convert_exact_is_the_teacher_at_full_rank():
    """One call converts to the exact target and starts it in closed form: at rank d_model the student's logits are
    the teacher's to fp32 precision; a non-exact config is refused."""
    model = tiny_model()
    kept = convert_exact(model, random_batches(), npt.NPTConfig(rank=64))
    assert sorted(kept) == [0, 1, 2] and model.npt_config.exact
    batch = random_batches(1, seed=5)[0]
    with torch.no_grad():
        student = model(**batch).logits
        with npt.npt_disabled(model):
            teacher = model(**batch).logits
    assert (student - teacher).abs().max() <= 1e-4 * teacher.abs().max()
    with pytest.raises(ValueError, match="convert_exact converts to the exact target"):
        convert_exact(tiny_model(), random_batches(), npt.NPTConfig(modulation_target="gate"))


@pytest.mark.parametrize("target", ["exact", "gate"])
def test_unconvert_gives_back_the_plain_model_bitwise(target):
    """npt.unconvert: the same layer classes, the same parameters bitwise, the same logits bitwise, the hooks that
    were on the layers before conversion, no adapters."""
    base = tiny_model()
    plain = copy.deepcopy(base)
    fired = []
    base.model.layers[1].register_forward_hook(lambda *a: fired.append(1))
    model = npt.convert_to_npt(base, npt.NPTConfig(rank=8, modulation_target=target))
    if target == "exact":
        init_exact(model, random_batches())
    batch = random_batches(1, seed=5)[0]
    with torch.no_grad():
        model(**batch)  # a converted forward first: nothing of it may stay behind
    fired.clear()
    assert npt.unconvert(model) is model and not npt.npt_layers(model) and not hasattr(model, "npt_config")
    assert [type(m) for m in model.model.layers] == [type(m) for m in plain.model.layers]
    ours, theirs = model.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
    assert fired == [1]
