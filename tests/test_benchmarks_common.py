"""benchmarks.common, the benchmarks' shared helpers, against independent references on tiny models."""
import copy
import math

import pytest
import torch

import npt
from benchmarks.common import agreement, moments, pack, text_windows, windows
from helpers import tiny_model
from npt_tools.closed_form import init_exact, teacher_moments


class CharTokenizer:
    """Ids = character codes: the windows can be checked against the text itself."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_pack_the_text_in_order(tmp_path):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    w = windows(CharTokenizer(), 50, 3)
    assert w.shape == (3, 50) and "".join(map(chr, w.flatten().tolist())) == text[:150]
    (tmp_path / "t.txt").write_text("abcdefghij", encoding="utf-8")
    assert text_windows(CharTokenizer(), str(tmp_path / "t.txt"), 4, 16).tolist() == [[97, 98, 99, 100],
                                                                                      [101, 102, 103, 104]]
    assert pack(list(range(7)), 3, 1).tolist() == [[0, 1, 2]] and pack([1, 2], 3, 5).shape == (0, 3)


def test_agreement_is_perplexity_and_top1_against_the_plain_model():
    plain = tiny_model()
    model = npt.convert_to_npt(copy.deepcopy(plain), npt.NPTConfig(rank=8, modulation_target="gate"))
    with torch.no_grad():
        for p in npt.get_adapter_params(model):
            p.normal_(std=0.3)  # a student that differs from its teacher
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    got = agreement(model, ids)
    with torch.no_grad():
        t = plain(input_ids=ids).logits[:, :-1].double()
        s = model(input_ids=ids).logits[:, :-1].double()
    targets = ids[:, 1:]
    nll = {k: -torch.log_softmax(v, -1).gather(-1, targets[..., None]).mean().item() for k, v in (("t", t), ("s", s))}
    assert got["teacher_ppl"] == pytest.approx(math.exp(nll["t"]), rel=1e-5)
    assert got["student_ppl"] == pytest.approx(math.exp(nll["s"]), rel=1e-5)
    assert got["agreement"] == pytest.approx((t.argmax(-1) == s.argmax(-1)).double().mean().item())
    assert 0 < got["agreement"] < 1


def test_moments_are_the_teachers_over_whole_batches_of_windows():
    model = npt.convert_to_npt(tiny_model(), npt.NPTConfig(rank=8))
    ids = torch.randint(1, 128, (5, 10), generator=torch.Generator().manual_seed(1))
    got = moments(model, ids, batch=2, gradient_windows=3, seed=4)  # 3 windows: 2 whole batches of gradients
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(2)]
    want = teacher_moments(model, batches, seed=4, gradient_batches=2)
    assert sorted(got) == sorted(want) == [0, 1, 2]
    for i in got:
        assert all(torch.equal(a, b) for a, b in zip(got[i], want[i]))
    assert got[0][3].item() == 4 * 10  # gradient tokens: 2 batches of 2 windows
    init_exact(model, moments=got)  # what the benchmarks do with them
