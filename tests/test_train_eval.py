"""pretrain_npt_safe's held-out evaluation against plain forwards of the base and the NPT model."""
import json

import pytest
import torch

from helpers import LAYERS, make_batch, naive_layerwise, npt_model
from npt_tools.report import evaluate, write_equivalence

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)


def test_evaluate_against_plain_forwards(tiny_llama):
    """Teacher ppl is the base model's, student ppl the NPT model's, agreement their top-1 match."""
    model = npt_model(tiny_llama)
    batches = [make_batch([7, 4], seed=3), make_batch([6], seed=4)]
    got = evaluate(model, batches)
    nll = {"t": 0.0, "s": 0.0}
    agree = count = 0
    for b in batches:
        with torch.no_grad():
            t = tiny_llama(**b).logits.double()
            s = model(**b).logits.double()
        for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
            tgt = b["input_ids"][i, 1:n]
            nll["t"] += torch.nn.functional.cross_entropy(t[i, :n - 1], tgt, reduction="sum").item()
            nll["s"] += torch.nn.functional.cross_entropy(s[i, :n - 1], tgt, reduction="sum").item()
            agree += (t[i, :n - 1].argmax(-1) == s[i, :n - 1].argmax(-1)).sum().item()
            count += n - 1
    assert got["eval_teacher_ppl"] == pytest.approx(torch.tensor(nll["t"] / count).exp().item(), rel=1e-5)
    assert got["eval_student_ppl"] == pytest.approx(torch.tensor(nll["s"] / count).exp().item(), rel=1e-5)
    assert got["eval_agreement"] == pytest.approx(agree / count)
    assert got["eval_student_ppl"] != pytest.approx(got["eval_teacher_ppl"], rel=1e-3)
    # each layer's update error on the teacher's input, token-weighted over the batches
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    per_batch = [naive_layerwise(model, b, "update")[1] for b in batches]  # mean over layers
    ref = sum(n * e.item() for n, e in zip(tokens, per_batch)) / sum(tokens)
    assert len(got["eval_layer_update_error"]) == len(LAYERS) and all(v > 0 for v in got["eval_layer_update_error"])
    assert got["eval_update_error"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("objective", ["kl", "end_to_end"])
def test_per_layer_errors_are_the_layerwise_ones_whatever_the_objective(tiny_llama, objective):
    """The report's per-layer update error is on the teacher's input for every objective (kl and end_to_end reuse
    their own teacher pass for it): the same numbers as a layerwise evaluation."""
    model = npt_model(tiny_llama)
    batches = [make_batch([7, 4], seed=5), make_batch([6], seed=6)]
    reference = evaluate(model, batches, "layerwise")
    got = evaluate(model, batches, objective)
    assert got["eval_layer_update_error"] == pytest.approx(reference["eval_layer_update_error"], rel=1e-6)
    assert got["eval_student_ppl"] == pytest.approx(reference["eval_student_ppl"], rel=1e-6)
    assert got["eval_loss"] != pytest.approx(reference["eval_loss"], rel=1e-3)  # the objective's own loss


@pytest.mark.parametrize("final_loss, verdict", [(0.5, "falls"), (2.0, "the end is WORSE than the start")])
def test_report_says_whether_training_helped_and_names_the_result(tmp_path, final_loss, verdict):
    metrics = tmp_path / "metrics.jsonl"
    row = {"eval_teacher_ppl": 10.0, "eval_student_ppl": 11.0, "eval_agreement": 0.9}
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "eval_loss": 1.0, "eval_layer_update_error": [0.1, 0.2], **row},
        {"step": 5, "loss": 3.0},
        {"step": 10, "eval_loss": final_loss, "eval_layer_update_error": [0.3, 0.1], **row}]) + "\n")
    best = 10 if final_loss < 1 else 0
    table = write_equivalence(metrics, tmp_path, [4, 7], best_step=best)
    report = json.loads((tmp_path / "equivalence.json").read_text())
    assert (report["eval_loss_start"], report["eval_loss_final"], report["best_step"]) == (1.0, final_loss, best)
    last = table.splitlines()[-1]
    assert verdict in last and f"checkpoint-best (step {best}" in last
    assert ("= checkpoint-final" in last) == (best == 10)
