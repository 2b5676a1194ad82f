#!/usr/bin/env python
"""Safe NPT equivalence pre-training (../shared/SPEC.md section 4).

The student is the NPT model, the teacher the same model under `npt.npt_disabled` (one copy in
memory). Loss = normalized MSE between student and teacher layer outputs (before the final norm)
averaged over NPT layers and real tokens, + lambda * regularization. A micro-batch whose loss or
gradients are not finite is skipped without touching weights, optimizer or scheduler.

    python pretrain_npt_safe.py                       # smollm2-135m on the builtin corpus
    torchrun --nproc_per_node 2 pretrain_npt_safe.py  # DDP (gloo on CPU, nccl on GPU)

Test hook: NPT_INJECT_NAN_STEPS="3,5-7" plants NaN input embeddings in those micro-batch groups
(1-based count of micro-batch groups drawn, resumed runs included), to exercise the skip logic.

References: the user's NPT_FIX_SUMMARY.md (the fixes), nanoGPT train.py (one readable loop),
Hugging Face Trainer (flags, checkpoint-<step> directories, token-weighted gradient accumulation).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import click
import torch

import npt


# ----------------------------------------------------------------------------- CLI plumbing shared by the scripts
class UserError(Exception):
    """Bad input a user can fix: reported as one line, exit code 2."""


def fail(message: str):
    raise UserError(message)


def first_line(e: BaseException) -> str:
    """An exception's first line (its type when it has no message), for one-line errors."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _cannot_load_model(model_name: str, e: BaseException):
    fail(f"cannot load model {model_name!r}: {first_line(e)} (give a hub id, a local model directory, or smollm2-135m)")


class OneLineCommand(click.Command):
    """Bad input (click's own or ours) prints one 'error: ...' line and exits 2: no usage dump, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except (click.ClickException, UserError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"error: {' '.join(msg.split())}", err=True)
            sys.exit(2)


def model_options(f):
    """The model and precision flags every script takes."""
    options = [
        click.option("--model_name", default=npt.EMBEDDED_MODEL, show_default=True,
                     help="Hub id, local directory, or the embedded 'smollm2-135m'."),
        click.option("--use_quantization", is_flag=True, help="Load the base model in 4-bit NF4 (FP32 compute)."),
        click.option("--use_fp16", is_flag=True, help="Load the base model in fp16 (ignored with --use_quantization)."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def load_model_or_fail(model_name: str, use_quantization: bool = False, use_fp16: bool = False, **kwargs):
    """load_base_model, with a missing or unreadable model reported as a user error."""
    try:
        return npt.load_base_model(model_name, use_quantization=use_quantization, use_fp16=use_fp16, **kwargs)
    except (OSError, ValueError) as e:
        _cannot_load_model(model_name, e)


def model_path(model_name: str) -> str:
    return str(npt.embedded_model_path()) if model_name == npt.EMBEDDED_MODEL else model_name


def load_model_config_or_fail(model_name: str):
    """The model's transformers config (cheap: no weights), so shapes are validated before loading."""
    from transformers import AutoConfig

    if model_name != npt.EMBEDDED_MODEL and not Path(model_name).is_dir() and (
            Path(model_name).exists() or model_name.startswith((".", "/", "~")) or model_name.count("/") > 1):
        fail(f"model {model_name!r} not found: give a hub id, a local model directory, or smollm2-135m")
    try:
        return AutoConfig.from_pretrained(model_path(model_name))
    except (OSError, ValueError) as e:
        _cannot_load_model(model_name, e)


# ----------------------------------------------------------------------------- loss
def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _capture(model, inputs: bool):
    """Forward hooks on every NPT layer: {layer_idx: {h: input, attn: attention output, y: output}}."""
    store, handles = {}, []
    for layer in npt.npt_layers(model):
        c = store.setdefault(layer.layer_idx, {})
        handles.append(layer.register_forward_hook(lambda m, a, out, c=c: c.__setitem__("y", _first(out))))
        if inputs:
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, c=c: c.__setitem__("h", a[0] if a else kw["hidden_states"]), with_kwargs=True))
            handles.append(layer.layer.self_attn.register_forward_hook(
                lambda m, a, out, c=c: c.__setitem__("attn", _first(out))))
    return store, handles


def _decoder_pass(model, batch, inputs: bool = False, teacher: bool = False, logits: bool = False):
    """Run the decoder stack (with the lm_head only when `logits`) and return the captured per-layer
    tensors, and the logits when asked."""
    store, handles = _capture(model, inputs)
    try:
        ctx = npt.npt_disabled(model) if teacher else contextlib.nullcontext()
        grad = torch.no_grad() if teacher else contextlib.nullcontext()
        with ctx, grad:
            out = (model if logits else model.base_model)(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return (store, out.logits) if logits else store


def keep_4bit_differentiable(model) -> None:
    """bitsandbytes (0.50, CPU with AVX512-BF16) repacks a 4-bit weight for inference on the first no-grad
    forward of a Linear4bit in eval mode, and the repacked path (gemv_4bit) has no autograd: gradients
    through the frozen 4-bit MLP to the adapters would silently be wrong. Training-mode Linear4bit never
    repacks; weights already repacked are unpacked."""
    for m in model.modules():
        if type(m).__name__ != "Linear4bit" or not type(m).__module__.startswith("bitsandbytes"):
            continue
        m.training = True
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)


def compute_loss(model, batch, objective: str = "layerwise", regularization_lambda: float = 0.01) -> dict:
    """Equivalence loss of one micro-batch: {loss, mse, reg, layer_mse (list), tokens}.

    layerwise: one teacher pass (npt_disabled, no_grad) captures each NPT layer's input h, attention
    output and output y; each NPT layer's modulated MLP then runs on (h, attn) and is compared to y
    (no gradient crosses layers). end_to_end: the student runs its own trajectory.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    mask = batch["attention_mask"]
    layers = npt.npt_layers(model)
    keep_4bit_differentiable(model)
    teacher = _decoder_pass(model, batch, inputs=objective == "layerwise", teacher=True)
    if objective == "layerwise":
        student = {layer.layer_idx: layer.modulated_mlp(teacher[layer.layer_idx]["h"],
                                                        teacher[layer.layer_idx]["attn"]) for layer in layers}
    else:
        student = {i: c["y"] for i, c in _decoder_pass(model, batch).items()}
    layer_mse = torch.stack([npt.normalized_mse(student[layer.layer_idx], teacher[layer.layer_idx]["y"], mask)
                             for layer in layers])  # (L,)
    mse = layer_mse.mean()
    reg = npt.regularization(model, mask)
    return {"loss": mse + regularization_lambda * reg, "mse": mse, "reg": reg,
            "layer_mse": layer_mse.detach(), "tokens": int(mask.sum())}


OBJECTIVES = ("layerwise", "end_to_end")


# ----------------------------------------------------------------------------- one optimizer step
def optimizer_step(model, optimizer, scheduler, micro_batches, max_grad_norm: float = 0.5,
                   objective: str = "layerwise", regularization_lambda: float = 0.01,
                   autocast=contextlib.nullcontext, reduce=None) -> dict:
    """One optimizer step over `micro_batches` (dicts with input_ids, attention_mask).

    Gradients are token-weighted, so k micro-batches give the gradient of one batch of all their
    tokens. Each micro-batch's gradient is computed on its own (autograd.grad) and added only if its
    loss and gradient are finite; a skipped micro-batch changes nothing. If every micro-batch is
    skipped, weights, optimizer and scheduler stay exactly as they were.
    `reduce(tensor)` sums a tensor over processes (DDP); None in a single process.
    Returns {loss, mse, reg, grad_norm, skipped, tokens, bad: [micro-batch indices skipped], reasons}.
    """
    params = [p for p in npt.get_adapter_params(model) if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sums = torch.zeros(4, dtype=torch.float64)  # tokens, loss*tokens, mse*tokens, reg*tokens
    bad = torch.zeros(len(micro_batches), dtype=torch.float64)
    reasons = {}
    for i, mb in enumerate(micro_batches):
        n = int(mb["attention_mask"].sum())
        if n == 0:  # an empty shard (the tail of a stream under DDP): nothing to learn from
            continue
        with autocast():
            out = compute_loss(model, mb, objective, regularization_lambda)
        loss = out["loss"].float()
        if not bool(torch.isfinite(loss)):
            bad[i], reasons[i] = 1, "non-finite loss"
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            bad[i], reasons[i] = 1, "non-finite gradient"
            continue
        for a, g in zip(acc, grads):
            a.add_(g.float(), alpha=n)
        sums += torch.tensor([n, n * loss.item(), n * out["mse"].item(), n * out["reg"].item()], dtype=torch.float64)
    if reduce is not None:  # one gradient sync per optimizer step, as DDP's no_sync accumulation does
        flat = reduce(torch.cat([a.flatten() for a in acc] + [sums.float(), bad.float()]))
        sizes = [a.numel() for a in acc]
        parts = flat.split(sizes + [4, len(micro_batches)])
        acc = [p.view_as(a) for p, a in zip(parts[:len(acc)], acc)]
        sums, bad = parts[-2].double(), parts[-1].double()
    skipped = int((bad > 0).sum())
    nan = float("nan")
    result = {"loss": nan, "mse": nan, "reg": nan, "grad_norm": nan, "skipped": skipped,
              "tokens": int(sums[0]), "bad": [i for i in range(len(micro_batches)) if bad[i] > 0],
              "reasons": reasons}
    total = float(sums[0])
    if total == 0:
        return result
    for p, a in zip(params, acc):
        p.grad = (a / total).to(p.dtype)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(grad_norm):  # finite parts summing to a non-finite whole: skip the step
        for p in params:
            p.grad = None
        result.update(skipped=len(micro_batches), bad=list(range(len(micro_batches))), grad_norm=grad_norm)
        return result
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    result.update(loss=float(sums[1]) / total, mse=float(sums[2]) / total, reg=float(sums[3]) / total,
                  grad_norm=grad_norm)
    return result


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, batches, objective: str = "layerwise", regularization_lambda: float = 0.01,
             autocast=contextlib.nullcontext) -> dict:
    """Held-out metrics: objective loss, teacher/student perplexity, top-1 next-token agreement,
    per-layer normalized MSE of the student's own trajectory (token-weighted over batches)."""
    tot = {"tokens": 0, "loss": 0.0, "t_nll": 0.0, "s_nll": 0.0, "agree": 0.0, "pred": 0}
    layer_sum = None
    for b in batches:
        with autocast():
            out = compute_loss(model, b, objective, regularization_lambda)
            t_store, t_logits = _decoder_pass(model, b, teacher=True, logits=True)
            s_store, s_logits = _decoder_pass(model, b, logits=True)
        mask = b["attention_mask"]
        n = int(mask.sum())
        tot["tokens"] += n
        tot["loss"] += n * out["loss"].item()
        per_layer = torch.stack([npt.normalized_mse(s_store[i]["y"], t_store[i]["y"], mask) for i in sorted(s_store)])
        layer_sum = per_layer * n if layer_sum is None else layer_sum + per_layer * n
        pm = (mask[:, 1:] * mask[:, :-1]).bool()  # positions whose next token is real
        targets = b["input_ids"][:, 1:][pm]
        t_lp, s_lp = t_logits[:, :-1][pm].float(), s_logits[:, :-1][pm].float()
        tot["t_nll"] += torch.nn.functional.cross_entropy(t_lp, targets, reduction="sum").item()
        tot["s_nll"] += torch.nn.functional.cross_entropy(s_lp, targets, reduction="sum").item()
        tot["agree"] += (t_lp.argmax(-1) == s_lp.argmax(-1)).sum().item()
        tot["pred"] += int(pm.sum())
    n, p = max(tot["tokens"], 1), max(tot["pred"], 1)
    return {"eval_loss": tot["loss"] / n, "eval_teacher_ppl": math.exp(min(tot["t_nll"] / p, 700)),
            "eval_student_ppl": math.exp(min(tot["s_nll"] / p, 700)), "eval_agreement": tot["agree"] / p,
            "eval_layer_mse": [float(v) for v in (layer_sum / n)] if layer_sum is not None else []}


# ----------------------------------------------------------------------------- data
LOCAL_EXTS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def builtin_texts() -> list[str]:
    """The English reference text of pydoc_data.topics, cut into documents of whole paragraphs (~2k chars)."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        cur = ""
        for para in re.split(r"\n\s*\n", topics[key]):
            para = para.strip()
            if not para:
                continue
            if cur and len(cur) + len(para) > 2000:
                docs.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        if cur:
            docs.append(cur)
    return docs


def load_text_dataset(name: str, split: str, streaming: bool, text_column: str):
    """A `datasets` Dataset / IterableDataset with a text column; user errors for the obvious mistakes."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    if name == "builtin":
        ds = datasets.Dataset.from_dict({"text": builtin_texts()})
        text_column = "text"
        return (ds.to_iterable_dataset() if streaming else ds), text_column
    path = Path(name).expanduser()
    try:
        if path.suffix.lower() in LOCAL_EXTS or path.exists() or name.startswith((".", "/", "~")):
            if not path.exists():
                fail(f"dataset {name!r} not found (give builtin, a hub dataset name, or a local "
                     f".txt/.jsonl/.json/.parquet file)")
            if path.is_file() and path.suffix.lower() not in LOCAL_EXTS:
                fail(f"dataset file {name!r} has an unknown type: use .txt, .jsonl, .json or .parquet")
            if path.is_file():
                if path.stat().st_size == 0:
                    fail(f"dataset {name!r} is empty")
                ds = datasets.load_dataset(LOCAL_EXTS[path.suffix.lower()], data_files=str(path), split="train",
                                           streaming=streaming)
            else:
                ds = datasets.load_dataset(str(path), split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError...)
        fail(f"cannot load dataset {name!r} (split {split!r}): {first_line(e)}")
    return ds, text_column


def check_text_column(ds, text_column: str, name: str):
    """Refuse a dataset without the text column or without any non-empty text."""
    first = None
    for ex in ds:
        if text_column not in ex:
            fail(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(ex)}); "
                 f"choose one with --text_column")
        t = ex[text_column]
        if isinstance(t, str) and t.strip():
            first = t
            break
    if first is None:
        fail(f"dataset {name!r} is empty (no non-empty text in column {text_column!r})")


class TextStream:
    """Documents -> tokens (+eos) packed into windows of max_length; deterministic and resumable.

    A position is (epoch, doc, offset): the next window starts at token `offset` of document `doc`
    of epoch `epoch` (non-streaming datasets are shuffled per epoch with seed + epoch).
    """

    def __init__(self, ds, text_column, tokenizer, max_length, seed, shuffle, epochs=None):
        self.ds, self.col, self.tok, self.max_length = ds, text_column, tokenizer, max_length
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.eos = tokenizer.eos_token_id
        self.streaming = not hasattr(ds, "__len__")

    def _docs(self, epoch, start):
        if self.streaming:
            it = self.ds.skip(start) if start else self.ds
            for i, ex in enumerate(it, start):
                yield i, ex[self.col]
        else:
            order = list(range(len(self.ds)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            for i in range(start, len(order)):
                yield i, self.ds[order[i]][self.col]

    def _tokens(self, text):
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) and text.strip() else []
        return ids + ([self.eos] if ids and self.eos is not None else [])

    def windows(self, position=(0, 0, 0)):
        """Yields (window token ids, position after it)."""
        epoch, doc, offset = position
        while self.epochs is None or epoch < self.epochs:
            buf, produced = [], False
            for i, text in self._docs(epoch, doc):
                ids = self._tokens(text)
                at = offset if i == doc else 0
                while at < len(ids):
                    chunk = ids[at:at + self.max_length - len(buf)]
                    buf += chunk
                    at += len(chunk)
                    if len(buf) == self.max_length:
                        produced = True
                        yield buf, ((epoch, i, at) if at < len(ids) else (epoch, i + 1, 0))
                        buf = []
            if len(buf) >= 2:
                produced = True
                yield buf, (epoch + 1, 0, 0)
            if not produced and doc == 0 and offset == 0:
                return  # an epoch without a single sequence: cycling it would never end
            epoch, doc, offset = epoch + 1, 0, 0


def collate(windows, pad_id):
    """Right-padded batch of token windows with its attention mask."""
    length = max(len(w) for w in windows)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def count_windows(stream: TextStream) -> int:
    one = TextStream(stream.ds, stream.col, stream.tok, stream.max_length, stream.seed, False, epochs=1)
    return sum(1 for _ in one.windows())


# ----------------------------------------------------------------------------- checkpoints
CKPT_RE = re.compile(r"checkpoint-(\d+)$")
STATE_NAME, OPTIM_NAME, RNG_NAME = "trainer_state.json", "optimizer.safetensors", "rng_state.safetensors"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _json_safe(x.tolist())
    return x


def save_checkpoint(output_dir: Path, name: str, model, optimizer, scheduler, state: dict) -> Path:
    """Adapters (npt format) + trainer state without pickle, written to a temp dir then renamed."""
    from safetensors.torch import save_file

    final = output_dir / name
    tmp = output_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    npt.save_adapters(model, tmp)
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{k}": (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().cpu().contiguous()
               for pid, st in opt["state"].items() for k, v in st.items()}
    save_file(tensors, str(tmp / OPTIM_NAME))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / RNG_NAME))
    py = random.getstate()
    full = {**state, "optimizer_param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "python_rng": [py[0], list(py[1]), py[2]]}
    (tmp / STATE_NAME).write_text(json.dumps(_json_safe(full), indent=1) + "\n")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
        old = output_dir / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def tidy_output_dir(output_dir: Path):
    """Remove half-written temp dirs of a killed run; put back a checkpoint caught mid-replacement."""
    for d in output_dir.glob(".old-*"):
        name = re.sub(r"^\.old-(.*)-\d+$", r"\1", d.name)
        if not (output_dir / name).exists():
            os.rename(d, output_dir / name)
        else:
            shutil.rmtree(d, ignore_errors=True)
    for d in output_dir.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def prune_checkpoints(output_dir: Path, limit: int | None):
    if not limit:
        return
    steps = sorted(int(m.group(1)) for d in output_dir.iterdir() if (m := CKPT_RE.match(d.name)))
    for s in steps[:-limit]:
        d = output_dir / f"checkpoint-{s}"
        gone = output_dir / f".tmp-delete-{s}-{os.getpid()}"
        os.rename(d, gone)  # atomic: never a half-deleted checkpoint under its real name
        shutil.rmtree(gone, ignore_errors=True)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step (checkpoint-<step> or checkpoint-final)."""
    best, best_step = None, -1
    if not output_dir.is_dir():
        return None
    for d in output_dir.iterdir():
        m = CKPT_RE.match(d.name)
        if not (m or d.name == "checkpoint-final") or not (d / STATE_NAME).is_file():
            continue
        try:
            step = int(m.group(1)) if m else json.loads((d / STATE_NAME).read_text())["step"]
        except (ValueError, KeyError, OSError):
            continue
        if step > best_step or (step == best_step and m):
            best, best_step = d, step
    return best


def read_checkpoint_or_fail(path: Path) -> dict:
    """Validate a checkpoint before anything is loaded: trainer state, optimizer and adapter files readable."""
    from safetensors.torch import load_file

    if not path.is_dir():
        fail(f"checkpoint {str(path)!r} not found")
    try:
        state = json.loads((path / STATE_NAME).read_text())
        meta = npt.read_adapter_config(path)
        for f in (npt.WEIGHTS_NAME, OPTIM_NAME, RNG_NAME):
            load_file(str(path / f))
    except FileNotFoundError as e:
        fail(f"checkpoint {str(path)!r} is incomplete: {Path(e.filename).name if e.filename else e} is missing")
    except Exception as e:
        fail(f"checkpoint {str(path)!r} is corrupt: {first_line(e)}")
    state["_adapter_meta"] = meta
    return state


def restore_checkpoint(path: Path, model, optimizer, scheduler, state: dict):
    from safetensors.torch import load_file

    npt.load_adapters(model, path)
    tensors = load_file(str(path / OPTIM_NAME))
    opt_state = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / RNG_NAME))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ----------------------------------------------------------------------------- logging sinks
class Sinks:
    """metrics.jsonl, log file, loss-curve PNG, TensorBoard, wandb; only the main process writes."""

    def __init__(self, output_dir: Path, main: bool, log_file, tensorboard: bool, wandb_mod, run_name, config,
                 resume_step: int | None):
        self.dir, self.main = output_dir, main
        self.metrics = output_dir / "metrics.jsonl"
        self.log_file = Path(log_file) if log_file else None
        self.tb = self.wandb = None
        if not main:
            return
        if resume_step is not None and self.metrics.exists():  # drop rows the resumed run will write again
            rows = [r for r in self.metrics.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.metrics.write_text("".join(r + "\n" for r in keep))
        elif resume_step is None and self.metrics.exists():
            self.metrics.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard" / run_name))
        if wandb_mod is not None:
            self.wandb = wandb_mod
            wandb_mod.init(project=os.environ.get("WANDB_PROJECT", "npt"), name=run_name, config=config,
                           dir=str(output_dir))

    def message(self, text: str):
        if not self.main:
            return
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def row(self, row: dict):
        if not self.main:
            return
        row = _json_safe(row)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(row)}\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, row["step"])
            for i, v in enumerate(row.get("eval_layer_mse") or []):
                self.tb.add_scalar(f"eval/layer_mse/{i}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def plot(self):
        if not self.main or not self.metrics.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(r) for r in self.metrics.read_text().splitlines() if r.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "eval_loss" not in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        layer_evals = [r for r in rows if r.get("eval_layer_mse")]
        fig, axes = plt.subplots(1, 2 if layer_evals else 1, figsize=(12 if layer_evals else 7, 4), squeeze=False)
        ax = axes[0, 0]
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("normalized MSE + lambda * reg")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("NPT equivalence pre-training")
        if layer_evals:  # the student's own trajectory vs the teacher's, layer by layer
            ax = axes[0, 1]
            for r in dict.fromkeys([layer_evals[0]["step"], layer_evals[-1]["step"]]):
                row = next(e for e in layer_evals if e["step"] == r)
                ax.plot(row["eval_layer_mse"], "o-", ms=3, label=f"step {r}: student ppl {row['eval_student_ppl']:.3g}"
                        f" (teacher {row['eval_teacher_ppl']:.3g}), agreement {row['eval_agreement']:.2f}")
            ax.set_xlabel("NPT layer (position among converted layers)")
            ax.set_ylabel("held-out normalized MSE")
            ax.legend(fontsize=8)
            ax.set_title("per-layer fidelity (eval)")
        fig.tight_layout()
        tmp = self.dir / ".loss_curve.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.dir / "loss_curve.png")

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- validation helpers
def check_output_dir_or_fail(output_dir: str) -> Path:
    path = Path(output_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        fail(f"--output_dir {output_dir!r} is a file, not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        fail(f"--output_dir {output_dir!r} is not writable ({probe} does not allow writing)")
    return path


def parse_steps(spec: str) -> set[int]:
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


# ----------------------------------------------------------------------------- CLI
@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--adapter_rank", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rank r of the NPT adapters (1..d_model).")
@click.option("--share_embeddings", is_flag=True,
              help="Accepted for compatibility: the teacher is always the same model (npt_disabled), so embeddings are always shared.")
@click.option("--safe_mode", is_flag=True, help="Additive modulation only (no multiplicative branch).")
@click.option("--npt_layers", default="all", show_default=True,
              help="Layers to convert: all, upper_half, lower_half, a range like 8-15 or a list like 1,3,5 (0-based).")
@click.option("--kernel", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="Modulated-SwiGLU backend (auto: Triton on CUDA, torch otherwise).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="layerwise", show_default=True,
              help="layerwise: each NPT layer on the teacher's input and attention; end_to_end: the student's own trajectory.")
@click.option("--dataset_name", default="builtin", show_default=True,
              help="builtin (pydoc_data.topics), a hub dataset, or a local .txt/.jsonl/.json/.parquet file.")
@click.option("--dataset_split", default="train", show_default=True, help="Split of a hub dataset.")
@click.option("--text_column", default="text", show_default=True, help="Column holding the text.")
@click.option("--streaming", is_flag=True, help="Stream the dataset instead of loading it (needs --max_steps > 0).")
@click.option("--num_samples", type=int, default=-1, show_default=True,
              help="Use only the first N training documents (-1: all).")
@click.option("--max_length", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per packed sequence.")
@click.option("--batch_size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Sequences per micro-batch (per process).")
@click.option("--gradient_accumulation_steps", type=click.IntRange(min=1), default=2, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--learning_rate", type=click.FloatRange(min=0), default=5e-5, show_default=True,
              help="Peak learning rate (above 5e-5 is honoured with a warning).")
@click.option("--weight_decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--optimizer_type", type=click.Choice(["adamw", "adam"]), default="adamw", show_default=True)
@click.option("--scheduler_type", type=click.Choice(["linear", "cosine", "constant"]), default="linear",
              show_default=True, help="Learning-rate schedule after warmup.")
@click.option("--warmup_steps", type=click.IntRange(min=0), default=10, show_default=True,
              help="Linear warmup, in optimizer steps.")
@click.option("--max_grad_norm", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Gradient clipping norm.")
@click.option("--regularization_lambda", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Weight of the modulation regularizer.")
@click.option("--num_epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Epochs over the data (used when --max_steps <= 0).")
@click.option("--max_steps", type=int, default=80, show_default=True,
              help="Optimizer steps to train (overrides --num_epochs; <= 0: train --num_epochs epochs).")
@click.option("--mixed_precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="Autocast precision (off with --use_quantization).")
@click.option("--output_dir", default="./outputs/npt-safe-pretrained", show_default=True)
@click.option("--run_name", default=None, help="Run name for TensorBoard/wandb (default: output dir name).")
@click.option("--log_steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Log every N optimizer steps.")
@click.option("--log_file", default=None, help="Also append log lines and metrics to this file.")
@click.option("--save_steps", type=click.IntRange(min=0), default=50, show_default=True,
              help="Save checkpoint-<step> every N optimizer steps (0: only best and final).")
@click.option("--save_total_limit", type=click.IntRange(min=1), default=None,
              help="Keep at most N checkpoint-<step> directories (best and final are kept).")
@click.option("--eval_steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate on held-out text every N steps, and at start and end (0: off).")
@click.option("--eval_samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Held-out sequences per evaluation.")
@click.option("--resume_from_checkpoint", default=None,
              help="A checkpoint directory, or 'latest' (the newest in --output_dir).")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--max_consecutive_nan", type=click.IntRange(min=1), default=10, show_default=True,
              help="Stop (with a final good checkpoint, non-zero exit) after this many non-finite micro-batches in a row.")
@click.option("--use_tensorboard", is_flag=True, help="Log to TensorBoard in OUTPUT_DIR/tensorboard.")
@click.option("--use_wandb", is_flag=True, help="Log to Weights & Biases (WANDB_MODE=offline works).")
def main(**args):
    """Safe NPT equivalence pre-training: the NPT student learns to reproduce the base model's layers."""
    sys.exit(train(**args))


def train(**a) -> int:
    # ---- validation that needs no model or data
    wandb_mod = None
    if a["use_wandb"]:
        try:
            import wandb as wandb_mod
        except ImportError:
            fail("--use_wandb needs the wandb package: pip install wandb (or drop --use_wandb)")
    if a["learning_rate"] == 0:
        fail("--learning_rate must be positive")
    if a["num_samples"] == 0 or a["num_samples"] < -1:
        fail("--num_samples must be a positive number of documents, or -1 for all")
    if a["streaming"] and a["max_steps"] <= 0:
        fail("--streaming needs --max_steps > 0 (the length of a stream is unknown)")
    inject = os.environ.get("NPT_INJECT_NAN_STEPS", "")
    try:
        inject = parse_steps(inject)
    except ValueError:
        fail(f"NPT_INJECT_NAN_STEPS={inject!r} not understood: use e.g. 3,5-7")
    output_dir = check_output_dir_or_fail(a["output_dir"])
    resume_path = resume_state = None
    if a["resume_from_checkpoint"]:
        if a["resume_from_checkpoint"] == "latest":
            resume_path = latest_checkpoint(output_dir)
            if resume_path is None:
                fail(f"--resume_from_checkpoint latest: no checkpoint in {a['output_dir']!r}")
        else:
            resume_path = Path(a["resume_from_checkpoint"]).expanduser()
        resume_state = read_checkpoint_or_fail(resume_path)
    modulation = "additive" if a["safe_mode"] else "both"
    config = load_model_config_or_fail(a["model_name"])
    text_cfg = getattr(config, "text_config", None) or config
    d_model, num_layers = text_cfg.hidden_size, text_cfg.num_hidden_layers
    if not 1 <= a["adapter_rank"] <= d_model:
        fail(f"--adapter_rank {a['adapter_rank']} is out of range: it must lie in 1..{d_model} (the model's d_model)")
    npt_config = npt.NPTConfig(rank=a["adapter_rank"], modulation=modulation, layers=a["npt_layers"])
    try:
        layer_idx = npt_config.layer_indices(num_layers)
    except ValueError as e:
        fail(f"--npt_layers: {e}")
    if resume_state is not None:
        meta = resume_state["_adapter_meta"]
        theirs = (meta.get("rank"), meta.get("modulation"), meta.get("layer_indices"))
        if theirs != (npt_config.rank, modulation, layer_idx):
            fail(f"checkpoint {str(resume_path)!r} has rank {theirs[0]}, modulation {theirs[1]}, layers {theirs[2]}; "
                 f"this run asks for rank {npt_config.rank}, modulation {modulation}, layers {layer_idx}: "
                 "pass the same --adapter_rank/--safe_mode/--npt_layers")
    if a["kernel"] == "triton":
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            fail("--kernel triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --kernel auto")

    # ---- data (validated before the model loads)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path(a["model_name"]))
    except (OSError, ValueError) as e:
        fail(f"cannot load the tokenizer of {a['model_name']!r}: {first_line(e)}")
    ds, text_column = load_text_dataset(a["dataset_name"], a["dataset_split"], a["streaming"], a["text_column"])
    check_text_column(ds, text_column, a["dataset_name"])
    if a["streaming"]:
        eval_ds, train_ds = ds.take(EVAL_DOCS_STREAM), ds.skip(EVAL_DOCS_STREAM)
        if a["num_samples"] > 0:
            train_ds = train_ds.take(a["num_samples"])
        if next(iter(train_ds), None) is None:
            fail(f"dataset {a['dataset_name']!r} has too little text: nothing left after holding out "
                 f"{EVAL_DOCS_STREAM} documents for eval")
    else:
        ds = ds.filter(lambda ex: isinstance(ex[text_column], str) and bool(ex[text_column].strip()))
        n_eval = max(1, min(len(ds) // 50, 64)) if len(ds) >= 2 else 0
        eval_ds, train_ds = ds.select(range(len(ds) - n_eval, len(ds))), ds.select(range(len(ds) - n_eval))
        if a["num_samples"] > 0:
            train_ds = train_ds.select(range(min(a["num_samples"], len(train_ds))))
        if len(train_ds) == 0:
            fail(f"dataset {a['dataset_name']!r} has too little text: nothing left after holding out eval text")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # ---- processes, precision
    from accelerate import Accelerator

    mixed = a["mixed_precision"]
    if a["use_quantization"] and mixed != "no":
        warnings.warn(f"--mixed_precision {mixed} is turned off with --use_quantization (4-bit computes in FP32)",
                      stacklevel=1)
        mixed = "no"
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, rank, main_proc = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one thread per physical core (os.cpu_count() counts hyperthreads); oversubscribed OpenMP
        # threads spin against each other and were measured 10x slower on a busy 2-core machine
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2 // world))
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype
                else contextlib.nullcontext)
    reduce = (lambda t: accelerator.reduce(t.to(device), reduction="sum").cpu()) if world > 1 else None

    stream = TextStream(train_ds, text_column, tokenizer, a["max_length"], a["seed"], shuffle=not a["streaming"])
    eval_windows = []
    if a["eval_steps"]:
        ev = TextStream(eval_ds, text_column, tokenizer, a["max_length"], a["seed"], False, epochs=1)
        for w, _ in ev.windows():
            eval_windows.append(w)
            if len(eval_windows) >= a["eval_samples"]:
                break
        if not eval_windows:
            fail(f"dataset {a['dataset_name']!r} has no held-out text to evaluate on: use --eval_steps 0")
    per_step = a["batch_size"] * world * a["gradient_accumulation_steps"]
    if a["max_steps"] > 0:
        total_steps = a["max_steps"]
        stream.epochs = None  # max_steps wins: cycle the data as often as needed
    else:
        n_windows = count_windows(stream)
        if n_windows == 0:
            fail(f"dataset {a['dataset_name']!r} yields no sequence of at least 2 tokens")
        total_steps = max(1, math.ceil(a["num_epochs"] * n_windows / per_step))
        stream.epochs = math.ceil(a["num_epochs"])
    if a["learning_rate"] > 5e-5:
        warnings.warn(f"learning rate {a['learning_rate']:g} is above the recommended 5e-5 (NaN risk); using it anyway",
                      stacklevel=1)

    # ---- model (the only copy: the teacher is npt_disabled)
    torch.manual_seed(a["seed"])
    random.seed(a["seed"])
    load_kwargs = {"device": device} if device.type == "cuda" else {}
    model, _ = load_model_or_fail(a["model_name"], a["use_quantization"], a["use_fp16"], **load_kwargs)
    torch.manual_seed(a["seed"])  # the same adapter init on every rank and every run
    npt.convert_to_npt(model, npt_config)
    npt.set_kernel(model, a["kernel"])
    model.eval()  # no dropout: teacher and student must be deterministic
    params = npt.get_adapter_params(model)
    if world > 1:  # every rank starts from rank 0's adapters (DDP's broadcast)
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
    opt_cls = torch.optim.AdamW if a["optimizer_type"] == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=a["learning_rate"], weight_decay=a["weight_decay"])
    from transformers import get_scheduler

    sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[a["scheduler_type"]]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=a["warmup_steps"],
                              num_training_steps=total_steps)

    st = {"step": 0, "micro_groups": 0, "position": [0, 0, 0], "skipped_total": 0, "consecutive_nan": 0,
          "best": None, "tokens": 0}
    if resume_state is not None:
        try:
            restore_checkpoint(resume_path, model, optimizer, scheduler, resume_state)
        except ValueError as e:
            fail(f"cannot resume from {str(resume_path)!r}: {e}")
        for k in st:
            st[k] = resume_state.get(k, st[k])
    run_name = a["run_name"] or output_dir.name
    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        tidy_output_dir(output_dir)
    accelerator.wait_for_everyone()
    sinks = Sinks(output_dir, main_proc, a["log_file"], a["use_tensorboard"], wandb_mod, run_name,
                  {k: v for k, v in a.items()}, st["step"] if resume_state is not None else None)
    sinks.message(f"NPT pre-training: {a['model_name']}, {len(layer_idx)} NPT layers, rank {a['adapter_rank']}, "
                  f"{modulation} modulation, {a['objective']} objective, {total_steps} steps of "
                  f"{per_step} x {a['max_length']} tokens, {world} process(es)"
                  + (f", resumed at step {st['step']} from {resume_path}" if resume_state is not None else ""))
    eval_batches = [collate(eval_windows[i:i + a["batch_size"]], pad_id) for i in range(0, len(eval_windows),
                                                                                        a["batch_size"])]
    eval_batches = [{k: v.to(device) for k, v in b.items()} for b in eval_batches]

    def run_eval():
        metrics = evaluate(model, eval_batches, a["objective"], a["regularization_lambda"], autocast)
        sinks.row({"step": st["step"], **metrics})
        sinks.message(f"eval @ step {st['step']}: loss {metrics['eval_loss']:.4g}, teacher ppl "
                      f"{metrics['eval_teacher_ppl']:.3g}, student ppl {metrics['eval_student_ppl']:.3g}, "
                      f"agreement {metrics['eval_agreement']:.3f}")
        return metrics

    state_meta = {"args": {k: v for k, v in a.items() if k != "resume_from_checkpoint"}, "world_size": world}

    def checkpoint(name):
        if main_proc:
            path = save_checkpoint(output_dir, name, model, optimizer, scheduler, {**st, **state_meta})
            if CKPT_RE.match(name):
                prune_checkpoints(output_dir, a["save_total_limit"])
            sinks.plot()
            return path
        return output_dir / name

    # ---- the loop
    from tqdm.auto import tqdm

    nan_hook = None
    if inject:
        poisoned = {"on": False}
        nan_hook = model.get_input_embeddings().register_forward_hook(
            lambda m, i, out: out * float("nan") if poisoned["on"] else out)
    windows = stream.windows(tuple(st["position"]))
    bar = tqdm(total=total_steps, initial=st["step"], disable=not main_proc, desc="npt", dynamic_ncols=True)
    window_losses, last_eval = [], None
    if a["eval_steps"] and st["step"] == 0:
        last_eval = run_eval()
    exhausted, t0, tokens_since = False, time.time(), 0
    code = 0
    while st["step"] < total_steps and not exhausted:
        group = []
        for _ in range(a["gradient_accumulation_steps"]):
            seqs = []
            for _ in range(a["batch_size"] * world):
                nxt = next(windows, None)
                if nxt is None:
                    exhausted = True
                    break
                seqs.append(nxt[0])
                st["position"] = list(nxt[1])
            mine = seqs[rank * a["batch_size"]:(rank + 1) * a["batch_size"]]
            if seqs:
                group.append({k: v.to(device) for k, v in collate(mine, pad_id).items()} if mine else
                             {"input_ids": torch.zeros((0, 1), dtype=torch.long, device=device),
                              "attention_mask": torch.zeros((0, 1), dtype=torch.long, device=device)})
            if exhausted:
                break
        if not group:
            break
        st["micro_groups"] += 1
        if inject:
            poisoned["on"] = st["micro_groups"] in inject
        out = optimizer_step(model, optimizer, scheduler, group, a["max_grad_norm"], a["objective"],
                             a["regularization_lambda"], autocast, reduce)
        tokens_since += out["tokens"]
        st["tokens"] += out["tokens"]
        if out["skipped"]:
            st["skipped_total"] += out["skipped"]
            for i in out["bad"]:
                why = out["reasons"].get(i, "non-finite loss or gradient")
                sinks.message(f"skipped micro-batch {i + 1}/{len(group)} of group {st['micro_groups']} "
                              f"at step {st['step']}: {why}")
        # consecutive non-finite micro-batches, in order
        for i in range(len(group)):
            st["consecutive_nan"] = st["consecutive_nan"] + 1 if i in out["bad"] else 0
        stepped = out["skipped"] < len(group) and math.isfinite(out["loss"])
        if stepped:
            st["step"] += 1
            bar.update(1)
            window_losses.append(out["loss"])
        elapsed = max(time.time() - t0, 1e-9)
        if main_proc:
            bar.set_postfix(loss=f"{out['loss']:.4g}", mse=f"{out['mse']:.3g}", reg=f"{out['reg']:.3g}",
                            gnorm=f"{out['grad_norm']:.3g}", tok_s=f"{tokens_since / elapsed:.0f}", refresh=False)
        if out["skipped"] or (stepped and (st["step"] % a["log_steps"] == 0 or st["step"] in (1, total_steps))):
            sinks.row({"step": st["step"], "loss": out["loss"], "mse": out["mse"], "reg": out["reg"],
                       "grad_norm": out["grad_norm"], "lr": scheduler.get_last_lr()[0], "skipped": out["skipped"],
                       "skipped_total": st["skipped_total"], "tokens": st["tokens"],
                       "tokens_per_s": tokens_since / elapsed, "micro_batches": len(group)})
            t0, tokens_since = time.time(), 0
        if st["consecutive_nan"] >= a["max_consecutive_nan"]:
            path = checkpoint("checkpoint-final")
            sinks.message(f"error: {st['consecutive_nan']} non-finite micro-batches in a row (--max_consecutive_nan "
                          f"{a['max_consecutive_nan']}): stopped at step {st['step']}; the last good adapters are in "
                          f"{path}")
            code = 3
            break
        if not stepped:
            continue
        if a["eval_steps"] and st["step"] % a["eval_steps"] == 0 and st["step"] != total_steps:
            last_eval = run_eval()
        if a["save_steps"] and st["step"] % a["save_steps"] == 0:
            score = last_eval["eval_loss"] if last_eval else sum(window_losses) / max(len(window_losses), 1)
            window_losses = []
            if st["best"] is None or score < st["best"]:
                st["best"] = score
                checkpoint("checkpoint-best")
            checkpoint(f"checkpoint-{st['step']}")
    bar.close()
    if nan_hook is not None:
        nan_hook.remove()
    if code == 0:
        if a["eval_steps"]:
            last_eval = run_eval()
        score = last_eval["eval_loss"] if last_eval else (sum(window_losses) / len(window_losses)
                                                          if window_losses else None)
        if score is not None and (st["best"] is None or score < st["best"]):
            st["best"] = score
            checkpoint("checkpoint-best")
        path = checkpoint("checkpoint-final")
        final = {"step": st["step"], "event": "final", "world_size": world, "skipped_total": st["skipped_total"]}
        if world > 1:  # all ranks must hold the same adapters
            flat = torch.cat([p.detach().flatten().float() for p in params]).to(device)
            gathered = accelerator.gather(flat[None])
            final["ranks_identical"] = bool(all(torch.equal(gathered[0], g) for g in gathered))
        sinks.row(final)
        sinks.message(f"done: {st['step']} steps, {st['skipped_total']} skipped micro-batches; adapters in {path}")
    sinks.plot()
    sinks.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return code


EVAL_DOCS_STREAM = 8  # documents held out at the head of a stream

if __name__ == "__main__":
    main()
