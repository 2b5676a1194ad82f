"""CounterFact-format records and the knowledge-editing metrics (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", arXiv 2202.05262): ES, PS, NS and their harmonic mean S, each as CounterFact's probability
comparison and as top-1 accuracy; held-out drift (next-token KL and perplexity ratio on the builtin corpus's
held-out text) against the unedited model.

A target's probability after a prompt is CounterFact's: the mean negative log-probability per target token (the
target scored as " " + target, tokenized apart from the prompt and appended to it), lower = more probable."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from npt_tools.data import builtin_held_out_windows, collate
from npt_tools.objective import next_token_kl


@dataclasses.dataclass
class Record:
    """One counterfactual rewrite: `prompt.format(subject)` should now continue with `target_new`, not
    `target_true`; paraphrases state the same question otherwise, neighbourhood prompts are about other subjects
    whose true answer is `target_true` (they must keep it)."""
    prompt: str  # with "{}" where the subject goes
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    relation: str | None = None
    case_id: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # other keys of the JSON object, written back as they were

    @property
    def query(self) -> str:
        """The rewrite's question, bare: the prompt with its subject."""
        return self.prompt.format(self.subject)

    @property
    def context(self) -> str:
        """The rewrite stated as a sentence: 'The capital of France is Rome.'"""
        return f"{self.query} {self.target_new.strip()}."


def in_context(record: Record) -> str:
    """The IKE-style prefix for evaluate_records: the record's rewrite stated before each of its prompts."""
    return record.context + " "


# ----------------------------------------------------------------------------- reading and writing
def _text(x, what: str) -> str:
    if not isinstance(x, str) or not x.strip():
        raise ValueError(f"{what} must be a non-empty string, got {json.dumps(x)[:60]}")
    return x


def _prompts(x, what: str) -> list[str]:
    if not isinstance(x, list):
        raise ValueError(f"{what} must be a list of strings, got {type(x).__name__}")
    return [_text(p, f"{what}[{i}]") for i, p in enumerate(x)]


def record_from_json(obj) -> Record:
    """One CounterFact object as a Record; ValueError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    rw = obj.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise ValueError("no 'requested_rewrite' object")
    prompt = _text(rw.get("prompt"), "requested_rewrite.prompt")
    if prompt.count("{}") != 1:
        raise ValueError(f"requested_rewrite.prompt must hold one '{{}}' where the subject goes, got {prompt!r}")
    targets = {}
    for key in ("target_new", "target_true"):
        t = rw.get(key)
        targets[key] = _text(t.get("str") if isinstance(t, dict) else None, f"requested_rewrite.{key}.str")
    extra = {k: v for k, v in obj.items() if k not in ("requested_rewrite", "paraphrase_prompts",
                                                       "neighborhood_prompts", "case_id")}
    extra.update({f"requested_rewrite.{k}": v for k, v in rw.items()
                  if k not in ("prompt", "subject", "target_new", "target_true", "relation_id")})
    extra.update({f"requested_rewrite.{k}": {n: v for n, v in rw[k].items() if n != "str"}
                  for k in targets if len(rw[k]) > 1})  # e.g. CounterFact's entity ids
    case_id = obj.get("case_id")
    return Record(prompt=prompt, subject=_text(rw.get("subject"), "requested_rewrite.subject"),
                  paraphrase_prompts=_prompts(obj.get("paraphrase_prompts", []), "paraphrase_prompts"),
                  neighborhood_prompts=_prompts(obj.get("neighborhood_prompts", []), "neighborhood_prompts"),
                  relation=rw.get("relation_id") if isinstance(rw.get("relation_id"), str) else None,
                  case_id=case_id if isinstance(case_id, int) else None, extra=extra, **targets)


def record_to_json(r: Record) -> dict:
    """A Record as a CounterFact object (the inverse of record_from_json)."""
    rw = {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
          "target_true": {"str": r.target_true}}
    if r.relation is not None:
        rw["relation_id"] = r.relation
    for key, v in r.extra.items():
        if key.startswith("requested_rewrite."):
            k = key.split(".", 1)[1]
            rw[k] = {**rw[k], **v} if k in ("target_new", "target_true") else v
    obj = {} if r.case_id is None else {"case_id": r.case_id}
    obj.update({"requested_rewrite": rw, "paraphrase_prompts": list(r.paraphrase_prompts),
                "neighborhood_prompts": list(r.neighborhood_prompts)})
    obj.update({k: v for k, v in r.extra.items() if not k.startswith("requested_rewrite.")})
    return obj


def load_records(path: str | os.PathLike) -> list[Record]:
    """CounterFact records from a JSON file (a list of objects with requested_rewrite {prompt with '{}', subject,
    target_new {str}, target_true {str}}, paraphrase_prompts, neighborhood_prompts; other keys are kept). A file
    that cannot be read or a bad record: ValueError, one line naming the file, the record and what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read facts file {str(path)!r}: {e.strerror if isinstance(e, OSError) else e}") \
            from None
    except json.JSONDecodeError as e:
        raise ValueError(f"facts file {str(path)!r} is not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"facts file {str(path)!r} must hold a non-empty JSON list of CounterFact records")
    records = []
    for i, obj in enumerate(data):
        try:
            records.append(record_from_json(obj))
        except ValueError as e:
            raise ValueError(f"facts file {str(path)!r}, record {i}: {e}") from None
    return records


def save_records(records: list[Record], path: str | os.PathLike) -> None:
    """Records as a CounterFact JSON list, written whole, then renamed (no half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([record_to_json(r) for r in records], indent=1, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- scoring
def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


@torch.no_grad()
def target_scores(model, tokenizer, prompts: list[str], targets: list[str],
                  batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (prompt, target): the target's mean negative log-probability per token after the prompt
    (CounterFact's measure; lower = more probable) and whether greedy decoding gives the target's tokens (every
    target token is the argmax given the prompt and the target tokens before it). Right-padded batches.
    Returns (nll (N,) float, top1 (N,) bool)."""
    assert len(prompts) == len(targets)
    rows = []
    for p, t in zip(prompts, targets):
        p_ids = tokenizer(p)["input_ids"]
        t_ids = tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"]
        rows.append((p_ids + t_ids, len(p_ids), len(t_ids)))
    nll, top1 = torch.empty(len(rows)), torch.empty(len(rows), dtype=torch.bool)
    device = next(model.parameters()).device
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        batch = collate([ids for ids, _, _ in chunk], _pad_id(tokenizer))
        logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits.float()
        logp = torch.log_softmax(logits, -1)  # (B, T, V)
        for i, (ids, n_p, n_t) in enumerate(chunk):
            pos = torch.arange(n_p - 1, n_p + n_t - 1, device=device)  # the positions predicting the target
            tgt = torch.tensor(ids[n_p:], device=device)
            nll[b + i] = -logp[i, pos, tgt].mean()
            top1[b + i] = bool((logp[i, pos].argmax(-1) == tgt).all())
    return nll, top1


@torch.no_grad()
def candidate_scores(model, tokenizer, prompts: list[str], candidates: list[str], batch_size: int = 16) -> torch.Tensor:
    """(P, C) target_scores' mean negative log-probability of every candidate after every prompt: a batch of
    prompts runs once and its key/value cache is shared by all candidates (a relation's objects ranked cheaply)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cands = [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] for c in candidates]
    first_ids = torch.tensor([c[0] for c in cands], device=device)
    longer = [i for i, c in enumerate(cands) if len(c) > 1]
    rest = collate([cands[i][:-1] for i in longer], _pad_id(tokenizer)) if longer else None  # (C', T) but the last
    out = torch.empty(len(prompts), len(candidates))
    for b in range(0, len(prompts), batch_size):
        batch = collate([tokenizer(p)["input_ids"] for p in prompts[b:b + batch_size]], _pad_id(tokenizer))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, P)
        lengths = mask.sum(1)
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
        last = torch.log_softmax(logits[torch.arange(len(ids)), lengths - 1].float(), -1)  # (B, V)
        nll = -last[:, first_ids]  # (B, C): each candidate's first token
        if longer:
            n = len(longer)
            cache.batch_repeat_interleave(n)  # row b * n + j: prompt b, candidate longer[j]
            c_ids, c_mask = rest["input_ids"].repeat(len(ids), 1).to(device), rest["attention_mask"].repeat(len(ids), 1)
            pos = lengths.repeat_interleave(n)[:, None] + torch.arange(c_ids.shape[1], device=device)  # (B n, T)
            logp = torch.log_softmax(model(input_ids=c_ids, attention_mask=torch.cat(
                [mask.repeat_interleave(n, 0), c_mask.to(device)], 1), position_ids=pos, cache=cache,
                use_cache=True).logits.float(), -1).view(len(ids), n, c_ids.shape[1], -1)  # (B, C', T, V)
            for j, i in enumerate(longer):
                tail = torch.tensor(cands[i][1:], device=device)
                tail_lp = logp[:, j, torch.arange(len(tail), device=device), tail].sum(-1)  # (B,)
                nll[:, i] = (nll[:, i] - tail_lp) / len(cands[i])
        out[b:b + len(ids)] = nll.cpu()
    return out


def harmonic_mean(*xs: float) -> float:
    """The harmonic mean (0 when any value is 0): CounterFact's score S of ES, PS and NS."""
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def _record_rows(r: Record, pre: str) -> list[tuple[str, str, str]]:
    """(kind, prompt, target) rows of one record: every prompt scored for both targets."""
    kinds = [("es", r.query)] + [("ps", p) for p in r.paraphrase_prompts] + [("ns", p) for p in r.neighborhood_prompts]
    return [(k, pre + p, t) for k, p in kinds for t in (r.target_new, r.target_true)]


def record_metrics(rows: list[tuple[str, str, str]], nll: torch.Tensor, top1: torch.Tensor) -> dict:
    """One record's ES, PS, NS (probability comparison) and their top-1 versions from its scored rows (pairs of
    new, true as _record_rows lists them). NaN where a record has no paraphrase or no neighbour."""
    out = {}
    for kind in ("es", "ps", "ns"):
        idx = [i for i in range(0, len(rows), 2) if rows[i][0] == kind]
        if not idx:
            out[kind] = out[f"{kind}_top1"] = math.nan
            continue
        new, true = nll[idx], nll[[i + 1 for i in idx]]
        wins = (new < true) if kind != "ns" else (true < new)
        hits = top1[idx] if kind != "ns" else top1[[i + 1 for i in idx]]
        out[kind], out[f"{kind}_top1"] = wins.float().mean().item(), hits.float().mean().item()
    return out


def evaluate_records(model, tokenizer, records: list[Record], prefix: str | Callable[[Record], str] = "",
                     batch_size: int = 32, per_record: bool = False) -> dict:
    """Means over records of ES (the rewrite's prompt prefers target_new to target_true), PS (the share of
    paraphrases that do), NS (the share of neighbourhood prompts that keep preferring target_true), each also as
    top-1 accuracy (ES/PS: target_new is the greedy continuation; NS: target_true is), and S / S_top1, the
    harmonic means. `prefix` is prepended to every prompt: a string, or a function of the record (`in_context`:
    IKE-style, the rewrite stated first). per_record: also the list of each record's values."""
    rows = [(j, row) for j, r in enumerate(records)
            for row in _record_rows(r, prefix(r) if callable(prefix) else prefix)]
    nll, top1 = target_scores(model, tokenizer, [p for _, (_, p, _) in rows], [t for _, (_, _, t) in rows],
                              batch_size)
    each = []
    for j in range(len(records)):
        idx = [i for i, (rj, _) in enumerate(rows) if rj == j]
        each.append(record_metrics([rows[i][1] for i in idx], nll[idx], top1[idx]))
    out = mean_metrics(each)
    if per_record:
        out["per_record"] = each
    return out


def naming(subjects) -> re.Pattern | None:
    """One pattern that finds any of `subjects` as a whole word (not inside a longer one: Java is not in Javanese);
    None for no subjects."""
    subjects = sorted(subjects)
    return re.compile(rf"(?<!\w)(?:{'|'.join(map(re.escape, subjects))})(?!\w)") if subjects else None


def unedited_neighbours(records: list[Record], edited: list[Record]) -> list[Record]:
    """Each record with only those neighbourhood prompts that name none of the `edited` records' subjects (its own
    aside): after sequential edits, a neighbourhood prompt about a subject that was itself rewritten is expected to
    change, so NS on the rest measures what NS is for, that the edits leave other subjects alone."""
    subjects, out = {r.subject for r in edited}, []
    for r in records:
        named = naming(subjects - {r.subject})
        out.append(dataclasses.replace(r, neighborhood_prompts=[
            p for p in r.neighborhood_prompts if named is None or named.search(p) is None]))
    return out


def unedited_ns(model, tokenizer, records: list[Record], edited: list[Record]) -> dict:
    """NS and its top-1 on only the neighbourhood prompts of `records` that name none of the `edited` subjects
    (`unedited_neighbours`; NaN where there is none), and how many prompts that is of how many."""
    kept = [dataclasses.replace(r, paraphrase_prompts=[]) for r in unedited_neighbours(records, edited)]
    m = evaluate_records(model, tokenizer, kept)
    return {"ns_unedited": m["ns"], "ns_unedited_top1": m["ns_top1"],
            "neighbours_unedited": sum(len(r.neighborhood_prompts) for r in kept),
            "neighbours": sum(len(r.neighborhood_prompts) for r in records)}


METRICS = ("es", "ps", "ns", "es_top1", "ps_top1", "ns_top1")


def mean_metrics(each: list[dict]) -> dict:
    """Means over records of their ES, PS, NS and top-1 versions (a record without paraphrases or neighbours
    counts only where it has a value), S and S_top1 the harmonic means of the means, and the record count."""
    out = {"records": len(each)}
    for key in METRICS:
        vals = [e[key] for e in each if not math.isnan(e[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    out["s"] = harmonic_mean(out["es"], out["ps"], out["ns"])
    out["s_top1"] = harmonic_mean(out["es_top1"], out["ps_top1"], out["ns_top1"])
    return out


# ----------------------------------------------------------------------------- held-out drift
class HeldOutDrift:
    """The unedited model's next-token logits on held-out builtin text, computed once; `measure(model)` then
    gives an edited model's next-token KL(unedited || edited) and perplexity ratio (edited / unedited) there."""

    def __init__(self, model, tokenizer, windows: int = 8, length: int = 128, batch_size: int = 4):
        ids = builtin_held_out_windows(tokenizer, length, windows)
        self.batches = [collate(ids[b:b + batch_size], _pad_id(tokenizer)) for b in range(0, len(ids), batch_size)]
        self.teacher = [self._logits(model, b) for b in self.batches]
        self.teacher_nll = self._nll(self.teacher)

    @staticmethod
    @torch.no_grad()
    def _logits(model, batch) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits[:, :-1].float().cpu()

    def _nll(self, logits: list[torch.Tensor]) -> float:
        """Mean next-token negative log-likelihood over the real next tokens of every window."""
        total, count = 0.0, 0
        for b, lg in zip(self.batches, logits):
            pm = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()  # positions whose next token is real
            total += F.cross_entropy(lg[pm], b["input_ids"][:, 1:][pm], reduction="sum").item()
            count += int(pm.sum())
        return total / count

    def measure(self, model) -> dict:
        """{"kl": mean next-token KL(unedited || model) per real token, "ppl_ratio": perplexity model / unedited}."""
        student = [self._logits(model, b) for b in self.batches]
        kl, count = 0.0, 0
        for b, s, t in zip(self.batches, student, self.teacher):
            pm = b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]
            n = int(pm.sum())
            kl += n * next_token_kl(s, t, pm).item()
            count += n
        return {"kl": kl / count, "ppl_ratio": math.exp(self._nll(student) - self.teacher_nll)}
