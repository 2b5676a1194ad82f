"""Consolidation that works: a context such as "The capital of France is Rome." written into the MLP weights so that
the model without the context answers as with it, on paraphrases too, and every other input keeps its answer.

The default method, `kv` (forward passes only, no backward pass and no gradient step):
  1. what to write: the prompt, its subject and the new object (from a CounterFact record, or from the context's text
     by the rule in `parse_context`); the value is a change of the residual stream at the subject's last token at the
     top layer of a band, built in a few steps along the attention's first-order pull-back of the new object's
     unembedding (recomputed at each step from one forward; the first step also tries the direction toward the
     residual of the subject's neighbours whose own prompt already leads to the new object, the donors), each
     step's size found by a forward-only line search until the prompt, alone and behind several prefixes, has the
     new object lead every other next token (`direction="gradient"`, not forward-only: each step along the exact
     gradient of the new object's log-probability with respect to the change instead, one backward pass of the
     layers above the band, no weight trained: the higher efficacy, benchmarks/RESULTS.md);
  2. how to write it: a key-value edit of mlp.down_proj in each layer of the band, bottom-up (MEMIT, arXiv
     2210.07229): keys k = silu(gate) * up at the subject's last token behind each prefix, whitened by the covariance C
     of the keys on builtin text, dW = R K^T (lambda C + K_prev K_prev^T + mu P P^T + K K^T)^-1, the residual R split
     over the layers left; earlier edits' keys K_prev stay in the statistic, so later edits keep them (sequential
     edits), and P, the keys of the subject's neighbours (the words of the tokenizer's entity pool whose keys are
     nearest the subject's, put in the subject's place in its prompt), are kept for this edit: the edit is specific
     to the subject, not to its kind (AlphaEdit's preserved keys, arXiv 2410.02355, chosen per edit); along the
     gradient they then stay in the statistic at a low weight (`neighbour_memory`), so later edits spare them too;
  3. how much: a trust region: an edit whose expected squared change of a band layer's MLP output on builtin text,
     tr(dW C dW^T), exceeds `max_change` times that of the output itself is scaled down to it (a norm bound on each
     edit, as the sequential editors found they need), so that a fact the model resists costs that fact's efficacy,
     not the model.
compute_edit returns each parameter's total change, keyed by its name in the plain Hugging Face model, and leaves the
model's weights as it found them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import os
import re
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

import npt

METHODS = {"kv": "MEMIT-style key-value edit of mlp.down_proj in a band of layers, keys whitened by the covariance "
                 "of the MLP activations, the subject's nearest entities' keys preserved, value from forward-only "
                 "line searches along the attention's pull-back of the new object's unembedding (direction="
                 "gradient: along the exact gradient, a backward pass a step)"}
DEFAULT_METHOD = "kv"
DIRECTIONS = ("pullback", "gradient")
DIRECTION_DEFAULTS = {"pullback": dict(rounds=2, donors=4, neighbour_memory=0.0),
                      "gradient": dict(rounds=4, donors=0, neighbour_memory=0.3)}  # (measured on the dev records:
# along the gradient the donors no longer help, and the steps are better spent; the neighbours kept for later edits
# lift the gradient's sequential NS and cost the pull-back's efficacy more than they give it)


@dataclasses.dataclass
class EditOptions:
    """The method's knobs (compute_edit's **options)."""
    method: str = DEFAULT_METHOD
    layers: tuple[int, ...] | None = None  # the band; None: default_layers(num_layers)
    covariance_weight: float = 1e4  # lambda: how strongly other inputs' keys are preserved
    prefixes: int = 4  # random text prefixes behind which the prompt is also written (besides none)
    prefix_tokens: int = 10
    margin: float = 0.0  # nats by which the edited prompt must prefer the new object to the old one
    top_margin: float = 1.0  # nats by which the new object must lead every other next token
    max_scale: float = 4.0  # bound: each step's residual change at most this times the residual's norm
    neighbours: int = 128  # entity-pool words nearest the subject whose keys in the prompt the edit preserves
    neighbour_weight: float = 100.0  # mu: their weight in the statistic against lambda C's
    donors: int | None = None  # the neighbours whose prompt leads most to the new object: the value's first step
    # may go toward their mean residual (0: none; None: the direction's default, DIRECTION_DEFAULTS)
    memory_weight: float = 1.0  # how strongly later edits keep a written key's value (its weight in A)
    neighbour_memory: float | None = None  # how strongly later edits keep an edit's neighbours' outputs (their
    # keys' weight in A once the edit is written, against a written key's 1; 0: only the edit itself preserves
    # them; None: the direction's default)
    prompt_weight: float = 1.0  # the bare prompt's key's weight against each prefixed one's
    max_change: float = 5e-4  # trust region (0: none): each edit's tr(dW C dW^T) / tr(W C W^T) at most this
    # (Editor.bound); without it sequential edits collapse (a resisted fact buys its answer with everything else)
    rounds: int | None = None  # steps of the value search, each from where the last one ended (None: the
    # direction's default)
    direction: str = "pullback"  # each value step's direction: pullback (the attention's first-order pull-back of
    # the new object's unembedding: forward passes only) or gradient (the exact gradient of the queries'
    # log-probability of the new object with respect to the change: one backward pass of the layers above the band
    # per step; no weight is trained)
    passes: int = 2  # writes of the value: each further one writes what the last left missing
    search_dtype: str = "auto"  # the search's forwards (the value's line searches, the neighbours') on a copy of the
    # model in bfloat16 or float32; auto: bfloat16 where the device multiplies it natively (a CUDA GPU that supports
    # it, a CPU with AMX or AVX512-BF16), else float32, and a model not in float32 searches in its own dtype; the keys
    # written and the solve stay in the model's dtype and float64 (Editor.searcher)
    covariance_tokens: int = 32768
    seed: int = 0


def parse_options(items) -> dict:
    """{name: value} from "name=value" strings (a CLI's repeatable option), each value read as its EditOptions
    field's type: `layers` as comma-separated layer indices, `search_dtype` and `direction` as names, the other knobs
    as non-negative numbers."""
    fields = {f.name: DIRECTION_DEFAULTS[DIRECTIONS[0]].get(f.name, f.default) for f in dataclasses.fields(EditOptions)
              if f.name != "method"}  # (the defaults None of rounds, donors, neighbour_memory: typed when given)
    out = {}
    for item in items:
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in fields:
            raise ValueError(f"{item!r}: give NAME=VALUE, NAME one of {', '.join(fields)}")
        kind = "comma-separated layer indices" if name == "layers" else type(fields[name]).__name__
        try:
            value = (tuple(int(x) for x in text.split(",")) if name == "layers" else type(fields[name])(text))
        except ValueError:
            raise ValueError(f"{item!r}: {name} takes {kind}") from None
        if name == "search_dtype":
            search_dtype(value, torch.zeros(()))  # a name it does not know: its ValueError
        elif name == "direction":
            if value not in DIRECTIONS:
                raise ValueError(f"{item!r}: direction is one of {', '.join(DIRECTIONS)}")
        elif not all(v >= 0 for v in (value if name == "layers" else (value,))):
            raise ValueError(f"{item!r}: {name} must not be negative")
        out[name] = value
    return out


def search_dtype(name: str, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the search's forwards (EditOptions.search_dtype) for a model whose weights are like `weight`."""
    if name not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"search_dtype {name!r}: choose auto, bfloat16 or float32")
    if name == "auto":
        if weight.dtype != torch.float32:
            return weight.dtype
        if weight.device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = weight.device.type == "cpu" and any(
                getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        name = "bfloat16" if native else "float32"
    return getattr(torch, name)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """An early-middle band (where the subject's attributes are recalled): layers num_layers/6 .. num_layers/3."""
    lo, hi = max(1, num_layers // 6), max(2, num_layers // 3)
    return tuple(range(lo, hi + 1))


# ----------------------------------------------------------------------------- names and modules
def decoder_mlp(model, layer_idx: int):
    layer = npt.decoder_layers(model)[layer_idx]
    return (layer.layer if isinstance(layer, npt.NPTLayer) else layer).mlp


def plain_name(name: str) -> str:
    """A parameter's name in the plain Hugging Face model: an NPT layer's `.layer` segment dropped."""
    return re.sub(r"(layers\.\d+)\.layer\.", r"\1.", name)


def down_proj_name(model, layer_idx: int) -> str:
    weight = decoder_mlp(model, layer_idx).down_proj.weight
    return plain_name(next(n for n, p in model.named_parameters() if p is weight))


# ----------------------------------------------------------------------------- what to write
@dataclasses.dataclass
class Fact:
    """One rewrite: `prompt` (the subject filled in, without the object) should now continue with `target_new`."""
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None  # None: the model's own first next token at the prompt


def parse_context(context: str) -> Fact:
    """The rule for a bare context: its last word (a trailing period dropped) is the new object, the text before it
    the prompt; the subject is the prompt's last run of capitalised words (a sentence-initial The/A/An left out, a
    possessive 's dropped), or, without one, the prompt's last word before the final one."""
    text = context.strip().rstrip(".!").rstrip()
    if " " not in text:
        raise ValueError(f"context {context!r} needs at least two words: the prompt and the object it states")
    prompt, target = text.rsplit(" ", 1)
    words = prompt.split(" ")
    runs, cur = [], []
    for i, w in enumerate(words):
        capital = w[:1].isupper() and not (i == 0 and w in ("The", "A", "An"))
        if capital:
            cur.append(w)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    subject = " ".join(runs[-1]) if runs else (words[-2] if len(words) > 1 else words[-1])
    return Fact(prompt, re.sub(r"('s|’s)?[,:;]?$", "", subject), target)


def fact_from_record(record) -> Fact:
    """A counterfact Record (prompt with `{}`, subject, target_new, target_true) as a Fact."""
    return Fact(record.prompt.format(record.subject), record.subject, record.target_new, record.target_true)


# ----------------------------------------------------------------------------- token positions
@dataclasses.dataclass
class Queries:
    """Texts as one right-padded batch; for each: its subject's last token and its last token."""
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    subject_pos: torch.Tensor  # (B,)
    last_pos: torch.Tensor  # (B,)


def encode(tokenizer, texts: list[str], subject_ends: list[int], align: bool = False) -> Queries:
    """`subject_ends[i]`: the character just after the subject in texts[i]. Right-padded; align: also left-padded
    so that every row's subject token is in one column (the tokens before it then form one block, `Prefix`)."""
    rows, subj = [], []
    for text, end in zip(texts, subject_ends):
        enc = tokenizer(text, return_offsets_mapping=True)
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > a]
        if not inside:
            raise ValueError(f"the subject ends at character {end} of {text!r}: no token there")
        rows.append(enc["input_ids"])
        subj.append(inside[-1])
    shift = [max(subj) - s if align else 0 for s in subj]
    length = max(k + len(r) for k, r in zip(shift, rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (k, r) in enumerate(zip(shift, rows)):
        ids[i, k:k + len(r)], mask[i, k:k + len(r)] = torch.tensor(r), 1
    return Queries(ids, mask, torch.tensor(subj) + torch.tensor(shift),
                   torch.tensor([k + len(r) - 1 for k, r in zip(shift, rows)]))


def positions(q: Queries) -> torch.Tensor:
    """(B, T) each token's position in its own text (left padding skipped)."""
    return (q.attention_mask.cumsum(1) - 1).clamp_min(0)


def fact_queries(tokenizer, fact: Fact, prefixes: list[str], align: bool = False) -> Queries:
    """The fact's prompt alone and behind each prefix (align: see `encode`)."""
    start = fact.prompt.rfind(fact.subject)
    if start < 0:
        raise ValueError(f"subject {fact.subject!r} is not in the prompt {fact.prompt!r}")
    end = start + len(fact.subject)
    texts = [fact.prompt] + [f"{p} {fact.prompt}" for p in prefixes]
    ends = [end] + [len(p) + 1 + end for p in prefixes]
    return encode(tokenizer, texts, ends, align)


def best_other(logits: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, tokens), each (B,): each row's largest logit other than `token`'s, and whose it is."""
    top = logits.topk(2, dim=1)
    pick = (top.indices[:, :1] == token).long()  # the second where the first is `token`
    return top.values.gather(1, pick)[:, 0], top.indices.gather(1, pick)[:, 0]


def first_token(tokenizer, word: str) -> int:
    return tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"][0]


# ----------------------------------------------------------------------------- forwards
@torch.no_grad()
def run(model, q: Queries, key_layers=(), residual_layer: int | None = None, logits: bool = True,
        prefix: "Prefix | None" = None, whole: bool = False):
    """One forward of q: (keys {layer: (B, F) at the subject token}, residual (B, D) at the subject token after
    `residual_layer` (whole: (B, T, D) at every position, in the model's dtype), next-token logits (B, V) at the last
    token, or None when not `logits`: the forward then stops after the last layer it reads). prefix: as
    last_logits'."""
    layers, keys, out = npt.decoder_layers(model), {}, {}
    rows, at = torch.arange(q.input_ids.shape[0]), q.subject_pos - (prefix.start if prefix is not None else 0)

    def at_residual(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        out["h"] = h if whole else h[rows, at].float()

    handles = _key_hooks(model, key_layers, at, keys)
    try:
        if residual_layer is not None:
            handles.append(layers[residual_layer].register_forward_hook(at_residual))
        if not logits:
            handles.append(layers[max([*key_layers, residual_layer or 0])].register_forward_hook(_stop))
        try:
            out["logits"] = last_logits(model, q, prefix)
        except _Stop:
            return keys, out.get("h"), None
    finally:
        for h in handles:
            h.remove()
    return keys, out.get("h"), out["logits"]


def _key_hooks(model, layers, at: torch.Tensor, store: dict) -> list:
    """Hooks that put each layer's MLP key k = silu(gate) * up (the down_proj's input) at each row's column `at` (B,)
    (its subject token) into store[layer] (B, F) fp32 during a forward; the caller removes them."""
    rows = torch.arange(len(at))
    return [decoder_mlp(model, i).down_proj.register_forward_pre_hook(
        lambda m, a, i=i: store.__setitem__(i, a[0][rows, at].float())) for i in layers]


def last_logits(model, q: Queries, prefix: "Prefix | None" = None, keep: list | None = None) -> torch.Tensor:
    """(B, V) fp32 next-token logits at each query's last token (the unembedding applied there only). prefix: the
    tokens before column prefix.start are not run again, their keys and values taken from it (`Prefix`; q's rows
    may be its rows repeated). keep: a list to which the forward's KV cache is appended."""
    start, extra = (0, {}) if prefix is None else (prefix.start, {_cache_kwarg(model): prefix.cache(
        len(q.last_pos), next(model.parameters()).dtype)})
    out = model.base_model(input_ids=q.input_ids[:, start:], attention_mask=q.attention_mask,
                           position_ids=positions(q)[:, start:], use_cache=prefix is not None or keep is not None,
                           **extra)
    if keep is not None:
        keep.append(out[1])
    return model.get_output_embeddings()(out[0][torch.arange(len(q.last_pos)), q.last_pos - start]).float()


def _cache_kwarg(model) -> str:
    """The name under which the model's forward takes a KV cache (renamed within transformers 5)."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


@dataclasses.dataclass
class Prefix:
    """The keys and values of every layer at the tokens before column `start`, for each row of a batch (or for one
    row, when all rows have those tokens in common): a forward of the batch need then run only the tokens from
    `start` on. `of`: where the rows' subject tokens are all in column `start` (`encode`'s align), a change at the
    subject token or after it (a line search's) leaves the tokens before it as they are."""
    start: int
    kv: list  # [(keys, values) (B, heads, start, head_dim) per layer]

    @classmethod
    @torch.no_grad()
    def shared(cls, model, q: Queries) -> "Prefix | None":
        """The leading tokens that every row of q has in common (a prompt's text before its subject), run once for
        all rows: their keys and values for one row (the cache repeats them); None where there are none."""
        same = ((q.input_ids == q.input_ids[:1]) & (q.attention_mask == 1)).all(0).long().cumprod(0)
        start = min(int(same.sum()), int(q.subject_pos.min()))
        if start == 0:
            return None
        out = model.base_model(input_ids=q.input_ids[:1, :start], attention_mask=q.attention_mask[:1, :start],
                               position_ids=positions(q)[:1, :start], use_cache=True)
        return cls(start, [(layer.keys, layer.values) for layer in out[1].layers])

    @classmethod
    def of(cls, q: Queries, cache) -> "Prefix | None":
        """The block before the subject column from the KV cache of a forward of q; None where there is none."""
        start = int(q.subject_pos[0])
        if start == 0 or not bool((q.subject_pos == start).all()):
            return None
        return cls(start, [(layer.keys[:, :, :start], layer.values[:, :, :start]) for layer in cache.layers])

    def cache(self, rows: int, dtype: torch.dtype):
        """A fresh cache of them for a batch of `rows` (the B rows repeated), in `dtype`."""
        n = rows // self.kv[0][0].shape[0]
        return DynamicCache(ddp_cache_data=[(k.to(dtype).repeat(n, 1, 1, 1), v.to(dtype).repeat(n, 1, 1, 1))
                                            for k, v in self.kv])


class _Stop(Exception):
    pass


def _stop(module, args, output):
    raise _Stop


def repeat(q: Queries, n: int) -> Queries:
    return Queries(*(t.repeat(n, *([1] * (t.dim() - 1))) for t in dataclasses.astuple(q)))


# ----------------------------------------------------------------------------- covariance of the keys
def _fingerprint(model, upto: int) -> str:
    """Cheap identity of the weights the keys of layer `upto` depend on (embedding and layers 0..upto)."""
    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.", name)
        if "adapter" in name or (m and int(m.group(1)) > upto) or (not m and "embed" not in name):
            continue
        x = p.detach().double()
        digest.update(f"{plain_name(name)}{tuple(p.shape)}{x.sum().item():.12e}{x.abs().sum().item():.12e}".encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("NPT_CACHE", Path.home() / ".cache" / "npt")) / "plasticity"


@torch.no_grad()
def key_covariance(model, tokenizer, layers, tokens: int = 32768, window: int = 256) -> dict[int, torch.Tensor]:
    """C_l = E[k k^T] (F, F) fp32 of the keys k = silu(gate) * up of each layer on builtin text, computed once per
    model and layer and cached on disk under the npt cache (keyed by the weights it depends on)."""
    from safetensors.torch import load_file

    from npt_tools.data import builtin_texts

    paths = {i: cache_dir() / f"cov-{_fingerprint(model, i)}-L{i}-{tokens}.safetensors" for i in layers}
    todo = [i for i in layers if not paths[i].is_file()]
    if todo:
        ids = tokenizer("\n\n".join(builtin_texts()), add_special_tokens=False)["input_ids"][:tokens]
        sums = _key_moments(model, torch.tensor(ids).view(-1, window)[:max(1, len(ids) // window)], todo)
        for i in todo:
            _save_atomically(paths[i], {"covariance": sums[i].contiguous()})
    return {i: load_file(paths[i])["covariance"] for i in layers}


def _save_atomically(path: Path, tensors: dict) -> None:
    """A cache file written whole or not at all (a temporary file renamed), its folder made."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _key_moments(model, windows: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    sums, count = {}, 0

    def grab(i, module, args):
        k = args[0].reshape(-1, args[0].shape[-1]).double()  # (N, F)
        sums[i] = sums.get(i, 0) + k.t() @ k

    handles = [decoder_mlp(model, i).down_proj.register_forward_pre_hook(lambda m, a, i=i: grab(i, m, a))
               for i in layers]
    handles.append(npt.decoder_layers(model)[max(layers)].register_forward_hook(_stop))
    try:
        for batch in windows.split(8):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {i: (s / count).float() for i, s in sums.items()}


# ----------------------------------------------------------------------------- the entity pool
@dataclasses.dataclass
class EntityPool:
    """The tokenizer's capitalised whole words (a space, a capital, 3+ lower-case letters) and each one's key at
    one layer after the carrier text POOL_CARRIER: where an edit looks for the subject's neighbours."""
    words: list[str]
    keys: torch.Tensor  # (N, F)
    whitened: torch.Tensor | None = None  # (N, F) the keys times C^-1/2, each of norm 1 (Editor.pool)
    whitener: torch.Tensor | None = None  # (F, F) C^-1/2 (Editor.pool)


POOL_CARRIER = "This is about"


def same_stem(word: str, subject: str) -> bool:
    """Whether `word` is one of the subject's words or shares one's stem (one of the two, its last letter dropped,
    starts the other: Japan / Japanese, Korea / Korean): such words name the subject, not a neighbour of it."""
    w = word.lower()
    return any(w.startswith(s[:-1]) or s.startswith(w[:-1]) for s in subject.lower().split() if len(s) >= 4)


def pool_words(tokenizer) -> list[str]:
    words = (tokenizer.decode([i]) for i in range(len(tokenizer)))
    return sorted({w.strip() for w in words if re.fullmatch(r" ?[A-Z][a-z]{3,}", w)})


@torch.no_grad()
def entity_pool(model, tokenizer, layer: int, batch: int = 512) -> EntityPool:
    """The pool's keys at `layer`, computed once per model and cached on disk (fp16) beside the covariance."""
    from safetensors.torch import load_file

    words = pool_words(tokenizer)
    digest = hashlib.sha1("\n".join(words).encode()).hexdigest()[:8]
    path = cache_dir() / f"pool-{_fingerprint(model, layer)}-{digest}-L{layer}.safetensors"
    if not path.is_file():
        texts = [f"{POOL_CARRIER} {w}" for w in words]
        keys = [run(model, encode(tokenizer, t, [len(x) for x in t]), key_layers=[layer], logits=False)[0][layer]
                for t in (texts[k:k + batch] for k in range(0, len(texts), batch))]
        _save_atomically(path, {"keys": torch.cat(keys).half().contiguous()})
    return EntityPool(words, load_file(path)["keys"])


# ----------------------------------------------------------------------------- insertion
def woodbury(a_inv: torch.Tensor, keys: torch.Tensor, ak: torch.Tensor | None = None) -> torch.Tensor:
    """(A + K K^T)^-1 from A^-1 (F, F) and K (F, n), float64, written over a_inv and returned; ak: A^-1 K where it is
    known already."""
    ak = a_inv @ keys if ak is None else ak
    return a_inv.addmm_(ak, torch.linalg.solve(torch.eye(keys.shape[1], dtype=ak.dtype) + keys.t() @ ak, ak.t()),
                        alpha=-1)


def rank_one_update(c_inv: torch.Tensor, key: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(D, F) ROME's exact insertion: dW = r (C^-1 k)^T / (k^T C^-1 k), so (W + dW) k = W k + r while a key
    orthogonal to k in the C^-1 metric (k'^T C^-1 k = 0) is left as it was; c_inv (F, F), key (F,), residual (D,)."""
    ck = c_inv @ key
    return torch.outer(residual, ck) / (key @ ck)


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor) -> None:
    with torch.no_grad():
        weight.copy_((weight.float() + delta.float()).to(weight.dtype))


# ----------------------------------------------------------------------------- the editor
def builtin_prefixes(tokenizer, count: int, tokens: int, seed: int) -> list[str]:
    """`count` snippets of `tokens` tokens of builtin text, each ending with a period (MEMIT's context templates)."""
    import random

    from npt_tools.data import builtin_texts

    docs, rng, out = builtin_texts(), random.Random(seed), []
    while len(out) < count:
        words = rng.choice(docs).split()
        if len(words) < 4 * tokens:
            continue
        start = rng.randrange(len(words) - 2 * tokens)
        ids = tokenizer(" ".join(words[start:start + 2 * tokens]), add_special_tokens=False)["input_ids"][:tokens]
        out.append(tokenizer.decode(ids).strip().rstrip(".") + ".")
    return out


class Editor:
    """Writes facts one after the other into the model's down_proj weights (in place); keeps the statistic of the
    keys already written so that later edits preserve them."""

    def __init__(self, model, tokenizer, **options):
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(EditOptions)})
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}: choose from "
                             f"{', '.join(f.name for f in dataclasses.fields(EditOptions))}")
        self.opts = EditOptions(**options)
        if self.opts.method not in METHODS:
            raise ValueError(f"unknown method {self.opts.method!r}: choose from {', '.join(METHODS)}")
        if self.opts.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.opts.direction!r}: choose from {', '.join(DIRECTIONS)}")
        self.opts = dataclasses.replace(self.opts, **{name: value for name, value in DIRECTION_DEFAULTS[
            self.opts.direction].items() if getattr(self.opts, name) is None})
        if self.opts.rounds < 1 or self.opts.passes < 1:
            raise ValueError(f"rounds and passes must be at least 1, got {self.opts.rounds} and {self.opts.passes}")
        self.model, self.tokenizer = model, tokenizer
        num_layers = len(npt.decoder_layers(model))
        self.layers = tuple(self.opts.layers or default_layers(num_layers))
        if not all(0 <= i < num_layers for i in self.layers):
            raise ValueError(f"layers {self.layers} outside the model's 0..{num_layers - 1}")
        self.covariance = key_covariance(model, tokenizer, self.layers, self.opts.covariance_tokens)
        self.inverses = {}  # {layer: (lambda C + the written keys' K K^T)^-1} in float64
        self.output_energy = {i: float(((w @ self.covariance[i]) * w).sum()) for i, w in (
            (i, decoder_mlp(model, i).down_proj.weight.detach().float()) for i in self.layers)}  # tr(W C W^T)
        self.prefixes = builtin_prefixes(tokenizer, self.opts.prefixes, self.opts.prefix_tokens, self.opts.seed)
        self._pool = None
        self.search_dtype, self._searcher = search_dtype(self.opts.search_dtype, next(model.parameters())), None

    def write(self, fact: Fact, remember: bool = True, found: tuple | None = None) -> dict[int, torch.Tensor]:
        """Edits the model in place; returns {layer: dW of down_proj} of this fact. One forward reads every band
        layer's keys; the residual still to write is split over the layers left, bottom-up, each layer's own
        change dW k taken off it as it passes up the residual stream unchanged (to first order). Each further
        pass (`passes`) measures what is still missing at the top layer and writes that the same way. remember:
        later writes keep this one's keys (False: an edit that will be undone before the next). found: what
        `value(fact)` returned on the model as it is now (else it is computed here)."""
        q, paths, others, todo = found if found is not None else self.value(fact)
        top = self.layers[-1]
        target, keys = paths.inputs[top + 1] + todo, paths.keys
        weight = torch.ones(todo.shape[0], 1)
        weight[0] = self.opts.prompt_weight
        factors = {i: ([], []) for i in self.layers}  # this fact's dW = U V^T per layer, its (D, n) and (F, n) parts
        solvers = {i: self.solver(i, others.get(i)) for i in self.layers}  # A changes after the last pass only
        # ({layer: (x -> B^-1 x, A^-1 P)})
        for p in range(self.opts.passes):
            if p:
                keys, h, _ = run(self.model, q, key_layers=self.layers, residual_layer=top, logits=False)
                todo = target - h
            for j, i in enumerate(self.layers):
                u, v = self.insertion((keys[i] * weight.sqrt()).t(), (todo * weight.sqrt()).t() / (len(self.layers) - j),
                                      solvers[i][0])
                add_to_weight(decoder_mlp(self.model, i).down_proj.weight, (u @ v.t()).float())
                todo = todo - (keys[i].double() @ v) @ u.t()
                factors[i][0].append(u), factors[i][1].append(v)
        for i in self.layers if remember else ():
            if self.opts.neighbour_memory and i in others:  # (A^-1 P from the solver: A has not changed since)
                root = self.opts.neighbour_memory ** 0.5
                self.inverses[i] = woodbury(self.inverse(i), others[i].double() * root, solvers[i][1] * root)
            self.remember(i, (keys[i] * weight.sqrt()).t())
        factors = {i: (torch.cat(u, 1), torch.cat(v, 1)) for i, (u, v) in factors.items()}
        scale = self.bound(factors)
        deltas = {i: (u @ v.t()).float() for i, (u, v) in factors.items()}
        if scale < 1:
            for i, d in deltas.items():
                add_to_weight(decoder_mlp(self.model, i).down_proj.weight, -(1 - scale) * d)
                deltas[i] = scale * d
        return deltas

    def value(self, fact: Fact) -> tuple[Queries, "Paths", dict[int, torch.Tensor], torch.Tensor]:
        """What `write` writes: the fact's queries, their first forward's paths (the keys to write, the residual
        after the band's top layer), the keys of the subject's neighbours to preserve ({layer: (F, m)}), and the
        residual change to reach (n, D), `residual_change`'s."""
        q = fact_queries(self.tokenizer, fact, self.prefixes, align=True)
        top, search = self.layers[-1], self.searcher(sync=True)
        if search is self.model:
            paths = attention_paths(self.model, q, top, key_layers=self.layers)
        else:  # the keys to write and the residual to add to in the model's own dtype, the pull-back in the search's
            paths = attention_paths(search, q, top)
            paths.keys, paths.hidden, _ = run(self.model, q, self.layers, top, logits=False, whole=True)
            paths.inputs[top + 1] = paths.hidden[torch.arange(len(q.last_pos)), q.subject_pos].float()
        others, donor = self.neighbourhood(fact, self.neighbour_words(fact, paths.keys[self.layers[0]][0]),
                                           paths.hidden[0, q.subject_pos[0]].float())
        return q, paths, others, self.residual_change(fact, q, paths, donor)

    def searcher(self, sync: bool = False):
        """The model the search's forwards run on: the model itself, or where `search_dtype` is not its own a copy
        in that dtype (made once; its band weights brought up to date with the model's when made and with `sync`:
        the band's are the only weights an edit changes)."""
        dtype = self.search_dtype
        if all(p.dtype == dtype or not p.is_floating_point() for p in self.model.parameters()):
            return self.model
        if self._searcher is not None and not sync:
            return self._searcher
        if self._searcher is None:
            self._searcher = copy.deepcopy(self.model).to(dtype)
            for module in self._searcher.modules():
                if isinstance(module, npt.NPTAdapter):
                    module.float()  # as npt keeps its adapters on a model of any dtype
        with torch.no_grad():
            for i in self.layers:
                decoder_mlp(self._searcher, i).down_proj.weight.copy_(decoder_mlp(self.model, i).down_proj.weight)
        return self._searcher

    def bound(self, factors: dict) -> float:
        """The factor (<= 1) by which this fact's edit is scaled down so that on no band layer the expected squared
        change of the MLP's output on builtin text, tr(dW C dW^T), exceeds `max_change` times that of the output
        itself, tr(W C W^T) (W the weight when the editor was made): a trust region, so that a fact the model
        resists does not buy its answer with the model's other outputs."""
        if not self.opts.max_change:
            return 1.0
        worst = 0.0
        for i, (u, v) in factors.items():
            c = self.covariance[i].double()
            worst = max(worst, float(torch.trace((v.t() @ c @ v) @ (u.t() @ u))) / self.output_energy[i])
        self.last_change = worst
        return min(1.0, (self.opts.max_change / worst) ** 0.5) if worst > 0 else 1.0

    def insertion(self, keys: torch.Tensor, residuals: torch.Tensor, solve) -> tuple[torch.Tensor, torch.Tensor]:
        """dW = R K^T (B + K K^T)^-1 = R (I + K^T B^-1 K)^-1 (B^-1 K)^T as U V^T, float64: U = R (I + K^T B^-1
        K)^-1 (D, n), V = B^-1 K (F, n); keys (F, n), residuals (D, n), solve: x -> B^-1 x (`solver`)."""
        k = keys.double()
        bk = solve(k)  # (F, n)
        inner = torch.eye(k.shape[1], dtype=torch.float64) + k.t() @ bk
        return torch.linalg.solve(inner, residuals.double().t()).t(), bk

    def insert(self, layer_idx: int, keys: torch.Tensor, residuals: torch.Tensor, preserve=None,
               remember: bool = True) -> torch.Tensor:
        """Adds `insertion`'s dW to down_proj and returns it: B = A + mu P P^T, A = lambda C + K_prev K_prev^T (the
        keys written before), P (F, m) the keys preserved for this edit only (its subject's neighbours); keys (F, n),
        residuals (D, n). A^-1 is kept and, when `remember`, updated with K."""
        u, v = self.insertion(keys, residuals, self.solver(layer_idx, preserve)[0])
        delta = (u @ v.t()).float()  # (D, F)
        add_to_weight(decoder_mlp(self.model, layer_idx).down_proj.weight, delta)
        if remember:
            self.remember(layer_idx, keys)
        return delta

    def remember(self, layer_idx: int, keys: torch.Tensor) -> None:
        """A^-1 updated with the keys (F, n) just written: later edits keep their values."""
        self.inverses[layer_idx] = woodbury(self.inverse(layer_idx), keys.double() * self.opts.memory_weight ** 0.5)

    def solver(self, layer_idx: int, preserve: torch.Tensor | None = None):
        """(x -> B^-1 x, A^-1 P or None) for B = A + mu P P^T (A^-1 as it is now, P (F, m) or None), by Woodbury:
        B^-1 x = A^-1 x - A^-1 P (I/mu + P^T A^-1 P)^-1 P^T A^-1 x; the F x m products made once."""
        a_inv = self.inverse(layer_idx)
        if preserve is None:
            return (lambda x: a_inv @ x), None
        p = preserve.double()
        ap = a_inv @ p
        chol = torch.linalg.cholesky(torch.eye(p.shape[1], dtype=torch.float64) / self.opts.neighbour_weight
                                     + p.t() @ ap)
        return (lambda x: a_inv @ x - ap @ torch.cholesky_solve(ap.t() @ x, chol)), ap

    def neighbour_words(self, fact: Fact, key: torch.Tensor) -> list[str]:
        """The `neighbours` words of the entity pool whose key (after the word, at the band's first layer) is nearest
        the subject's `key` in the metric of C, nearest first (words of the subject's own stem left out)."""
        if not self.opts.neighbours:
            return []
        pool = self.pool()
        cosine = pool.whitened @ (pool.whitener @ key)
        return [pool.words[j] for j in cosine.argsort(descending=True).tolist()
                if not same_stem(pool.words[j], fact.subject)][:self.opts.neighbours]

    def neighbourhood(self, fact: Fact, words: list[str], hidden: torch.Tensor
                      ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """One forward of the fact's prompt with each of `words` in the subject's place (without donors, the prompt up
        to the word only: its keys are all that is read): ({layer: (F, m)} their keys there, what the edit must leave
        as it was; the donor direction (D,) or None: the mean, over the `donors` words whose prompt prefers the new
        object to the old one by most, of their residual after the band's top layer at their last token, minus the
        subject's own (`hidden`, the bare prompt's): where the residual of a subject the model already answers so
        lies (activation patching's donor))."""
        if not words:
            return {}, None
        start = fact.prompt.rfind(fact.subject)
        head, tail = fact.prompt[:start], fact.prompt[start + len(fact.subject):]
        if not self.opts.donors:  # the keys at the subject's token alone: the prompt's tokens after it not run
            tail = ""
        q = encode(self.tokenizer, [head + w + tail for w in words], [len(head) + len(w) for w in words])
        model = self.searcher()
        keys, h, logits = run(model, q, key_layers=self.layers, residual_layer=self.layers[-1],
                              logits=bool(self.opts.donors), prefix=Prefix.shared(model, q))
        keys = {i: k.t() for i, k in keys.items()}
        if not self.opts.donors:
            return keys, None
        new = first_token(self.tokenizer, fact.target_new)
        old = logits[:, first_token(self.tokenizer, fact.target_true)] if fact.target_true is not None else \
            best_other(logits, new)[0]
        best = (logits[:, new] - old).topk(min(self.opts.donors, len(words))).indices  # log-odds: logit differences
        return keys, h[best].mean(0) - hidden

    def pool(self) -> EntityPool:
        """The entity pool, its keys whitened (C^-1/2, the band's first layer) and normalised, made once."""
        if self._pool is None:
            c = self.covariance[self.layers[0]].double()
            vals, vecs = torch.linalg.eigh(c)
            whitener = ((vecs * vals.clamp_min(vals.max() * 1e-10).rsqrt()) @ vecs.t()).float()  # C^-1/2
            pool = entity_pool(self.model, self.tokenizer, self.layers[0])
            white = pool.keys.float() @ whitener
            self._pool = dataclasses.replace(pool, whitened=white / white.norm(dim=1, keepdim=True), whitener=whitener)
        return self._pool

    def inverse(self, layer_idx: int) -> torch.Tensor:
        if layer_idx not in self.inverses:
            c = self.opts.covariance_weight * self.covariance[layer_idx].double()
            self.inverses[layer_idx] = torch.cholesky_inverse(torch.linalg.cholesky(c)).contiguous()  # (row-major:
            # cholesky_inverse's column-major result made each A^-1 x over 20x slower on a CPU)
        return self.inverses[layer_idx]

    SCALES = (0.25, 0.5, 0.75, 1.0, 1.5)

    @torch.no_grad()
    def residual_change(self, fact: Fact, q: Queries, paths: "Paths", donor: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """(n, D): the change a of the residual at the subject's last token after the band's top layer, per query,
        built in at most `rounds` steps, each s |h| d: d the step's direction at the current a (`direction`: the
        attention's pull-back, `pullback`, of the new object's unembedding minus what the query predicts now; or
        the gradient of the new object's log-probability, `value_gradient`), at the first step also the `donor`
        direction (D,) (`neighbourhood`; both are tried); s the smallest grid scale at which every query has the
        new object lead every other next token by `top_margin` nats (and the old object by `margin`), else the
        scale with the best worst query, and the next step goes on from there."""
        top, gradient = self.layers[-1], self.opts.direction == "gradient"
        new = first_token(self.tokenizer, fact.target_new)
        h_top, hidden = paths.inputs[top + 1], paths.hidden
        scales = torch.tensor([s for s in self.SCALES if s <= self.opts.max_scale])
        add, n = torch.zeros_like(h_top), h_top.shape[0]
        true = (first_token(self.tokenizer, fact.target_true) if fact.target_true is not None else  # else its own
                int(best_other(paths.logits[:1], new)[1]))
        prefix, model, start = paths.prefix, self.searcher(), paths.prefix.start if paths.prefix is not None else 0
        for step in range(self.opts.rounds):
            if gradient:
                d = [value_gradient(model, q, top, hidden, add, prefix, new)]
            else:
                d = [pullback(self.model, q, paths.inputs, paths.attn, unembedding_pull(self.model, paths.logits, new))]
            if step == 0 and donor is not None:
                d.append(donor.expand_as(d[0]))
            d = torch.stack(d)  # (directions, n, D)
            d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) * h_top.norm(dim=-1, keepdim=True)  # |d| = |h|
            tries = (add + scales[:, None, None, None] * d).flatten(0, 1)  # (S * directions, n, D), by scale
            many = repeat(q, len(tries))
            replay = with_change(hidden[:, start:].repeat(len(tries), 1, 1), many, tries.flatten(0, 1), start)
            if gradient:  # the logits alone
                with replayed(model, top, replay):
                    logits = last_logits(model, many, prefix)
            else:  # and the pull-back's paths of each try, for the next step
                found = attention_paths(model, many, top, replay=replay, prefix=prefix)
                logits = found.logits  # (the margins are log-odds: differences of logits)
            margin = torch.minimum(logits[:, new] - best_other(logits, new)[0],
                                   logits[:, new] - logits[:, true] - self.opts.margin)
            margin = margin.view(len(tries), n).min(1).values  # the worst query of each try
            ok = (margin >= self.opts.top_margin).nonzero()
            pick = int(ok[0, 0]) if len(ok) else int(margin.argmax())
            add = tries[pick]
            if len(ok):
                break
            if not gradient:
                paths = found.rows(pick * n + torch.arange(n))  # the next step's pull-back from where this one ended
        return add


@dataclasses.dataclass
class Paths:
    inputs: dict  # {l: (B, D) layer l's input at the subject token, l > top}
    attn: dict  # {l: (B, H) attention of the last token on the subject token, l > top}
    logits: torch.Tensor  # (B, V) next-token logits at the last token
    keys: dict  # {l: (B, F) the MLP key at the subject token, l in key_layers}
    hidden: torch.Tensor | None = None  # (B, T, D) layer top's output, all positions (a forward without `replay`)
    prefix: Prefix | None = None  # the tokens before the subject column (a forward without `replay` of aligned q)

    def rows(self, rows: torch.Tensor) -> "Paths":
        """The paths of some rows of the batch (their inputs, attention and logits)."""
        return Paths({i: x[rows] for i, x in self.inputs.items()}, {i: x[rows] for i, x in self.attn.items()},
                     self.logits[rows], {})


@torch.no_grad()
def attention_paths(model, q: Queries, top: int, key_layers=(), replay: torch.Tensor | None = None,
                    prefix: Prefix | None = None) -> Paths:
    """One forward with eager attention from layer `top` (which must not be the last) on; `replay`: layer top's
    output to use instead of running layers 0..top (see `replayed`), (B, T, D), or with `prefix` (`Paths.prefix` of
    a forward without one) from its column prefix.start on only, (B, T - prefix.start, D)."""
    layers, rows, paths = npt.decoder_layers(model), torch.arange(len(q.last_pos)), Paths({}, {}, None, {})
    if not top + 1 < len(layers):
        raise ValueError(f"the band's top layer {top} must be below the model's last layer {len(layers) - 1}")
    start = prefix.start if prefix is not None and replay is not None else 0
    handles = _key_hooks(model, key_layers, q.subject_pos - start, paths.keys)
    if replay is None:
        handles.append(layers[top].register_forward_hook(
            lambda m, a, out: setattr(paths, "hidden", (out[0] if isinstance(out, tuple) else out).detach())))
    for i in range(top + 1, len(layers)):
        handles.append(layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: paths.inputs.__setitem__(i, (a[0] if a else kw["hidden_states"])[
                rows, q.subject_pos - start].float()), with_kwargs=True))
        handles.append(_self_attn(layers[i]).register_forward_hook(lambda m, a, out, i=i: paths.attn.__setitem__(
            i, out[1][rows, :, q.last_pos - start, q.subject_pos].float())))
    try:
        keep = [] if replay is None else None
        with replayed(model, top, replay), attention_implementation(model, "eager"):  # (eager: the only one that
            paths.logits = last_logits(model, q, prefix if start else None, keep)  # returns the attention's weights)
        if keep:
            paths.prefix = Prefix.of(q, keep[0])
    finally:
        for h in handles:
            h.remove()
    return paths


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns `hidden` when given, else its input unchanged."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden.to(hidden_states.dtype)


@contextlib.contextmanager
def replayed(model, top: int, hidden: torch.Tensor | None):
    """Within: a forward skips decoder layers 0..top and takes `hidden` (B, T, D) as layer top's output (a forward
    that changes nothing below layer top+1 need not run them again); hidden None: a normal forward."""
    layers = npt.decoder_layers(model)
    saved = list(layers[:top + 1]) if hidden is not None else []
    try:
        for j in range(len(saved)):
            layers[j] = _Replay(hidden if j == top else None)
        yield
    finally:
        for j, layer in enumerate(saved):
            layers[j] = layer


def with_change(hidden: torch.Tensor, q: Queries, add: torch.Tensor, start: int = 0) -> torch.Tensor:
    """hidden (B, T - start, D), q's columns from `start` on, with add (B, D) added at each row's subject token."""
    out = hidden.clone()
    out[torch.arange(len(q.subject_pos)), q.subject_pos - start] += add.to(out.dtype)
    return out


def value_gradient(model, q: Queries, top: int, hidden: torch.Tensor, add: torch.Tensor, prefix: Prefix | None,
                   token: int) -> torch.Tensor:
    """(B, D) fp32: the gradient of sum_b log p(token | query b) with respect to the change add (B, D) at each row's
    subject token after layer `top` (`hidden`, layer top's output, as `attention_paths` gives it): one forward of the
    layers above and one backward pass to the change (no weight's gradient is formed)."""
    start = prefix.start if prefix is not None else 0
    change = add.detach().clone().requires_grad_(True)
    with torch.enable_grad(), replayed(model, top, with_change(hidden[:, start:], q, change, start)), \
            attention_implementation(model, "eager"):  # (on a CPU, a few short rows: faster than SDPA's backward)
        logp = last_logits(model, q, prefix).log_softmax(-1)[:, token].sum()
        grad, = torch.autograd.grad(logp, change)
    return grad


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Within: the model's attention runs as transformers' implementation `name`."""
    config = model.config
    before, config._attn_implementation = config._attn_implementation, name
    try:
        yield
    finally:
        config._attn_implementation = before


def _self_attn(layer):
    return (layer.layer if isinstance(layer, npt.NPTLayer) else layer).self_attn


def unembedding_pull(model, logits: torch.Tensor, token: int) -> torch.Tensor:
    """(B, D): what `pullback` carries back for `token` given the next-token logits (B, V): its unembedding minus the
    expected one under the logits' softmax (the log-probability's gradient at the final norm's output), through the
    final norm's scale."""
    unembed = model.get_output_embeddings().weight.float()
    return (unembed[token] - logits.softmax(-1) @ unembed) * final_norm(model).weight.float()


def pullback(model, q: Queries, inputs: dict, attn: dict, u: torch.Tensor) -> torch.Tensor:  # u (B, D)
    """(B, D): the direction at the subject token that the later layers' attention carries to the last token along
    u, to first order through each head's value and output maps (their LN1 scale and rms included, the attention
    weights and the MLPs held fixed): sum_l sum_head A[last, subject] diag(w1 / rms(h)) W_V^T W_O^T u."""
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    out = 0
    for i, a in attn.items():
        layer = npt.decoder_layers(model)[i]
        sa = _self_attn(layer)
        dh = sa.o_proj.weight.shape[1] // heads
        o = sa.o_proj.weight.float().view(-1, heads, dh)  # (D, H, dh)
        v = sa.v_proj.weight.float().view(kv, dh, -1).repeat_interleave(heads // kv, 0)  # (H, dh, D)
        per_head = torch.einsum("hkd,bhk->bhd", v, torch.einsum("dhk,bd->bhk", o, u))  # (B, H, D)
        norm = (layer.layer if isinstance(layer, npt.NPTLayer) else layer).input_layernorm
        scale = norm.weight.float() / npt.norm_rms(norm, inputs[i])[:, None]  # (B, D)
        out = out + torch.einsum("bh,bhd->bd", a, per_head) * scale
    return out


def final_norm(model):
    return model.base_model.norm


# ----------------------------------------------------------------------------- the library's entry point
def compute_edit(model, tokenizer, contexts: list[str], records: list | None = None,
                 **options) -> dict[str, torch.Tensor]:
    """The edit that writes `contexts` (in order: each computed on the model with the earlier ones written) into the
    model: {parameter name in the plain Hugging Face model: total change (fp32, the parameter's shape)}. `records`
    (counterfact Records, one per context) name the prompt, subject and objects; without them each context is read
    by parse_context's rule. The model's weights are as they were on return. options: EditOptions' fields."""
    if isinstance(contexts, str) or not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
        raise ValueError("contexts must be a non-empty list of non-empty strings")
    if records is not None and len(records) != len(contexts):
        raise ValueError(f"records must give one record per context: {len(records)} records, {len(contexts)} contexts")
    facts = [fact_from_record(r) for r in records] if records is not None else [parse_context(c) for c in contexts]
    editor = Editor(model, tokenizer, **options)
    weights = {i: decoder_mlp(model, i).down_proj.weight for i in editor.layers}
    original = {i: w.detach().clone() for i, w in weights.items()}
    try:
        for fact in facts:
            editor.write(fact)
        return {down_proj_name(model, i): w.detach().float() - original[i].float() for i, w in weights.items()}
    finally:
        with torch.no_grad():
            for i, w in weights.items():
                w.copy_(original[i])
