"""What the benchmarks share: packed windows of the builtin corpus and of other text files, the teacher's moments
over windows, and the held-out score of a converted model (perplexity and top-1 agreement against the teacher's).
Run a benchmark from the repository root as a module: `python -m benchmarks.exact_start ...`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import npt
from npt_tools.closed_form import teacher_moments

HELD_OUT = 16  # held-out windows


def windows(tokenizer, length: int, count: int) -> torch.Tensor:
    """(n, length) packed windows of the builtin corpus (pydoc_data.topics in key order), n = count or fewer."""
    from pydoc_data.topics import topics

    return pack(tokenizer("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"],
                length, count)


def text_windows(tokenizer, path: str, length: int = 128, count: int = HELD_OUT) -> torch.Tensor:
    """Packed windows of a text file: held-out text from another domain than the training corpus."""
    with open(path, encoding="utf-8") as f:
        return pack(tokenizer(f.read(), add_special_tokens=False)["input_ids"], length, count)


def pack(ids: list[int], length: int, count: int) -> torch.Tensor:
    """The first min(count, len(ids) // length) whole windows of `length` ids: (n, length)."""
    n = min(count, len(ids) // length)
    return torch.tensor(ids[:n * length], dtype=torch.long).view(n, length)


def moments(model, ids: torch.Tensor, batch: int = 8, gradient_windows: int | None = None, seed: int = 0) -> dict:
    """{layer_idx: attention and gradient moments} of the teacher over the windows `ids` (the gradients' over the
    first `gradient_windows`, rounded up to whole batches; None: all; y drawn with `seed`)."""
    return teacher_moments(model, ({"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(batch)),
                           seed=seed,
                           gradient_batches=None if gradient_windows is None else -(-gradient_windows // batch))


@torch.no_grad()
def agreement(model, ids) -> dict:
    """Teacher and student perplexity and top-1 agreement on held-out windows."""
    logits = {}
    for who in ("teacher", "student"):
        ctx = npt.npt_disabled(model) if who == "teacher" else torch.no_grad()
        with ctx:
            logits[who] = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:].reshape(-1)
    ppl = {w: math.exp(F.cross_entropy(v.reshape(-1, v.shape[-1]), targets).item()) for w, v in logits.items()}
    agree = (logits["teacher"].argmax(-1) == logits["student"].argmax(-1)).float().mean().item()
    return {"teacher_ppl": ppl["teacher"], "student_ppl": ppl["student"], "agreement": agree}
