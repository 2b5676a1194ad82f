"""The fine-tuning baseline editor (benchmarks/editors.py) on a tiny random Llama: its deltas equal a plain Adam loop
written here, it changes only the parameters it names, and it leaves the model bitwise as it found it."""
import copy

import pytest
import torch
from transformers import AutoTokenizer

from npt_tools.models import embedded_model_path
from helpers import tiny_model

from benchmarks.editors import finetune_edit, finetune_parameters
from npt_tools.edit import applied as edited

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)
CONTEXT = "The capital of France is Rome."


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(embedded_model_path())


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", layers=3, hidden=32, ffn=64, seed=0, vocab_size=len(tok), pad_token_id=None)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("params, layers", [("mlp", [1, 2]), ("all", None)])
def test_finetune_edit_is_adam_on_the_context(model, tok, params, layers):
    before = state(model)
    deltas = finetune_edit(model, tok, CONTEXT, steps=3, lr=1e-2, params=params, layers=layers)
    for n, p in model.named_parameters():  # the model as it was
        assert torch.equal(p, before[n]), n
        assert p.requires_grad and p.grad is None
    ref = copy.deepcopy(model)  # plain Adam written from its definition: full-batch steps on the context's loss
    chosen = [p for n, p in ref.named_parameters() if n in deltas]
    opt = torch.optim.Adam(chosen, lr=1e-2)
    ids = torch.tensor([tok(CONTEXT)["input_ids"]])
    for _ in range(3):
        opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    if params == "mlp":
        assert sorted(deltas) == sorted(f"model.layers.{i}.mlp.{w}_proj.weight" for i in (1, 2)
                                        for w in ("gate", "up", "down"))
    else:
        assert set(deltas) == set(before)
    for n, p in ref.named_parameters():
        expect = p.detach() - before[n]
        assert torch.allclose(deltas[n], expect, atol=1e-6) if n in deltas else torch.equal(expect, 0 * expect), n
    with edited(model, deltas), torch.no_grad():  # the edited model is the fine-tuned one
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_edited_lowers_the_loss_and_restores(model, tok):
    ids = torch.tensor([tok(CONTEXT)["input_ids"]])
    before, base = state(model), loss(model, ids)
    deltas = finetune_edit(model, tok, CONTEXT, steps=5, lr=1e-2)
    with edited(model, deltas):
        assert loss(model, ids) < base - 0.1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="'nope', which is not a base parameter"):
        with edited(model, {"nope": torch.zeros(1)}):
            pass


def test_bad_choices(model):
    with pytest.raises(ValueError, match="params must be one of mlp, all"):
        finetune_parameters(model, "attention")
    with pytest.raises(ValueError, match=r"layers \[7\] are outside"):
        finetune_parameters(model, "mlp", [0, 7])
