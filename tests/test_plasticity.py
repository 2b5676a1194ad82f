"""npt_tools.plasticity, the library's consolidation: the insertion formulas against float64 references, the
attention pull-back against a per-head loop, the context rule, compute_edit's contract (the model untouched, deltas by
plain Hugging Face names, NPT names mapped), and on the embedded model: an edit makes the new object win and leaves a
neighbour's answer."""
import copy

import pytest
import torch
from transformers import AutoTokenizer

import npt
from npt_tools import plasticity as P
from npt_tools.models import embedded_model_path
from helpers import assert_same, rel_err, tiny_model

ONE_TORCH_THREAD = True
OPTIONS = dict(layers=(0, 1), covariance_tokens=2048, prefixes=2, prefix_tokens=6)
FRANCE = P.Fact("The capital of France is", "France", "Rome")
PREFIXES = ["Some text.", "More text here, and longer."]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(embedded_model_path())


@pytest.fixture(scope="module")
def model(tok):
    return small_model(tok, "llama", layers=3, seed=0)


def small_model(tok, arch: str, layers: int, seed: int):
    """A tiny random decoder with the embedded model's vocabulary (its tokenizer's texts run through it)."""
    return tiny_model(arch, layers=layers, hidden=32, ffn=48, seed=seed, vocab_size=len(tok), pad_token_id=None,
                      max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPT_CACHE", str(tmp_path))


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return a @ a.t() / (2 * n)


def test_rank_one_update_writes_the_key_and_spares_keys_orthogonal_in_the_c_metric():
    g = torch.Generator().manual_seed(1)
    c = spd(12, 2)
    c_inv = torch.linalg.inv(c)
    w, k, r = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 12), (12,), (5,)))
    other = torch.randn(12, generator=g, dtype=torch.float64)
    other = other - (other @ c_inv @ k) / (k @ c_inv @ k) * k  # k'^T C^-1 k = 0
    new = w + P.rank_one_update(c_inv, k, r)
    assert rel_err(new @ k, w @ k + r) < 1e-12
    assert rel_err(new @ other, w @ other) < 1e-12


def test_insert_equals_the_closed_form_and_keeps_earlier_keys(model, tok):
    ed = P.Editor(copy.deepcopy(model), tok, covariance_weight=1e-3, **OPTIONS)
    weight = P.decoder_mlp(ed.model, 1).down_proj.weight
    w0, c = weight.detach().double().clone(), ed.covariance[1].double()
    g = torch.Generator().manual_seed(3)
    k1, k2 = torch.randn(48, 3, generator=g), torch.randn(48, 2, generator=g)
    r1, r2 = torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g)
    ed.insert(1, k1, r1)
    w1 = weight.detach().double().clone()
    ed.insert(1, k2, r2)
    lam, k1d, k2d = 1e-3 * c, k1.double(), k2.double()
    d1 = r1.double() @ k1d.t() @ torch.linalg.inv(lam + k1d @ k1d.t())
    d2 = r2.double() @ k2d.t() @ torch.linalg.inv(lam + k1d @ k1d.t() + k2d @ k2d.t())
    assert rel_err(weight.detach(), w0 + d1 + d2) < 1e-4
    assert rel_err(w1 @ k1d, w0 @ k1d + r1.double()) < 1e-3  # the keys written
    assert rel_err(weight.detach().double() @ k2d, w1 @ k2d + r2.double()) < 1e-3
    assert rel_err(weight.detach().double() @ k1d, w1 @ k1d) < 1e-3  # the earlier ones kept
    assert ed.inverse(1).is_contiguous()  # (a column-major A^-1 made every solve many times slower on a CPU)


def test_insert_with_neighbours_equals_the_closed_form_and_forgets_them(model, tok):
    ed = P.Editor(copy.deepcopy(model), tok, covariance_weight=1e-2, neighbour_weight=50.0, **OPTIONS)
    weight = P.decoder_mlp(ed.model, 0).down_proj.weight
    w0, c = weight.detach().double().clone(), ed.covariance[0].double()
    g = torch.Generator().manual_seed(5)
    k, r, p = torch.randn(48, 2, generator=g), torch.randn(32, 2, generator=g), torch.randn(48, 7, generator=g)
    ed.insert(0, k, r, preserve=p)
    kd, pd = k.double(), p.double()
    ref = r.double() @ kd.t() @ torch.linalg.inv(1e-2 * c + 50.0 * pd @ pd.t() + kd @ kd.t())
    assert rel_err(weight.detach().double() - w0, ref) < 1e-4
    without = (weight.detach().double() - w0) @ pd
    assert without.norm() < 0.05 * (ref @ torch.randn(48, 7, dtype=torch.float64, generator=g)).norm()  # spared
    assert rel_err(ed.inverses[0], torch.linalg.inv(1e-2 * c + kd @ kd.t())) < 1e-6  # P is this edit's only


def test_neighbour_memory_keeps_an_edits_neighbours_for_the_later_edits(model, tok):
    ed = P.Editor(copy.deepcopy(model), tok, covariance_weight=1e-2, neighbour_memory=0.3, passes=1, **OPTIONS)
    fact = P.Fact("The capital of France is", "France", "Rome")
    found = ed.value(fact)
    keys, others = found[1].keys, found[2]
    ed.write(fact, found=found)
    for i in ed.layers:
        k, p, c = keys[i].double().t(), others[i].double(), 1e-2 * ed.covariance[i].double()
        assert rel_err(ed.inverses[i], torch.linalg.inv(c + 0.3 * p @ p.t() + k @ k.t())) < 1e-6
        assert rel_err(ed.inverses[i], torch.linalg.inv(c + k @ k.t())) > 1e-2  # (the neighbours' term matters)


def test_best_other_is_the_largest_logit_of_any_other_token():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    token = int(logits[2].argmax())  # row 2: the token itself leads
    values, tokens = P.best_other(logits, token)
    masked = logits.clone()
    masked[:, token] = -torch.inf
    assert torch.equal(tokens, masked.argmax(1)) and torch.equal(values, masked.max(1).values)
    assert tokens[2] != token and values[2] < logits[2, token]


def test_woodbury_equals_the_direct_inverse():
    a, k = spd(10, 6), torch.randn(10, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert rel_err(P.woodbury(torch.linalg.inv(a), k), torch.linalg.inv(a + k @ k.t())) < 1e-10


def test_neighbours_are_pool_words_near_the_subject_put_in_its_place_in_the_prompt(model, tok, monkeypatch):
    words = P.pool_words(tok)
    assert "Paris" in words and "Germany" in words and "the" not in words and "Xx" not in words
    ed = P.Editor(copy.deepcopy(model), tok, neighbours=5, donors=2, search_dtype="float32", **OPTIONS)
    fact = P.Fact("The city of New Paris is in", "New Paris", "Spain", "France")
    seen, real_encode = [], P.encode
    monkeypatch.setattr(P, "encode", lambda tk, texts, ends: seen.append((texts, ends)) or real_encode(tk, texts, ends))
    hidden = 0.1 * torch.randn(32)
    keys, donor = ed.neighbourhood(fact, ed.neighbour_words(fact, torch.randn(48)), hidden)
    texts, ends = seen[-1]  # (the first calls build the pool)
    names = [t[12:ends[j]] for j, t in enumerate(texts)]
    assert len(texts) == 5 and all(t == f"The city of {w} is in" for t, w in zip(texts, names))
    assert not any(w in ("Paris", "New") for w in names)  # the subject's own words left out
    assert sorted(keys) == [0, 1] and keys[0].shape == (48, 5)
    # the donors: the two words whose own prompt prefers Spain to France by most, their residual after the band's
    # top layer at the word's last token, one plain forward each
    new, old = P.first_token(tok, "Spain"), P.first_token(tok, "France")
    lead, resid, key_ref = [], [], []
    for t, w in zip(texts, names):
        ids, pos = tok(t, return_tensors="pt").input_ids, len(tok(" ".join(t.split()[:3]) + " " + w).input_ids) - 1
        hook = P.decoder_mlp(ed.model, 1).down_proj.register_forward_pre_hook(
            lambda m, a: key_ref.append(a[0][0, pos].double()))
        with torch.no_grad():
            out = ed.model(ids, output_hidden_states=True)
        hook.remove()
        logp = out.logits[0, -1].double().log_softmax(-1)
        lead.append(float(logp[new] - logp[old]))
        resid.append(out.hidden_states[2][0, pos].double())
    best = sorted(range(5), key=lambda j: -lead[j])[:2]
    ref = (resid[best[0]] + resid[best[1]]) / 2 - hidden.double()
    assert rel_err(donor.double(), ref) < 1e-5 and rel_err(keys[1].t().double(), torch.stack(key_ref)) < 1e-5
    ed.search_dtype = torch.bfloat16  # the search in bfloat16: the same donors, to its precision
    assert rel_err(ed.neighbourhood(fact, names, hidden)[1].double(), ref) < 3e-2
    ed.search_dtype, ed.opts.donors = torch.float32, 0  # no donors: the keys alone, the tokens after the word not run
    keys, donor = ed.neighbourhood(fact, names, hidden)
    assert donor is None and seen[-1][0] == [f"The city of {w}" for w in names]
    assert rel_err(keys[1].t().double(), torch.stack(key_ref)) < 1e-5


@pytest.mark.parametrize("bound", [0.0, 1e-5])
def test_the_trust_region_bounds_each_edits_change_of_the_mlp_output(model, tok, bound):
    ed = P.Editor(copy.deepcopy(model), tok, max_change=bound, **OPTIONS)
    weights = {i: P.decoder_mlp(ed.model, i).down_proj.weight for i in ed.layers}
    before = {i: w.detach().double().clone() for i, w in weights.items()}
    deltas = ed.write(P.Fact("The capital of France is", "France", "Rome"))
    change = {}
    for i, d in deltas.items():
        assert rel_err(weights[i].detach().double(), before[i] + d.double()) < 1e-6  # the weight has what it returns
        c = ed.covariance[i].double()
        change[i] = torch.trace(d.double() @ c @ d.double().t()) / torch.trace(before[i] @ c @ before[i].t())
    if bound:
        assert max(change.values()) == pytest.approx(bound, rel=1e-4)  # binding here: the edit scaled down to it
    else:
        assert max(change.values()) > 1e-4


def test_a_replayed_forward_equals_the_full_forward_with_the_change_added(model, tok):
    fact = P.Fact("The capital of France is", "France", "Rome")
    q = P.fact_queries(tok, fact, ["Some text.", "More text here."])
    add = torch.randn(len(q.last_pos), 32, generator=torch.Generator().manual_seed(5))
    rows = torch.arange(len(q.last_pos))

    def adder(module, args, out):
        out = out.clone()
        out[rows, q.subject_pos] += add
        return out

    handle = npt.decoder_layers(model)[0].register_forward_hook(adder)
    try:
        ref = P.attention_paths(model, q, 0)
    finally:
        handle.remove()
    first = P.attention_paths(model, q, 0)
    layers = list(npt.decoder_layers(model))
    got = P.attention_paths(model, q, 0, replay=P.with_change(first.hidden, q, add))
    assert list(npt.decoder_layers(model)) == layers  # the layers put back
    assert rel_err(got.logits, ref.logits) < 1e-5 and rel_err(first.logits, ref.logits) > 1e-3
    assert all(rel_err(got.inputs[i], ref.inputs[i]) < 1e-5 and rel_err(got.attn[i], ref.attn[i]) < 1e-5
               for i in (1, 2))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_aligned_queries_and_their_prefix_cache_give_the_full_forwards(tok, arch):
    model, fact, prefixes = small_model(tok, arch, layers=3, seed=1), FRANCE, PREFIXES
    q = P.fact_queries(tok, fact, prefixes, align=True)
    start = int(q.subject_pos[0])
    assert (q.subject_pos == start).all() and (q.attention_mask[:, 0] == 0).any()  # left-padded to one column
    with torch.no_grad():  # each text alone, no padding
        alone = torch.stack([model(**tok(t, return_tensors="pt")).logits[0, -1].float()
                             for t in [fact.prompt] + [f"{p} {fact.prompt}" for p in prefixes]])
    assert rel_err(P.last_logits(model, q), alone) < 1e-5
    first = P.attention_paths(model, q, 0, key_layers=[0])
    prefix = first.prefix
    keys, hidden, _ = P.run(model, q, [0], 0, logits=False, whole=True)  # layers 0..top alone: the same
    real = q.attention_mask.bool()  # (what a padding position holds depends on the attention's implementation)
    assert rel_err(keys[0], first.keys[0]) < 1e-6 and rel_err(hidden[real], first.hidden[real]) < 1e-6
    assert prefix.start == start and P.attention_paths(model, P.fact_queries(tok, fact, prefixes), 0).prefix is None
    add = torch.randn(len(q.last_pos), 32, generator=torch.Generator().manual_seed(6))
    full = P.attention_paths(model, q, 0, replay=P.with_change(first.hidden, q, add))
    cached = P.attention_paths(model, q, 0, replay=P.with_change(first.hidden[:, start:], q, add, start), prefix=prefix)
    assert rel_err(cached.logits, full.logits) < 1e-5 and rel_err(full.logits, first.logits) > 1e-3
    assert all(rel_err(cached.inputs[i], full.inputs[i]) < 1e-5 and rel_err(cached.attn[i], full.attn[i]) < 1e-5
               for i in (1, 2))
    many, adds = P.repeat(q, 3), torch.randn(3 * len(q.last_pos), 32, generator=torch.Generator().manual_seed(8))
    with P.replayed(model, 0, P.with_change(first.hidden.repeat(3, 1, 1), many, adds)):
        ref = P.last_logits(model, many)
    with P.replayed(model, 0, P.with_change(first.hidden[:, start:].repeat(3, 1, 1), many, adds, start)):
        got = P.last_logits(model, many, prefix)  # the line search's forward: the rows repeated, one cache
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_value_gradient_equals_float64_autograd_on_each_text_alone(tok, arch):
    model, fact, prefixes = small_model(tok, arch, layers=4, seed=2), FRANCE, PREFIXES
    texts = [fact.prompt] + [f"{p} {fact.prompt}" for p in prefixes]
    q, top, token = P.fact_queries(tok, fact, prefixes, align=True), 1, P.first_token(tok, "Rome")
    add = torch.randn(len(texts), 32, generator=torch.Generator().manual_seed(9))
    first = P.attention_paths(model, q, top)
    got = P.value_gradient(model, q, top, first.hidden, add, first.prefix, token)
    plain = P.value_gradient(model, q, top, first.hidden, add, None, token)  # without the prefix cache
    ref64 = copy.deepcopy(model).double()
    ref = []
    for b, text in enumerate(texts):  # each text alone, unpadded, in float64: a hook adds the change
        ids = tok(text, return_tensors="pt")["input_ids"]
        at = int(q.subject_pos[b] - q.last_pos[b]) + ids.shape[1] - 1  # the subject's column in it
        change = add[b].double().clone().requires_grad_(True)

        def adder(module, args, out, at=at, change=change):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, at] += change
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = npt.decoder_layers(ref64)[top].register_forward_hook(adder)
        try:
            logp = ref64(ids).logits[0, -1].log_softmax(-1)[token]
        finally:
            handle.remove()
        ref.append(torch.autograd.grad(logp, change)[0])
    ref = torch.stack(ref)
    assert rel_err(got, ref) < 1e-4 and rel_err(plain, ref) < 1e-4
    assert not any(p.grad is not None for p in model.parameters())  # no weight's gradient


def test_the_search_runs_on_a_copy_in_search_dtype_kept_up_to_date_with_the_edits(model, tok):
    ed = P.Editor(copy.deepcopy(model), tok, search_dtype="bfloat16", **OPTIONS)
    seen, search_value = [], ed.residual_change

    def spy(*args, **kwargs):  # while a write searches: the copy has the band's weights as the model has them now
        seen.append(all(torch.equal(P.decoder_mlp(ed.searcher(), i).down_proj.weight,
                                    P.decoder_mlp(ed.model, i).down_proj.weight.detach().bfloat16())
                        for i in ed.layers))
        return search_value(*args, **kwargs)

    ed.residual_change = spy
    first = ed.write(P.Fact("The capital of France is", "France", "Rome"))
    kept = {i: v.clone() for i, v in ed.inverses.items()}
    ed.write(P.Fact("The capital of Spain is", "Spain", "Berlin"), remember=False)
    assert seen == [True, True] and max(float(d.abs().max()) for d in first.values()) > 1e-4
    assert all(torch.equal(ed.inverses[i], kept[i]) for i in ed.layers)  # not remembered: later edits are free
    ed.write(P.Fact("The capital of Spain is", "Spain", "Berlin"))
    assert not any(torch.equal(ed.inverses[i], kept[i]) for i in ed.layers)
    search = ed.searcher()
    assert search is not ed.model and {p.dtype for p in search.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ed.model.parameters()} == {torch.float32}
    plain = P.Editor(model, tok, search_dtype="float32", **OPTIONS)
    assert plain.searcher() is model and P.search_dtype("auto", torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16
    with pytest.raises(ValueError, match="search_dtype 'fp8'"):
        P.Editor(model, tok, search_dtype="fp8", **OPTIONS)
    assert P.parse_options(["search_dtype=float32"]) == {"search_dtype": "float32"}


def test_pullback_equals_a_loop_over_heads(model, tok):
    fact = P.Fact("The capital of France is", "France", "Rome")
    q = P.fact_queries(tok, fact, ["Some text."])
    paths = P.attention_paths(model, q, 0)
    inputs, attn = paths.inputs, paths.attn
    u = torch.randn(len(q.last_pos), 32, generator=torch.Generator().manual_seed(4))
    got = P.pullback(model, q, inputs, attn, u)
    heads, kv, dh = 4, 2, 8
    ref = torch.zeros(len(q.last_pos), 32, dtype=torch.float64)
    for i in (1, 2):
        sa, norm = model.model.layers[i].self_attn, model.model.layers[i].input_layernorm
        for b in range(len(q.last_pos)):
            h = inputs[i][b].double()
            scale = norm.weight.double() / (h.square().mean() + norm.variance_epsilon).sqrt()
            for head in range(heads):
                wo = sa.o_proj.weight.double()[:, head * dh:(head + 1) * dh]
                grp = head // (heads // kv)
                wv = sa.v_proj.weight.double()[grp * dh:(grp + 1) * dh]
                ref[b] += attn[i][b, head].double() * scale * (wv.t() @ wo.t() @ u[b].double())
    assert rel_err(got, ref) < 1e-5
    with torch.no_grad():  # the attention weights are the eager forward's own
        eager = copy.deepcopy(model)
        eager.config._attn_implementation = "eager"
        out = eager(input_ids=q.input_ids, attention_mask=q.attention_mask, output_attentions=True)
    rows = torch.arange(len(q.last_pos))
    assert rel_err(attn[2], out.attentions[2][rows, :, q.last_pos, q.subject_pos]) < 1e-6


@pytest.mark.parametrize("context, prompt, subject, target", [
    ("The capital of France is Rome.", "The capital of France is", "France", "Rome"),
    ("Danielle Darrieux's mother tongue is English", "Danielle Darrieux's mother tongue is", "Danielle Darrieux",
     "English"),
    ("the sky is green.", "the sky is", "sky", "green"),
])
def test_parse_context_rule(context, prompt, subject, target):
    fact = P.parse_context(context)
    assert (fact.prompt, fact.subject, fact.target_new) == (prompt, subject, target)


def test_parse_context_refuses_a_single_word():
    with pytest.raises(ValueError, match="at least two words"):
        P.parse_context("Rome.")


def test_compute_edit_leaves_the_model_and_names_plain_parameters(model, tok):
    before = copy.deepcopy(model.state_dict())
    deltas = P.compute_edit(model, tok, ["The capital of France is Rome.", "The capital of Spain is Oslo."],
                            **OPTIONS)
    assert_same(model.state_dict(), before, "the model's weights")
    named = dict(model.named_parameters())
    assert sorted(deltas) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    for name, d in deltas.items():
        assert d.dtype == torch.float32 and d.shape == named[name].shape and torch.isfinite(d).all()
        assert d.abs().max() > 0


def test_compute_edit_on_an_npt_model_uses_the_plain_names(model, tok):
    converted = npt.convert_to_npt(copy.deepcopy(model), npt.NPTConfig(rank=32, modulation_target="exact"))
    assert any(".layer." in n for n, _ in converted.named_parameters())
    deltas = P.compute_edit(converted, tok, ["The capital of France is Rome."], **OPTIONS)
    plain = dict(model.named_parameters())
    assert sorted(deltas) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert all(d.shape == plain[n].shape for n, d in deltas.items())


def test_compute_edit_refuses_bad_input(model, tok):
    with pytest.raises(ValueError, match="non-empty list"):
        P.compute_edit(model, tok, "The capital of France is Rome.")
    with pytest.raises(ValueError, match="one record per context"):
        P.compute_edit(model, tok, ["a b"], records=[])
    with pytest.raises(ValueError, match="unknown option"):
        P.compute_edit(model, tok, ["a b"], learning_rate=1)
    with pytest.raises(ValueError, match="unknown method"):
        P.compute_edit(model, tok, ["a b"], method="magic")
    with pytest.raises(ValueError, match="at least 1"):
        P.compute_edit(model, tok, ["a b"], passes=0)
    with pytest.raises(ValueError, match="unknown direction 'newton'"):
        P.compute_edit(model, tok, ["a b"], direction="newton")
    with pytest.raises(ValueError, match="direction is one of pullback, gradient"):
        P.parse_options(["direction=newton"])
    assert P.parse_options(["direction=gradient", "rounds=3"]) == {"direction": "gradient", "rounds": 3}
    along = {d: P.Editor(model, tok, direction=d, **OPTIONS).opts for d in P.DIRECTIONS}  # each direction's defaults
    assert {d: (o.rounds, o.donors, o.neighbour_memory) for d, o in along.items()} == {
        "pullback": (2, 4, 0.0), "gradient": (4, 0, 0.3)}
    assert P.Editor(model, tok, direction="gradient", donors=2, **OPTIONS).opts.donors == 2
    assert P.parse_options(["neighbours=64"]) == {"neighbours": 64}


@pytest.mark.integration
@pytest.mark.parametrize("direction", ["pullback", "gradient"])
def test_an_edit_makes_the_new_object_win_and_spares_a_neighbour(embedded, direction):
    from npt_tools.counterfact import Record, evaluate_records

    model, tok = embedded
    records = [Record("The capital of {} is", s, new, true, [f"The capital city of {s} is"], [])
               for s, new, true in (("France", "Rome", "Paris"), ("Japan", "Madrid", "Tokyo"))]
    neighbour = Record("The capital of {} is", "Germany", "Berlin", "Rome", [], [])  # "new": the true answer
    before = evaluate_records(model, tok, records)
    deltas = P.compute_edit(model, tok, [r.context for r in records], records, direction=direction)
    named = dict(model.named_parameters())
    original = {n: named[n].detach().clone() for n in deltas}
    try:
        for n, d in deltas.items():
            P.add_to_weight(named[n], d)
        after = evaluate_records(model, tok, records)
        kept = evaluate_records(model, tok, [neighbour])
    finally:
        with torch.no_grad():
            for n, w in original.items():
                named[n].copy_(w)
    assert before["es"] == 0 and after["es"] == 1
    assert kept["es"] == 1  # Germany's capital is still Berlin rather than Rome (CounterFact's NS comparison)
