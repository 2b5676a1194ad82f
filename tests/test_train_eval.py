"""pretrain_npt_safe's held-out evaluation against plain forwards of the base and the NPT model."""
import pytest
import torch

from helpers import LAYERS, make_batch, naive_layerwise, npt_model
from pretrain_npt_safe import evaluate

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
