"""CounterFact records and metrics (npt_tools.counterfact): target scoring against a float64 reference written
from the definition (one prompt at a time, no padding), multi-token targets, padding independence, the ES/PS/NS
aggregation, held-out drift, and load_records' errors and round trip. Tiny random Llama with the embedded model's
tokenizer (no weights of the embedded model are loaded)."""
import copy
import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from npt_tools.counterfact import (HeldOutDrift, Record, candidate_scores, evaluate_records, harmonic_mean,
                                   in_context, load_records, record_to_json, save_records, target_scores,
                                   unedited_neighbours, unedited_ns)
from npt_tools.data import builtin_held_out_windows
from npt_tools.models import embedded_model_path
from helpers import tiny_model

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(embedded_model_path())


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", layers=2, hidden=32, ffn=64, seed=0, vocab_size=len(tok),
                      max_position_embeddings=256, pad_token_id=None)


def ref_score(model, tok, prompt, target):
    """float64, one sequence: mean -log p of the target's tokens after the prompt; all of them argmax?"""
    m = copy.deepcopy(model).double()
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=torch.tensor([p + t])).logits[0].double(), -1)
    lps = [logp[len(p) - 1 + k, t[k]].item() for k in range(len(t))]
    greedy = all(logp[len(p) - 1 + k].argmax().item() == t[k] for k in range(len(t)))
    return -sum(lps) / len(lps), greedy


PROMPTS = ["The capital of France is", "Paris is a city in", "The Eiffel Tower stands in the city of", "Hi"]
TARGETS = ["Paris", "Rio de Janeiro", "the United Kingdom of Great Britain", "Rome"]


def test_target_scores_match_float64_reference(model, tok):
    assert len(tok(" " + TARGETS[2], add_special_tokens=False)["input_ids"]) > 3  # multi-token targets
    nll, top1 = target_scores(model, tok, PROMPTS, TARGETS, batch_size=4)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        ref, greedy = ref_score(model, tok, p, t)
        assert nll[i].item() == pytest.approx(ref, rel=1e-5), (p, t)
        assert bool(top1[i]) == greedy


def test_padding_and_batching_do_not_change_scores(model, tok):
    one = [target_scores(model, tok, [p], [t]) for p, t in zip(PROMPTS, TARGETS)]
    batched = target_scores(model, tok, PROMPTS, TARGETS, batch_size=3)  # a padded batch of 3, then 1
    assert torch.allclose(batched[0], torch.cat([n for n, _ in one]), rtol=1e-5, atol=1e-6)
    assert torch.equal(batched[1], torch.cat([g for _, g in one]))


def test_top1_is_greedy_decoding(model, tok):
    """A model whose output rows are set so that greedy decoding after the prompt writes a multi-token target:
    top-1 for that target, not for the same target with its last word changed."""
    prompt, target = PROMPTS[1], "Rio de Janeiro"
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    m = copy.deepcopy(model)
    with torch.no_grad():
        h = m.model(input_ids=torch.tensor([p + t])).last_hidden_state[0]  # (T, D): the lm_head's input
        for k, tid in enumerate(t):
            m.lm_head.weight[tid] = 1e3 * h[len(p) - 1 + k] / h[len(p) - 1 + k].norm()
        out = m.generate(torch.tensor([p]), max_new_tokens=len(t), do_sample=False, pad_token_id=0)
    assert out[0, len(p):].tolist() == t
    nll, top1 = target_scores(m, tok, [prompt, prompt], [target, "Rio de Paris"])
    assert top1.tolist() == [True, False]
    assert nll[0] < nll[1]


def make_record(i=0, paraphrases=2, neighbours=2):
    return Record(prompt="The capital of {} is", subject=f"Land{i}", target_new="Rome", target_true="Paris",
                  paraphrase_prompts=[f"Land{i}'s capital city is", f"In Land{i}, the capital is"][:paraphrases],
                  neighborhood_prompts=["The capital of France is", "The seat of the French government is"][:neighbours],
                  relation="P36", case_id=i, extra={"known": True})


def test_evaluate_records_against_reference(model, tok):
    records = [make_record(0), make_record(1, paraphrases=1, neighbours=1)]
    for prefix in ("", in_context):
        got = evaluate_records(model, tok, records, prefix=prefix, batch_size=5, per_record=True)
        ref = {k: [] for k in ("es", "ps", "ns", "es_top1", "ps_top1", "ns_top1")}
        for r in records:
            pre = prefix(r) if callable(prefix) else prefix
            s = {p: {t: ref_score(model, tok, pre + p, t) for t in ("Rome", "Paris")}
                 for p in [r.query] + r.paraphrase_prompts + r.neighborhood_prompts}
            ref["es"].append(float(s[r.query]["Rome"][0] < s[r.query]["Paris"][0]))
            ref["es_top1"].append(float(s[r.query]["Rome"][1]))
            ref["ps"].append(sum(s[p]["Rome"][0] < s[p]["Paris"][0] for p in r.paraphrase_prompts) / len(r.paraphrase_prompts))
            ref["ps_top1"].append(sum(s[p]["Rome"][1] for p in r.paraphrase_prompts) / len(r.paraphrase_prompts))
            ref["ns"].append(sum(s[p]["Paris"][0] < s[p]["Rome"][0] for p in r.neighborhood_prompts)
                             / len(r.neighborhood_prompts))
            ref["ns_top1"].append(sum(s[p]["Paris"][1] for p in r.neighborhood_prompts) / len(r.neighborhood_prompts))
        for k, v in ref.items():
            assert got[k] == pytest.approx(sum(v) / len(v)), k
            assert [e[k] for e in got["per_record"]] == pytest.approx(v), k
        assert got["s"] == pytest.approx(harmonic_mean(got["es"], got["ps"], got["ns"]))


def test_harmonic_mean():
    assert harmonic_mean(1.0, 0.5, 0.25) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean(1.0, 0.0, 1.0) == 0.0


def test_unedited_neighbours_drop_prompts_about_edited_subjects(model, tok):
    java = Record("{} is spoken in", "Javanese", "France", "Indonesia", [],
                  ["Java is an island of", "Sundanese is spoken in", "In Bali, Sundanese and Java are", "Madurese is"])
    sunda = Record("{} is spoken in", "Sundanese", "Peru", "Indonesia", [], ["Javanese is spoken in", "Balinese is"])
    bali = Record("{} is on", "Bali", "Mars", "Earth", [], [])
    kept = unedited_neighbours([java, sunda], [java, sunda, bali])
    assert kept[0].neighborhood_prompts == ["Java is an island of", "Madurese is"]  # Sundanese, Bali edited; Java not
    assert kept[1].neighborhood_prompts == ["Balinese is"]  # (Bali only inside a longer word)
    assert (kept[0].subject, kept[1].paraphrase_prompts) == ("Javanese", [])
    alone = unedited_neighbours([java], [bali])[0].neighborhood_prompts
    assert alone == [java.neighborhood_prompts[i] for i in (0, 1, 3)]
    got = unedited_ns(model, tok, [java, sunda], [java, sunda, bali])
    ref = evaluate_records(model, tok, [dataclasses.replace(java, neighborhood_prompts=kept[0].neighborhood_prompts),
                                        dataclasses.replace(sunda, neighborhood_prompts=["Balinese is"])])
    assert (got["ns_unedited"], got["ns_unedited_top1"]) == (ref["ns"], ref["ns_top1"])
    assert (got["neighbours_unedited"], got["neighbours"]) == (3, 6)


def test_context_is_the_rewrite_as_a_sentence():
    r = make_record()
    assert r.query == "The capital of Land0 is"
    assert r.context == "The capital of Land0 is Rome."


def test_held_out_drift_against_reference(model, tok):
    drift = HeldOutDrift(model, tok, windows=3, length=24, batch_size=2)  # a padded last batch of 1
    same = drift.measure(model)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn_like(edited.model.layers[0].mlp.down_proj.weight))
    got = drift.measure(edited)
    ids = torch.tensor(builtin_held_out_windows(tok, 24, 3))  # (3, 24): every window full
    with torch.no_grad():
        t = torch.log_softmax(copy.deepcopy(model).double()(input_ids=ids).logits[:, :-1], -1)
        s = torch.log_softmax(copy.deepcopy(edited).double()(input_ids=ids).logits[:, :-1], -1)
    kl = (t.exp() * (t - s)).sum(-1).mean().item()
    nxt = ids[:, 1:].unsqueeze(-1)
    ratio = math.exp((t.gather(-1, nxt) - s.gather(-1, nxt)).mean().item())
    assert kl > 1e-4
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["ppl_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_round_trip(tmp_path):
    records = [make_record(0), make_record(1, paraphrases=0, neighbours=1)]
    records[1].relation, records[1].case_id, records[1].extra = None, None, {}
    path = tmp_path / "facts.json"
    save_records(records, path)
    assert load_records(path) == records
    obj = json.loads(path.read_text())[0]
    assert obj["requested_rewrite"]["target_new"] == {"str": "Rome"} and obj["known"] is True
    assert record_to_json(records[0]) == obj


def counterfact_object():
    """A record as CounterFact itself writes one (extra keys included)."""
    return {"case_id": 7, "pararel_idx": 3, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"], "attribute_prompts": [],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"]}


def test_loads_counterfact_objects(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([counterfact_object()]))
    (r,) = load_records(path)
    assert (r.subject, r.target_new, r.target_true, r.relation, r.case_id) == (
        "Danielle Darrieux", "English", "French", "P103", 7)
    out = tmp_path / "back.json"
    save_records([r], out)
    assert json.loads(out.read_text()) == [counterfact_object()]  # nothing of the user's file is lost


def broken(field_path, value):
    obj = counterfact_object()
    target = obj
    *parents, last = field_path
    for k in parents:
        target = target[k]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return obj


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not JSON"]),
    ("{}", ["non-empty JSON list"]),
    ("[]", ["non-empty JSON list"]),
    (json.dumps([counterfact_object(), 3]), ["record 1", "JSON object"]),
    (json.dumps([broken(["requested_rewrite"], KeyError)]), ["record 0", "requested_rewrite"]),
    (json.dumps([broken(["requested_rewrite", "prompt"], "The mother tongue of X is")]), ["record 0", "{}"]),
    (json.dumps([broken(["requested_rewrite", "target_new"], "English")]), ["record 0", "target_new.str"]),
    (json.dumps([broken(["requested_rewrite", "subject"], "")]), ["record 0", "subject"]),
    (json.dumps([broken(["paraphrase_prompts"], "one prompt")]), ["record 0", "paraphrase_prompts", "list"]),
    (json.dumps([broken(["neighborhood_prompts"], ["ok", 5])]), ["record 0", "neighborhood_prompts[1]"]),
])
def test_load_records_errors_are_one_line(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_records(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg, msg


def test_load_records_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read facts file .*missing.json"):
        load_records(tmp_path / "missing.json")


def test_candidate_scores_equal_target_scores(model, tok):
    """The cached ranking of a relation's objects after a padded batch of prompts gives target_scores' values
    (single- and multi-token candidates)."""
    cands = ["Paris", "Rio de Janeiro", "the United Kingdom of Great Britain", "Rome", "New York"]
    got = candidate_scores(model, tok, PROMPTS, cands, batch_size=3)  # prompts of 2 to 11 tokens: padded
    ref = target_scores(model, tok, [p for p in PROMPTS for _ in cands], cands * len(PROMPTS))[0]
    assert torch.allclose(got, ref.view(len(PROMPTS), len(cands)), rtol=1e-5, atol=1e-5)
