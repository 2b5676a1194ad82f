#!/usr/bin/env python
"""Safe NPT equivalence pre-training (../shared/SPEC.md section 4).

The student is the NPT model, the teacher the same model under `npt.npt_disabled` (one copy in
memory). The loss is `npt.equivalence_loss` (per-layer fit, averaged over NPT layers and real tokens,
+ lambda * regularization); `npt.optimizer_step` skips a micro-batch whose loss or gradients are not
finite without touching weights, optimizer or scheduler.

    python pretrain_npt_safe.py                       # smollm2-135m on the builtin corpus
    torchrun --nproc_per_node 2 pretrain_npt_safe.py  # DDP (gloo on CPU, nccl on GPU)

`train(TrainArgs(...))` runs in phases a test can call one by one: TrainArgs.validate, load_data,
start_processes, build_model, restore, Session.open, closed_form_start, loop, finish. Test hook: the hidden
--inject_nan_steps 3,5-7 plants NaN input embeddings in those micro-batch groups (1-based count of groups
drawn, resumed runs included), to exercise the skip logic.

References: the user's NPT_FIX_SUMMARY.md (the fixes), nanoGPT train.py (one readable loop), TRL
(typed argument dataclasses), Hugging Face Trainer (flags, checkpoint-<step> directories,
token-weighted gradient accumulation).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

import click
import torch

import npt
from npt_cli import (UserError, can_create_in, check_output_dir_or_fail, command, fail, first_line,
                     load_model_config_or_fail, load_model_or_fail, load_tokenizer_or_fail, model_options)

EVAL_DOCS_STREAM = 8  # documents held out at the head of a stream


# ----------------------------------------------------------------------------- arguments
def flag(default, help=None, **click_kwargs):
    """A TrainArgs field and its click option (help text, type) in one place."""
    return dataclasses.field(default=default, metadata={"help": help, **click_kwargs})


@dataclasses.dataclass
class TrainArgs:
    """The trainer's arguments, one field per flag (`--help` shows them); `validate()` is the one place
    bad flags are refused."""
    model_name: str = npt.EMBEDDED_MODEL  # with use_quantization, use_fp16, trust_remote_code: npt_cli.model_options
    use_quantization: bool = False
    use_fp16: bool = False
    trust_remote_code: bool = False
    adapter_rank: int | None = flag(None, "Rank r of the NPT adapters (1..d_model). [default: 256 for the exact "
                                          "target (d_model if smaller), 16 for the others]", type=click.IntRange(min=1))
    share_embeddings: bool = flag(False, "Accepted for compatibility: the teacher is always the same model "
                                         "(npt_disabled), so embeddings are always shared.")
    safe_mode: bool = flag(False, "Additive modulation only (no multiplicative branch).")
    npt_layers: str = flag("all", "Layers to convert: all, upper_half, lower_half, a range like 8-15 or a list "
                                  "like 1,3,5 (0-based).")
    kernel: str = flag("auto", "Modulated-SwiGLU backend (auto: Triton on CUDA, torch otherwise).",
                       type=click.Choice(["auto", "triton", "torch"]))
    objective: str = flag("kl", "layerwise: each NPT layer on the teacher's input and attention; "
                                       "end_to_end: the student's own trajectory; kl: the teacher's next-token "
                                       "distribution against the student's (its own trajectory).",
                          type=click.Choice(npt.OBJECTIVES))
    loss: str = flag("update", "Per-layer fit: update (|y_s - y_t|^2 / |y_t - h|^2 per token: the share of the "
                               "layer's update missed) or cosine (2 - 2 cos of whole states).",
                     type=click.Choice(npt.LOSSES))
    modulation_target: str = flag("exact", "What the attention code modulates: gate (the seed's form), down (a "
                                          "per-token rank-K update of W_down), gate+down, or exact (per-token "
                                          "patches of W_gate, W_up, W_down and the norm scale that reproduce the "
                                          "layer from a rank-r code of its attention).",
                                  type=click.Choice(npt.TARGETS))
    down_rank: int = flag(4, "K, the rank of the per-token down_proj modulation.", type=click.IntRange(min=1))
    init_batches: int = flag(32, "exact target: training micro-batches whose attention outputs give the "
                                 "closed-form start (principal directions), before the first step.",
                             type=click.IntRange(min=1))
    dataset_name: str = flag("builtin", "builtin (pydoc_data.topics), a hub dataset, or a local "
                                        ".txt/.jsonl/.json/.parquet file.")
    dataset_split: str = flag("train", "Split of a hub dataset.")
    text_column: str = flag("text", "Column holding the text.")
    streaming: bool = flag(False, "Stream the dataset instead of loading it (needs --max_steps > 0).")
    num_samples: int = flag(-1, "Use only the first N training documents (-1: all).", type=int)
    max_length: int = flag(128, "Tokens per packed sequence.", type=click.IntRange(min=2))
    batch_size: int = flag(2, "Sequences per micro-batch (per process).", type=click.IntRange(min=1))
    gradient_accumulation_steps: int = flag(2, "Micro-batches per optimizer step.", type=click.IntRange(min=1))
    learning_rate: float = flag(1e-4, "Peak learning rate (1e-4 keeps the exact target's closed-form start; the "
                                      "gate/down targets start at no effect and learn at 3e-3: see "
                                      "benchmarks/RESULTS.md).", type=click.FloatRange(min=0))
    weight_decay: float = flag(0.0, type=click.FloatRange(min=0))
    optimizer_type: str = flag("adamw", type=click.Choice(["adamw", "adam"]))
    scheduler_type: str = flag("linear", "Learning-rate schedule after warmup.",
                               type=click.Choice(["linear", "cosine", "constant"]))
    warmup_steps: int = flag(10, "Linear warmup, in optimizer steps.", type=click.IntRange(min=0))
    max_grad_norm: float = flag(0.5, "Gradient clipping norm.", type=click.FloatRange(min=0, min_open=True))
    regularization_lambda: float = flag(0.01, "Weight of the modulation regularizer.", type=click.FloatRange(min=0))
    num_epochs: float = flag(1.0, "Epochs over the data (used when --max_steps <= 0).",
                             type=click.FloatRange(min=0, min_open=True))
    max_steps: int = flag(20, "Optimizer steps to train (overrides --num_epochs; <= 0: train --num_epochs epochs).",
                          type=int)
    mixed_precision: str = flag("no", "Autocast precision (off with --use_quantization).",
                                type=click.Choice(["no", "fp16", "bf16"]))
    output_dir: str = flag("./outputs/npt-safe-pretrained")
    overwrite_output_dir: bool = flag(False, "Start a new run in an --output_dir that holds another run. Replaced: "
                                             "metrics.jsonl, loss_curve.png, equivalence.json, and that run's "
                                             "checkpoints of the names this run saves. Kept: its other checkpoints "
                                             "(never pruned or resumed) and everything this trainer did not write "
                                             "(a checkpoint-* folder is its own only if its trainer_state.json says "
                                             "so; a run is refused when such a name is in the way).")
    run_name: str | None = flag(None, "Run name for TensorBoard/wandb (default: output dir name).")
    log_steps: int = flag(5, "Log every N optimizer steps.", type=click.IntRange(min=1))
    log_file: str | None = flag(None, "Also append log lines and metrics to this file.")
    save_steps: int = flag(50, "Save checkpoint-<step> every N optimizer steps (0: only best and final).",
                           type=click.IntRange(min=0))
    save_total_limit: int | None = flag(None, "Keep at most N checkpoint-<step> directories (best and final are "
                                              "kept).", type=click.IntRange(min=1))
    eval_steps: int = flag(40, "Evaluate on held-out text every N steps, and at start and end (0: off).",
                           type=click.IntRange(min=0))
    eval_samples: int = flag(16, "Held-out sequences per evaluation.", type=click.IntRange(min=1))
    resume_from_checkpoint: str | None = flag(None, "A checkpoint directory, or 'latest' (the newest in --output_dir).")
    init_adapters: str | None = flag(None, "Start a new run from the adapters of a checkpoint directory (e.g. "
                                           "end_to_end after layerwise); optimizer and schedule start fresh.")
    seed: int = flag(42, type=int)
    max_consecutive_nan: int = flag(10, "Stop (with a final good checkpoint, non-zero exit) after this many "
                                        "non-finite micro-batches in a row.", type=click.IntRange(min=1))
    use_tensorboard: bool = flag(False, "Log to TensorBoard in OUTPUT_DIR/tensorboard.")
    use_wandb: bool = flag(False, "Log to Weights & Biases (WANDB_MODE=offline works).")
    inject_nan_steps: str = flag("", "Tests: NaN input embeddings in these micro-batch groups, e.g. 3,5-7.",
                                 hidden=True)

    def validate(self) -> "Plan":
        """Refuse bad flags (one line, exit 2) before any model or data loads or any file is written; what
        they resolve to. Reads the model's config and a checkpoint to resume, never weights."""
        wandb = self._wandb_or_fail()
        self._check_values()
        try:
            inject = parse_steps(self.inject_nan_steps)
        except ValueError:
            fail(f"--inject_nan_steps {self.inject_nan_steps!r} not understood: use e.g. 3,5-7")
        output_dir = check_output_dir_or_fail(self.output_dir)
        resume = self._resume_or_fail(output_dir)
        self._check_run_of(output_dir, resume)
        config = load_model_config_or_fail(self.model_name, self.trust_remote_code)  # refuses unconvertible models
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and self.max_length > positions:  # refused: positions past it were never trained
            fail(f"--max_length {self.max_length} exceeds the model's {positions} positions "
                 f"(max_position_embeddings): use --max_length {positions} or less")
        rank = self.adapter_rank or (min(EXACT_RANK, config.hidden_size) if self.modulation_target == "exact" else 16)
        if not 1 <= rank <= config.hidden_size:
            fail(f"--adapter_rank {rank} is out of range: it must lie in 1..{config.hidden_size} "
                 "(the model's d_model)")
        npt_config = npt.NPTConfig(rank=rank, modulation="additive" if self.safe_mode else "both",
                                   layers=self.npt_layers, modulation_target=self.modulation_target,
                                   down_rank=self.down_rank)
        try:
            layer_indices = npt_config.layer_indices(config.num_hidden_layers)
        except ValueError as e:
            fail(f"--npt_layers: {e}")
        if resume is not None:
            try:
                npt_config.check_compatible(resume.npt_config, config.num_hidden_layers,
                                            f"the adapters in checkpoint {str(resume.path)!r}")
            except ValueError as e:
                fail(f"{e}: pass the same {LAYOUT_FLAGS}")
        if self.init_adapters is not None:
            self._check_init_adapters(npt_config, config.num_hidden_layers, resume)
        if self.kernel == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            fail("--kernel triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --kernel auto")
        run_id = resume.state.run_id if resume is not None and resume.state.run_id else uuid.uuid4().hex[:12]
        return Plan(output_dir, npt_config, layer_indices, resume, inject, wandb, run_id)

    def _check_init_adapters(self, npt_config: npt.NPTConfig, num_layers: int, resume: "Resume | None") -> None:
        """--init_adapters names saved adapters of this layout (their config is read; weights load later)."""
        if resume is not None:
            fail("--init_adapters starts a new run and --resume_from_checkpoint continues one: give only one")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(self.init_adapters).expanduser()
        try:
            saved = npt.NPTConfig.from_dict(npt.read_adapter_config(path))
            npt_config.check_compatible(saved, num_layers, f"the adapters in {self.init_adapters!r}")
            weights = load_file(str(path / npt.WEIGHTS_NAME)) if (path / npt.WEIGHTS_NAME).is_file() else {}
        except (OSError, ValueError, TypeError, SafetensorError) as e:
            fail(f"--init_adapters: {first_line(e)}: give a checkpoint directory of a run with the same {LAYOUT_FLAGS}")
        bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
        if bad:
            fail(f"--init_adapters: the adapters in {self.init_adapters!r} are not finite ({bad[0]}"
                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): give a checkpoint of a run that stayed finite")

    def _check_values(self) -> None:
        """Values click's types let through: nan and inf floats, seeds numpy/torch refuse, a log folder."""
        for f in dataclasses.fields(self):
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                fail(f"--{f.name} must be a finite number, got {getattr(self, f.name)}")
        if self.learning_rate == 0:
            fail("--learning_rate must be positive")
        if not 0 <= self.seed < 2 ** 32:
            fail(f"--seed must lie in 0..{2 ** 32 - 1}, got {self.seed}")
        if self.num_samples == 0 or self.num_samples < -1:
            fail("--num_samples must be a positive number of documents, or -1 for all")
        if self.streaming and self.max_steps <= 0:
            fail("--streaming needs --max_steps > 0 (the length of a stream is unknown)")
        if self.run_name is not None and (not self.run_name.strip() or Path(self.run_name).is_absolute()
                                          or ".." in Path(self.run_name).parts):
            fail(f"--run_name {self.run_name!r} must be a name, not a path: TensorBoard writes it under "
                 "OUTPUT_DIR/tensorboard/")
        if self.log_file is not None:
            log = Path(self.log_file).expanduser().resolve()
            if log.is_dir() or not log.parent.is_dir() or not can_create_in(log.parent):
                fail(f"--log_file {self.log_file!r}: cannot write there (its folder must exist and be writable)")

    def _check_run_of(self, output_dir: Path, resume: "Resume | None") -> None:
        """Refuse to start a new run over another one's files, and to resume with changed data or optimisation
        flags (the checkpoint's trainer_state.json records the original ones)."""
        foreign = sorted(p.name for p in output_dir.glob("checkpoint-*")
                         if is_checkpoint_name(p.name) and not is_own_checkpoint(p))
        if foreign:
            fail(f"--output_dir {self.output_dir!r} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
                 f", not written by this trainer (no {STATE_NAME} of its own): the trainer would replace it; move it "
                 "away or use a new --output_dir")
        if resume is None:
            theirs = sorted(p.name for p in output_dir.glob("*") if p.name == "metrics.jsonl" or is_checkpoint(p))
            if theirs and not self.overwrite_output_dir:
                fail(f"--output_dir {self.output_dir!r} already holds another run ({', '.join(theirs[:3])}"
                     f"{', ...' if len(theirs) > 3 else ''}): use a new --output_dir, --resume_from_checkpoint, "
                     "or --overwrite_output_dir")
            return
        self._check_resume_target(output_dir, resume)
        saved = resume.saved.get("args", {})
        changed = [f"--{k} {saved[k]!r} -> {getattr(self, k)!r}" for k in RESUME_FIXED
                   if k in saved and saved[k] != getattr(self, k)]
        if changed:
            fail(f"cannot resume from {str(resume.path)!r} with changed flags ({'; '.join(changed)}): pass the "
                 "checkpoint's values, or start a new run in a new --output_dir")

    def _check_resume_target(self, output_dir: Path, resume: "Resume") -> None:
        """Resuming from a checkpoint outside --output_dir must not write into another run's files there."""
        if resume.path.expanduser().resolve().parent == output_dir:
            return
        runs = {checkpoint_run(d) for d in output_dir.glob("checkpoint-*") if is_checkpoint(d)}
        others = {r[0] for r in runs if r is not None and r[0] != resume.state.run_id}
        ours = any(r is not None and r[0] == resume.state.run_id for r in runs)
        if others or ((output_dir / "metrics.jsonl").exists() and not ours):
            fail(f"--output_dir {self.output_dir!r} holds another run than the checkpoint "
                 f"{self.resume_from_checkpoint!r}: resume into a new --output_dir or the checkpoint's own")

    def _wandb_or_fail(self):
        if not self.use_wandb:
            return None
        try:
            import wandb
        except ImportError:
            fail("--use_wandb needs the wandb package: pip install wandb (or drop --use_wandb)")
        return wandb

    def _resume_or_fail(self, output_dir: Path) -> "Resume | None":
        if not self.resume_from_checkpoint:
            return None
        if self.resume_from_checkpoint == "latest":
            try:
                path = latest_checkpoint(output_dir)
            except ValueError as e:
                fail(f"--resume_from_checkpoint latest is ambiguous in {self.output_dir!r}: {e}; name the checkpoint "
                     "directory instead")
            if path is None:
                fail(f"--resume_from_checkpoint latest: no checkpoint in {self.output_dir!r}")
        else:
            path = Path(self.resume_from_checkpoint).expanduser()
        return read_checkpoint_or_fail(path)

    def saved(self) -> dict:
        """The arguments as trainer_state.json records them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "resume_from_checkpoint"}


EXACT_RANK = 256  # the exact target's default rank: the measured choice (README, "Which modulation target")
# the flags the adapters' layout follows: a checkpoint's adapters fit only a run with the same values
LAYOUT_FLAGS = "--adapter_rank/--safe_mode/--npt_layers/--modulation_target/--down_rank"
MODEL_FLAGS = ("model_name", "use_quantization", "use_fp16", "trust_remote_code")  # from npt_cli.model_options
# changing these on resume would silently make a different run than the checkpoint's (precision flags too: refused)
RESUME_FIXED = ("model_name", "use_quantization", "use_fp16", "mixed_precision", "dataset_name", "dataset_split",
                "text_column", "streaming", "num_samples", "max_length", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "optimizer_type",
                "scheduler_type", "warmup_steps", "max_grad_norm", "regularization_lambda", "objective", "loss", "seed")


def train_options(f):
    """One click option per TrainArgs field (the model and precision flags come from npt_cli.model_options)."""
    for field in reversed(dataclasses.fields(TrainArgs)):
        if field.name in MODEL_FLAGS:
            continue
        kwargs = dict(field.metadata)
        if field.type == "bool":
            kwargs["is_flag"] = True
        else:
            kwargs.update(default=field.default, show_default=field.default is not None)
        f = click.option(f"--{field.name}", **kwargs)(f)
    return model_options(f)


def parse_steps(spec: str) -> set[int]:
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@dataclasses.dataclass
class Plan:
    """What validation established, before any work: where to write, the NPT layers, what to resume."""
    output_dir: Path
    npt_config: npt.NPTConfig
    layer_indices: list[int]
    resume: "Resume | None"
    inject: set[int]  # micro-batch groups to poison (tests)
    wandb: object | None  # the wandb module when --use_wandb
    run_id: str = ""  # the resumed run's id, or a new one: checkpoints and the output-dir lock name it


# ----------------------------------------------------------------------------- state
@dataclasses.dataclass
class TrainerState:
    """The loop's progress; round-trips through trainer_state.json (with the optimizer's param groups,
    the scheduler and the RNG states, which save_checkpoint adds beside it)."""
    step: int = 0  # optimizer steps taken
    micro_groups: int = 0  # micro-batch groups drawn (stepped or skipped)
    position: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0])  # TextStream (epoch, doc, offset)
    skipped_total: int = 0
    consecutive_nan: int = 0
    best: float | None = None  # best eval loss (or mean train loss) seen at a save
    tokens: int = 0
    run_id: str = ""  # which run wrote a checkpoint: pruning and `latest` only consider this run's
    closed_form_start: dict | None = None  # the exact target's start (npt.init_exact): what it was computed from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainerState":
        """From a trainer_state.json; missing fields keep their defaults."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, batches, objective: str = "layerwise", regularization_lambda: float = 0.01,
             autocast=contextlib.nullcontext, loss: str = "update") -> dict:
    """Held-out metrics (token-weighted over batches): the training loss; the update error of each NPT
    layer on the teacher's input (npt.update_error: 1 = the layer's update not reproduced, 0 = exact) and
    its mean over layers; teacher and student perplexity; top-1 next-token agreement."""
    tot = {"tokens": 0, "loss": 0.0, "t_nll": 0.0, "s_nll": 0.0, "agree": 0.0, "pred": 0}
    layer_sum = None
    for b in batches:
        with autocast():
            out = npt.equivalence_loss(model, b, objective, regularization_lambda, loss)
            per_layer = (out if (objective, loss) == ("layerwise", "update")
                         else npt.equivalence_loss(model, b, "layerwise", 0.0, "update")).layer_fit
            t_logits, s_logits = out.logits or (npt.run_captured(model, b, (), teacher=True, logits=True)[1],
                                                npt.run_captured(model, b, (), logits=True)[1])
        mask = b["attention_mask"]
        n = int(mask.sum())
        tot["tokens"] += n
        tot["loss"] += n * out.loss.item()
        layer_sum = per_layer * n if layer_sum is None else layer_sum + per_layer * n
        pm = (mask[:, 1:] * mask[:, :-1]).bool()  # positions whose next token is real
        targets = b["input_ids"][:, 1:][pm]
        t_lp, s_lp = t_logits[:, :-1][pm].float(), s_logits[:, :-1][pm].float()
        tot["t_nll"] += torch.nn.functional.cross_entropy(t_lp, targets, reduction="sum").item()
        tot["s_nll"] += torch.nn.functional.cross_entropy(s_lp, targets, reduction="sum").item()
        tot["agree"] += (t_lp.argmax(-1) == s_lp.argmax(-1)).sum().item()
        tot["pred"] += int(pm.sum())
    n, p = max(tot["tokens"], 1), max(tot["pred"], 1)
    per_layer = [float(v) for v in (layer_sum / n)] if layer_sum is not None else []
    return {"eval_loss": tot["loss"] / n, "eval_teacher_ppl": math.exp(min(tot["t_nll"] / p, 700)),
            "eval_student_ppl": math.exp(min(tot["s_nll"] / p, 700)), "eval_agreement": tot["agree"] / p,
            "eval_update_error": sum(per_layer) / len(per_layer) if per_layer else math.nan,  # the table's mean
            "eval_layer_update_error": per_layer}




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
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its error logs would repeat our one line
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
        fail(f"cannot load dataset {name!r} (split {split!r}): {dataset_error(e)}")
    return ds, text_column


def dataset_error(e: BaseException) -> str:
    """What was wrong with a dataset, from the error datasets raises (its generation error wraps the cause)."""
    cause = e.__cause__ or e.__context__ if type(e).__name__ == "DatasetGenerationError" else None
    if cause is None:
        return first_line(e)
    if type(cause).__name__ == "SchemaInferenceError":
        return "it holds no records (no line of text, no JSON object)"
    if type(cause).__name__ == "ArrowInvalid" and "JSON" in str(cause):
        return f"it is not JSON records: a .json holds a list of objects, a .jsonl one object per line ({first_line(cause)})"
    return first_line(cause)


def check_text_column(ds, text_column: str, name: str):
    """Refuse a dataset without the text column or without any non-empty text, or one that cannot be read
    (a stream only fails here, on its first records: bad UTF-8, a corrupt file)."""
    try:
        first = _first_text(ds, text_column, name)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (UnicodeDecodeError, ArrowInvalid, DatasetGenerationError...)
        fail(f"cannot read dataset {name!r}: {dataset_error(e)}")
    if first is None:
        fail(f"dataset {name!r} is empty (no non-empty text in column {text_column!r})")


def _first_text(ds, text_column: str, name: str) -> str | None:
    first, other = None, None
    for ex in ds:
        if text_column not in ex:
            fail(f"dataset {name!r} has no column {text_column!r} (columns: {', '.join(ex)}); "
                 f"choose one with --text_column")
        t = ex[text_column]
        if isinstance(t, str) and t.strip():
            first = t
            break
        if t is not None and not isinstance(t, str):
            other = other or type(t).__name__
    if first is None and other is not None:
        fail(f"dataset {name!r}: column {text_column!r} holds {other} values, not text; choose a text column with "
             "--text_column")
    return first


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


def save_checkpoint(output_dir: Path, name: str, model, optimizer, scheduler, state: TrainerState,
                    meta: dict | None = None) -> Path:
    """Adapters (npt format) + trainer state without pickle, written to a temp dir then renamed.
    `meta` (the arguments, the world size) is recorded beside the state."""
    final = output_dir / name
    if final.exists() and not is_own_checkpoint(final):  # appeared during the run: a user's, never replaced
        fail(f"cannot save {final}: a folder or file of that name that this trainer did not write is in the way")
    tmp = output_dir / own_name("tmp", state.run_id, name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, model, optimizer, scheduler, state, meta)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written folder left behind
        if is_disk_full(e):
            raise DiskFull(f"no space left on the device to save {final} (a checkpoint needs about "
                           f"{checkpoint_bytes(model, optimizer) / 1e6:.2f} MB, {shutil.disk_usage(output_dir).free / 1e6:.2f}"
                           f" MB are free): the previous checkpoints are intact; free space and resume") from None
        raise
    if final.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
        old = output_dir / own_name("old", state.run_id, name)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


class DiskFull(Exception):
    """The device filled up while saving: one line, exit code 4 (EXIT_DISK_FULL)."""


EXIT_DISK_FULL = 4  # 2: bad input, 3: too many non-finite micro-batches


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as safetensors' own error (which wraps the OS error in its text)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    code = re.search(r"(?:os error|code:) (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return code is not None and int(code.group(1)) in (errno.ENOSPC, errno.EDQUOT)


def checkpoint_bytes(model, optimizer) -> int:
    """About what a checkpoint takes on disk: the fp32 adapters and optimizer state, RNG and state files."""
    params = sum(p.numel() * 4 for p in npt.get_adapter_params(model))
    opt = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
              if isinstance(v, torch.Tensor))
    return params + opt + 64_000


def _write_checkpoint(tmp: Path, model, optimizer, scheduler, state: TrainerState, meta: dict | None) -> None:
    """The checkpoint's files in `tmp`, synced to disk."""
    from safetensors.torch import save_file

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
    full = {"writer": STATE_WRITER, **state.to_dict(), **(meta or {}), "optimizer_param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict(), "python_rng": [py[0], list(py[1]), py[2]]}
    (tmp / STATE_NAME).write_text(json.dumps(_json_safe(full), indent=1) + "\n")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def own_name(kind: str, run_id: str, name: str) -> str:
    """A temp name the trainer recognises as its own run's (tmp: being written, old: being replaced,
    del: being deleted); a user's .tmp-* or .old-* folders are never touched."""
    return f".npt-{kind}-{run_id}-{name}"


def is_checkpoint_name(name: str) -> bool:
    return bool(CKPT_RE.match(name)) or name in ("checkpoint-best", "checkpoint-final")


def is_checkpoint(d: Path) -> bool:
    return d.is_dir() and is_checkpoint_name(d.name)


STATE_WRITER = "pretrain_npt_safe.py"  # trainer_state.json's "writer": what marks a folder as this trainer's


def is_own_checkpoint(d: Path) -> bool:
    """A checkpoint this trainer wrote (its trainer_state.json says so); a user's folder or file of that name
    is never replaced or deleted."""
    try:
        saved = json.loads((d / STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return is_checkpoint(d) and isinstance(saved, dict) and saved.get("writer") == STATE_WRITER


def checkpoint_run(d: Path) -> tuple[str, int] | None:
    """(run id, step) a checkpoint's trainer_state.json records; None when unreadable."""
    try:
        saved = json.loads((d / STATE_NAME).read_text())
        return str(saved.get("run_id", "")), int(saved["step"])
    except (ValueError, KeyError, TypeError, OSError, AttributeError):
        return None


def tidy_output_dir(output_dir: Path, run_id: str):
    """Remove this run's half-written temp dirs (a killed run resumed); put back a checkpoint caught
    mid-replacement."""
    for d in output_dir.glob(own_name("old", run_id, "*")):
        name = d.name[len(own_name("old", run_id, "")):]
        if not (output_dir / name).exists():
            os.rename(d, output_dir / name)
        else:
            shutil.rmtree(d, ignore_errors=True)
    for kind in ("tmp", "del"):
        for d in output_dir.glob(own_name(kind, run_id, "*")):
            shutil.rmtree(d, ignore_errors=True)


def prune_checkpoints(output_dir: Path, limit: int | None, run_id: str):
    """Keep this run's newest `limit` checkpoint-<step> directories; another run's are never touched."""
    if not limit:
        return
    steps = sorted(int(m.group(1)) for d in output_dir.iterdir()
                   if (m := CKPT_RE.match(d.name)) and (checkpoint_run(d) or ("",))[0] == run_id)
    for s in steps[:-limit]:
        remove_checkpoint(output_dir / f"checkpoint-{s}", run_id)


def remove_checkpoint(d: Path, run_id: str) -> None:
    """Delete one of this run's checkpoints: renamed first (atomic: never half-deleted under its real name)."""
    gone = d.parent / own_name("del", run_id, d.name)
    os.rename(d, gone)
    shutil.rmtree(gone, ignore_errors=True)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step (checkpoint-<step> or checkpoint-final); a ValueError when the
    directory holds checkpoints of several runs (which one is meant is then the user's call)."""
    found = {}
    for d in output_dir.iterdir() if output_dir.is_dir() else ():
        if (CKPT_RE.match(d.name) or d.name == "checkpoint-final") and (run := checkpoint_run(d)) is not None:
            found[d] = run
    if len({run_id for run_id, _ in found.values()}) > 1:
        raise ValueError(f"{len({r for r, _ in found.values()})} runs wrote checkpoints there")
    # the highest step; on a tie checkpoint-<step> (equal adapters, and its name says the step)
    return max(found, key=lambda d: (found[d][1], d.name != "checkpoint-final"), default=None)


@dataclasses.dataclass
class Resume:
    """A checkpoint to resume from, read and checked before anything else loads."""
    path: Path
    state: TrainerState
    saved: dict  # the whole trainer_state.json: optimizer param groups, scheduler, Python RNG
    npt_config: npt.NPTConfig


def read_checkpoint_or_fail(path: Path) -> Resume:
    """Validate a checkpoint before anything is loaded: trainer state, optimizer and adapter files readable."""
    from safetensors.torch import load_file

    if not path.is_dir():
        fail(f"checkpoint {str(path)!r} not found")
    try:
        saved = json.loads((path / STATE_NAME).read_text())
        config = npt.NPTConfig.from_dict(npt.read_adapter_config(path))
        for f in (npt.WEIGHTS_NAME, OPTIM_NAME, RNG_NAME):
            load_file(str(path / f))
    except FileNotFoundError as e:
        fail(f"checkpoint {str(path)!r} is incomplete: {Path(e.filename).name if e.filename else e} is missing")
    except Exception as e:
        fail(f"checkpoint {str(path)!r} is corrupt: {first_line(e)}")
    problem = state_problem(saved)
    if problem:
        fail(f"checkpoint {str(path)!r} is corrupt: {STATE_NAME} {problem}")
    return Resume(path, TrainerState.from_dict(saved), saved, config)


# what trainer_state.json must hold, and of which type, for a resume to be possible
STATE_TYPES = {"step": int, "micro_groups": int, "skipped_total": int, "consecutive_nan": int, "position": list,
               "optimizer_param_groups": list, "scheduler": dict, "python_rng": list}


def state_problem(saved) -> str | None:
    """What is wrong with a trainer_state.json's content (missing keys, wrong types, values out of range), or
    None: every value a resume feeds into training is checked here, before the model loads."""
    if not isinstance(saved, dict):
        return "is not a JSON object"
    missing = [k for k in STATE_TYPES if k not in saved]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [k for k, t in STATE_TYPES.items() if not isinstance(saved[k], t) or isinstance(saved[k], bool)]
    wrong += [k for k in ("tokens", "micro_groups", "skipped_total", "consecutive_nan") if k in saved
              and not _is_int(saved[k])]
    wrong += [k for k, t in (("run_id", str), ("args", dict)) if not isinstance(saved.get(k, t()), t)]
    if saved.get("best") is not None and not _finite(saved["best"]):
        wrong.append("best")
    if not isinstance(saved.get("closed_form_start") or {}, dict):
        wrong.append("closed_form_start")
    if wrong:
        return f"has the wrong type for {', '.join(sorted(set(wrong)))}"
    if saved["step"] < 0 or len(saved["position"]) != 3 or not all(
            _is_int(v) and v >= 0 for v in saved["position"]):
        return "has a negative step or a position that is not 3 non-negative integers"
    rng = saved["python_rng"]
    if len(rng) != 3 or not _is_int(rng[0]) or not isinstance(rng[1], list) or not all(
            _is_int(v) for v in rng[1]) or not (rng[2] is None or _finite(rng[2])):
        return "has a malformed python_rng"
    return optimizer_state_problem(saved["optimizer_param_groups"]) or scheduler_state_problem(saved["scheduler"])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def optimizer_state_problem(groups: list) -> str | None:
    """The optimizer's param groups: one group of adapter parameters, its hyper-parameters finite and in range."""
    if len(groups) != 1 or not isinstance(groups[0], dict) or not isinstance(groups[0].get("params"), list):
        return "optimizer_param_groups must be one group with its params"
    g = groups[0]
    checks = {"lr": lambda v: _finite(v) and v >= 0, "initial_lr": lambda v: _finite(v) and v > 0,
              "eps": lambda v: _finite(v) and v > 0, "weight_decay": lambda v: _finite(v) and v >= 0,
              "maximize": lambda v: v is False, "amsgrad": lambda v: isinstance(v, bool),
              "betas": lambda v: isinstance(v, list) and len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v)}
    bad = [k for k, ok in checks.items() if k in g and not ok(g[k])]
    if "lr" not in g or "betas" not in g or bad:
        return (f"optimizer_param_groups: {', '.join(bad or ['lr/betas'])} out of range or of the wrong type "
                f"({', '.join(f'{k}={g.get(k)!r}' for k in bad or ['lr', 'betas'])}; lr >= 0, initial_lr > 0, betas "
                "a pair in [0, 1))")
    return None


def scheduler_state_problem(sched: dict) -> str | None:
    """The learning-rate schedule: its step an integer >= 0, its base rates positive and finite."""
    lrs = sched.get("base_lrs")
    if not _is_int(sched.get("last_epoch")) or sched["last_epoch"] < 0:
        return f"scheduler.last_epoch must be an integer >= 0, got {sched.get('last_epoch')!r}"
    if not isinstance(lrs, list) or len(lrs) != 1 or not all(_finite(v) and v > 0 for v in lrs):
        return f"scheduler.base_lrs must be one positive finite rate, got {lrs!r}"
    if not all(_finite(v) and v >= 0 for v in sched.get("_last_lr", [0.0])) or not _is_int(
            sched.get("_step_count", 0)):
        return "scheduler._last_lr or _step_count is malformed"
    return None


def restore_checkpoint(resume: Resume, model, optimizer, scheduler) -> None:
    """Adapters, optimizer, scheduler and RNG states as the checkpoint holds them."""
    from safetensors.torch import load_file

    npt.load_adapters(model, resume.path)
    params = npt.get_adapter_params(model)
    tensors = load_file(str(resume.path / OPTIM_NAME))
    opt_state = {}
    for key, v in tensors.items():
        pid, _, name = key.partition(".")
        if not pid.isdigit() or int(pid) >= len(params):
            raise ValueError(f"optimizer state {key!r} names no adapter parameter (there are {len(params)})")
        if v.numel() != 1 and v.shape != params[int(pid)].shape:
            raise ValueError(f"optimizer state {key!r} has shape {tuple(v.shape)}, its parameter "
                             f"{tuple(params[int(pid)].shape)}")
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": resume.saved["optimizer_param_groups"]})
    scheduler.load_state_dict(resume.saved["scheduler"])
    rng = load_file(str(resume.path / RNG_NAME))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if not npt.weights_finite(params, optimizer):
        raise ValueError("its adapters or optimizer state are not finite (a diverged run): resume from an earlier "
                         "checkpoint")
    py = resume.saved["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ----------------------------------------------------------------------------- logging sinks
def read_rows(metrics: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut off by a crash mid-write (the last one) is dropped, not fatal."""
    rows = []
    for line in metrics.read_text(errors="replace").splitlines() if metrics.exists() else ():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


class Sinks:
    """metrics.jsonl, log file, loss-curve PNG, TensorBoard, wandb; only the main process writes."""

    def __init__(self, output_dir: Path, main: bool, log_file, tensorboard: bool, wandb_mod, run_name, config,
                 resume_step: int | None, layers: list[int] | None = None):
        self.dir, self.main, self.layers = output_dir, main, layers
        self.metrics = output_dir / "metrics.jsonl"
        self.log_file = Path(log_file) if log_file else None
        self.tb = self.wandb = None
        if not main:
            return
        if resume_step is not None and self.metrics.exists():  # drop rows the resumed run will write again
            keep = [r for r in read_rows(self.metrics) if r.get("step", 0) <= resume_step]
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))
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
        self.log(text)

    def log(self, text: str):
        """A line in --log_file only."""
        if self.main and self.log_file:
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
            for i, v in zip(self.layers or itertools.count(), row.get("eval_layer_update_error") or []):
                self.tb.add_scalar(f"eval/layer_update_error/{i}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def plot(self):
        if not self.main or not self.metrics.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = read_rows(self.metrics)
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "eval_loss" not in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        layer_evals = [r for r in rows if r.get("eval_layer_update_error")]
        fig, axes = plt.subplots(1, 2 if layer_evals else 1, figsize=(12 if layer_evals else 7, 4), squeeze=False)
        ax = axes[0, 0]
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per-layer fit + lambda * reg)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("NPT equivalence pre-training")
        if layer_evals:  # the equivalence report: each layer's held-out update error at start and end
            ax = axes[0, 1]
            for row in {id(r): r for r in (layer_evals[0], layer_evals[-1])}.values():
                ax.plot(self.layers or range(len(row["eval_layer_update_error"])), row["eval_layer_update_error"],
                        "o-", ms=3, label=f"step {row['step']}: student ppl {row['eval_student_ppl']:.3g} (teacher "
                        f"{row['eval_teacher_ppl']:.3g}), agreement {row['eval_agreement']:.2f}")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_xlabel("NPT layer")
            ax.set_ylabel("held-out update error (1 = not reproduced)")
            ax.legend(fontsize=8)
            ax.set_title("equivalence per layer (eval)")
        fig.tight_layout()
        tmp = self.dir / ".loss_curve.png.tmp"
        try:
            fig.savefig(tmp, format="png")
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: no half-written file left
            raise
        finally:
            plt.close(fig)
        os.replace(tmp, self.dir / "loss_curve.png")

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()



# ----------------------------------------------------------------------------- phases
@dataclasses.dataclass
class Data:
    """Training text and held-out windows, checked before the model loads."""
    stream: TextStream
    eval_windows: list[list[int]]
    pad_id: int
    windows_per_epoch: int | None  # counted only when --num_epochs sets the length (--max_steps <= 0)


def load_data(args: TrainArgs) -> Data:
    """The tokenizer, the dataset split into training documents and held-out text, as token windows."""
    tokenizer = load_tokenizer_or_fail(args.model_name, args.trust_remote_code)
    ds, text_column = load_text_dataset(args.dataset_name, args.dataset_split, args.streaming, args.text_column)
    check_text_column(ds, text_column, args.dataset_name)
    train_ds, eval_ds = split_held_out(ds, text_column, args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    stream = TextStream(train_ds, text_column, tokenizer, args.max_length, args.seed, shuffle=not args.streaming,
                        epochs=None if args.max_steps > 0 else math.ceil(args.num_epochs))  # max_steps: cycle
    eval_windows = []
    if args.eval_steps:
        held_out = TextStream(eval_ds, text_column, tokenizer, args.max_length, args.seed, False, epochs=1)
        eval_windows = list(itertools.islice((w for w, _ in held_out.windows()), args.eval_samples))
        if not eval_windows:
            fail(f"dataset {args.dataset_name!r} has no held-out text to evaluate on: use --eval_steps 0")
    n_windows = None
    if args.max_steps <= 0:
        n_windows = count_windows(stream)
        if n_windows == 0:
            fail(f"dataset {args.dataset_name!r} yields no sequence of at least 2 tokens")
    return Data(stream, eval_windows, pad_id, n_windows)


def split_held_out(ds, text_column: str, args: TrainArgs):
    """(training documents, held-out documents): the head of a stream, or the tail of a dataset."""
    if args.streaming:
        eval_ds, train_ds = ds.take(EVAL_DOCS_STREAM), ds.skip(EVAL_DOCS_STREAM)
        if args.num_samples > 0:
            train_ds = train_ds.take(args.num_samples)
        if next(iter(train_ds), None) is None:
            fail(f"dataset {args.dataset_name!r} has too little text: nothing left after holding out "
                 f"{EVAL_DOCS_STREAM} documents for eval")
        return train_ds, eval_ds
    ds = ds.filter(lambda ex: isinstance(ex[text_column], str) and bool(ex[text_column].strip()))
    n_eval = max(1, min(len(ds) // 50, 64)) if len(ds) >= 2 else 0
    if n_eval == 0 and args.eval_steps:
        fail(f"dataset {args.dataset_name!r} has {len(ds)} document: evaluation holds documents out, so give at "
             "least 2, or use --eval_steps 0")
    # lists, not ranges: datasets refuses an empty range that starts at len(ds)
    eval_ds, train_ds = ds.select(list(range(len(ds) - n_eval, len(ds)))), ds.select(list(range(len(ds) - n_eval)))
    if args.num_samples > 0:
        train_ds = train_ds.select(range(min(args.num_samples, len(train_ds))))
    if len(train_ds) == 0:
        fail(f"dataset {args.dataset_name!r} has too little text: nothing left after holding out eval text")
    return train_ds, eval_ds


@dataclasses.dataclass
class Processes:
    """This process among the others (accelerate / torchrun), and its precision."""
    accelerator: object
    world: int
    rank: int
    main: bool
    device: torch.device
    autocast: object  # a context-manager factory: torch.autocast for --mixed_precision, else nullcontext
    reduce: object  # sums a tensor over processes; None in a single process


def start_processes(args: TrainArgs) -> Processes:
    from accelerate import Accelerator

    mixed = args.mixed_precision
    if args.use_quantization and mixed != "no":
        warnings.warn(f"--mixed_precision {mixed} is turned off with --use_quantization (4-bit computes in FP32)",
                      stacklevel=1)
        mixed = "no"
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, device = accelerator.num_processes, accelerator.device
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one thread per physical core (os.cpu_count() counts hyperthreads); oversubscribed OpenMP
        # threads spin against each other and were measured 10x slower on a busy 2-core machine
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2 // world))
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype
                else contextlib.nullcontext)
    reduce = (lambda t: accelerator.reduce(t.to(device), reduction="sum").cpu()) if world > 1 else None
    return Processes(accelerator, world, accelerator.process_index, accelerator.is_main_process, device,
                     autocast, reduce)


def count_steps(args: TrainArgs, data: Data, world: int) -> int:
    """Optimizer steps of the run: --max_steps, or --num_epochs over the data."""
    per_step = args.batch_size * world * args.gradient_accumulation_steps
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_epochs * data.windows_per_epoch
                                                                          / per_step))
    if args.warmup_steps > total:  # warned, not refused: a short trial run with the default warmup is legitimate
        warnings.warn(f"--warmup_steps {args.warmup_steps} is longer than the run ({total} steps): the learning rate "
                      f"peaks at {total / args.warmup_steps:.0%} of --learning_rate", stacklevel=1)
    return total


def build_model(args: TrainArgs, plan: Plan, procs: Processes, total_steps: int):
    """(model, optimizer, scheduler): the only copy of the model (the teacher is npt_disabled), converted."""
    from transformers import get_scheduler

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, _ = load_model_or_fail(args.model_name, args.use_quantization, args.use_fp16,
                                  trust_remote_code=args.trust_remote_code,
                                  **({"device": procs.device} if procs.device.type == "cuda" else {}))
    torch.manual_seed(args.seed)  # the same adapter init on every rank and every run
    try:
        npt.convert_to_npt(model, plan.npt_config)
    except ValueError as e:  # not Llama-shaped: found only once the modules exist
        fail(f"model {args.model_name!r} cannot be converted to NPT: {first_line(e)}")
    if args.init_adapters is not None:
        try:
            npt.load_adapters(model, Path(args.init_adapters).expanduser())
        except (OSError, ValueError) as e:
            fail(f"--init_adapters: {first_line(e)}")
    npt.set_kernel(model, args.kernel)
    model.eval()  # no dropout: teacher and student must be deterministic
    params = npt.get_adapter_params(model)
    if procs.world > 1:  # every rank starts from rank 0's adapters (DDP's broadcast)
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
    opt_cls = torch.optim.AdamW if args.optimizer_type == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[args.scheduler_type]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)
    return model, optimizer, scheduler


def restore(plan: Plan, model, optimizer, scheduler) -> TrainerState:
    """A fresh state, or the checkpoint's (its adapters, optimizer, scheduler and RNG loaded)."""
    if plan.resume is None:
        return TrainerState(run_id=plan.run_id)
    try:
        restore_checkpoint(plan.resume, model, optimizer, scheduler)
    except (ValueError, TypeError, KeyError) as e:
        fail(f"cannot resume from {str(plan.resume.path)!r}: {e}")
    plan.resume.state.run_id = plan.run_id  # a checkpoint written before run ids: this run adopts it
    return plan.resume.state


def describe_target(c: npt.NPTConfig) -> str:
    """What the attention code modulates, in words for the start line."""
    if c.exact:
        return "exact target (per-token patches from a rank-r code of the attention)"
    parts = [f"{c.modulation_target} target"]
    if c.additive or c.multiplicative:
        parts.append(f"{c.modulation} gate modulation")
    if c.down:
        parts.append(f"down_rank {c.down_rank}")
    return ", ".join(parts)


def closed_form_start(s: "Session") -> str | None:
    """The exact target's start (npt.init_exact) from the first --init_batches x --batch_size x processes windows of
    the training data, for a new run that does not start from saved adapters; a line saying what it did. Each
    process gathers the attention moments of its share of the windows; their sums are reduced over processes, so
    every process sets the same adapters, whatever the number of processes."""
    args, procs, model, state = s.args, s.procs, s.model, s.state
    if not model.npt_config.exact or state.step or state.closed_form_start or args.init_adapters is not None:
        return None
    from tqdm.auto import tqdm

    per = args.batch_size
    windows = [w for w, _ in itertools.islice(s.data.stream.windows((0, 0, 0)), args.init_batches * per * procs.world)]
    mine = windows[procs.rank::procs.world]
    batches = [s._micro_batch(mine[i:i + per]) for i in range(0, len(mine), per)]
    t0 = time.time()
    with procs.autocast():
        stats = npt.teacher_attention_moments(model, tqdm(batches, desc="closed-form start", disable=not procs.main,
                                                          dynamic_ncols=True, leave=False))
    if procs.reduce is not None:
        order = sorted(stats)
        flat = procs.reduce(torch.cat([t.flatten() for i in order for t in stats[i]]))
        parts = iter(flat.double().split([t.numel() for i in order for t in stats[i]]))
        stats = {i: tuple(next(parts).view_as(t) for t in stats[i]) for i in order}
    kept = npt.init_exact(model, moments=stats)
    tokens = int(next(iter(stats.values()))[0])
    state.closed_form_start = {"method": "principal directions", "windows": len(windows), "tokens": tokens}
    share = sum(kept.values()) / len(kept)
    return (f"closed-form start: principal directions of each NPT layer's attention output over {tokens} tokens "
            f"({len(windows)} windows, {time.time() - t0:.1f} s); the rank-{model.npt_config.rank} code keeps "
            f"{100 * share:.1f}% of its variance (mean over layers, lowest {100 * min(kept.values()):.1f}%)")


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Session:
    """What the loop works with, and what it does besides the optimizer step: log, evaluate, save."""
    args: TrainArgs
    plan: Plan
    data: Data
    procs: Processes
    model: object
    optimizer: object
    scheduler: object
    state: TrainerState
    total_steps: int
    sinks: Sinks = None
    eval_batches: list = dataclasses.field(default_factory=list)
    last_eval: dict | None = None
    window_losses: list[float] = dataclasses.field(default_factory=list)  # train losses since the last save
    bar: object = None
    t0: float = 0.0  # start of the current tokens/s window
    tokens_since: int = 0
    last_step: npt.StepResult | None = None  # the last step taken (it can still be undone)

    def open(self) -> "Session":
        """Output dir, sinks, held-out batches; the start line."""
        args, procs, state, resume = self.args, self.procs, self.state, self.plan.resume
        if procs.main:
            self.plan.output_dir.mkdir(parents=True, exist_ok=True)
            tidy_output_dir(self.plan.output_dir, state.run_id)
        procs.accelerator.wait_for_everyone()
        self.sinks = Sinks(self.plan.output_dir, procs.main, args.log_file, args.use_tensorboard, self.plan.wandb,
                           args.run_name or self.plan.output_dir.name, dataclasses.asdict(args),
                           state.step if resume is not None else None, self.plan.layer_indices)
        per_step = args.batch_size * procs.world * args.gradient_accumulation_steps
        self.sinks.message(
            f"NPT pre-training: {args.model_name}, {len(self.plan.layer_indices)} NPT layers, "
            f"rank {self.plan.npt_config.rank}, "
            f"{describe_target(self.plan.npt_config)}, {args.objective} objective, {args.loss} loss, "
            f"{self.total_steps} steps of "
            f"{per_step} x {args.max_length} tokens, {procs.world} process(es)"
            + (f", resumed at step {state.step} from {resume.path}" if resume is not None else ""))
        windows = self.data.eval_windows
        self.eval_batches = [{k: v.to(procs.device) for k, v in collate(windows[i:i + args.batch_size],
                                                                        self.data.pad_id).items()}
                             for i in range(0, len(windows), args.batch_size)]
        return self

    def next_group(self, windows) -> tuple[list[dict], bool]:
        """This process's next gradient_accumulation_steps micro-batches (fewer where the data ends), and
        whether it ended."""
        args, group, exhausted = self.args, [], False
        while len(group) < args.gradient_accumulation_steps and not exhausted:
            seqs = []
            while len(seqs) < args.batch_size * self.procs.world:
                nxt = next(windows, None)
                if nxt is None:
                    exhausted = True
                    break
                seqs.append(nxt[0])
                self.state.position = list(nxt[1])
            if seqs:
                mine = seqs[self.procs.rank * args.batch_size:(self.procs.rank + 1) * args.batch_size]
                group.append(self._micro_batch(mine))
        return group, exhausted

    def _micro_batch(self, windows) -> dict:
        device = self.procs.device
        if not windows:  # an empty shard (the tail of a stream under DDP)
            return {k: torch.zeros((0, 1), dtype=torch.long, device=device) for k in ("input_ids", "attention_mask")}
        return {k: v.to(device) for k, v in collate(windows, self.data.pad_id).items()}

    def step(self, group: list[dict]) -> npt.StepResult:
        """One optimizer step over the group (NaN embeddings in the groups --inject_nan_steps names)."""
        self.state.micro_groups += 1
        args, procs = self.args, self.procs
        poisoned = self.state.micro_groups in self.plan.inject
        with npt.nan_embeddings(self.model) if poisoned else contextlib.nullcontext():
            return npt.optimizer_step(self.model, self.optimizer, self.scheduler, group, args.max_grad_norm,
                                      args.objective, args.regularization_lambda, procs.autocast, procs.reduce,
                                      args.loss)

    def record(self, out: npt.StepResult, micro_batches: int) -> None:
        """Count tokens and skips, advance the step and the bar, log the row."""
        st = self.state
        self.tokens_since += out.tokens
        st.tokens += out.tokens
        st.skipped_total += out.skipped
        for i in out.bad:
            self.sinks.message(f"skipped micro-batch {i + 1}/{micro_batches} of group {st.micro_groups} at step "
                               f"{st.step}: {out.reasons.get(i, 'non-finite loss or gradient')}")
        for i in range(micro_batches):  # consecutive non-finite micro-batches, in order
            st.consecutive_nan = st.consecutive_nan + 1 if i in out.bad else 0
        if out.stepped:
            st.step += 1
            self.last_step = out
            self.bar.update(1)
            self.window_losses.append(out.loss)
        rate = self.tokens_since / max(time.time() - self.t0, 1e-9)
        if self.procs.main:
            self.bar.set_postfix(loss=f"{out.loss:.4g}", mse=f"{out.fit:.3g}", reg=f"{out.reg:.3g}",
                                 gnorm=f"{out.grad_norm:.3g}", tok_s=f"{rate:.0f}", refresh=False)
        if out.skipped or (out.stepped and (st.step % self.args.log_steps == 0 or st.step in (1, self.total_steps))):
            self.sinks.row({"step": st.step, "loss": out.loss, "mse": out.fit, "reg": out.reg,
                            "grad_norm": out.grad_norm, "lr": self.scheduler.get_last_lr()[0], "skipped": out.skipped,
                            "skipped_total": st.skipped_total, "tokens": st.tokens, "tokens_per_s": rate,
                            "micro_batches": micro_batches})
            self.t0, self.tokens_since = time.time(), 0

    def evaluate(self) -> None:
        m = evaluate(self.model, self.eval_batches, self.args.objective, self.args.regularization_lambda,
                     self.procs.autocast, self.args.loss)
        self.sinks.row({"step": self.state.step, **m})
        self.sinks.message(f"eval @ step {self.state.step}: update error {m['eval_update_error']:.4g}, teacher ppl "
                           f"{m['eval_teacher_ppl']:.3g}, student ppl {m['eval_student_ppl']:.3g}, "
                           f"agreement {m['eval_agreement']:.3f}")
        self.last_eval = m

    def after_step(self) -> None:
        """Evaluate and save on their schedules."""
        args, step = self.args, self.state.step
        if args.eval_steps and step % args.eval_steps == 0 and step != self.total_steps:
            self.evaluate()
        if args.save_steps and step % args.save_steps == 0:
            self.save_if_best()
            self.checkpoint(f"checkpoint-{step}")

    def save_if_best(self) -> None:
        """checkpoint-best when the last eval loss (or the mean train loss since the last save) is the best yet."""
        losses, self.window_losses = self.window_losses, []
        score = self.last_eval["eval_loss"] if self.last_eval else (sum(losses) / len(losses) if losses else None)
        if score is not None and (self.state.best is None or score < self.state.best):
            self.state.best = score
            self.checkpoint("checkpoint-best")

    def undo_poisoned_step(self, group: list[dict]) -> int | None:
        """At an abort. A step can leave finite adapters whose every forward is non-finite (the weights check
        passes, then each micro-batch fails): if a held-out batch is non-finite under the last step's adapters,
        that step is undone, and checkpoints saved of it are removed. The adapters before it are the last
        that gave a finite loss (that step's own). Returns the undone step, or None."""
        last, st = self.last_step, self.state
        probe = next((b for b in [*self.eval_batches, *group] if b["attention_mask"].sum() > 0), None)
        if last is None or last.previous is None or probe is None:
            return None
        with torch.no_grad(), self.procs.autocast():
            value = npt.equivalence_loss(self.model, probe, self.args.objective, self.args.regularization_lambda,
                                         self.args.loss).loss
        bad = torch.tensor([0.0 if bool(torch.isfinite(value)) else 1.0])
        if self.procs.reduce is not None:  # every rank undoes, or none
            bad = self.procs.reduce(bad)
        if not bad.item():
            return None
        npt.undo_step(self.model, self.optimizer, self.scheduler, last)
        self.last_step, undone = None, st.step
        st.step -= 1
        if self.procs.main:
            for d in (self.plan.output_dir / f"checkpoint-{undone}", self.plan.output_dir / "checkpoint-best"):
                if d.is_dir() and checkpoint_run(d) == (st.run_id, undone):
                    remove_checkpoint(d, st.run_id)
        return undone

    def checkpoint(self, name: str) -> Path:
        output_dir = self.plan.output_dir
        if self.procs.main:
            meta = {"args": self.args.saved(), "world_size": self.procs.world}
            path = save_checkpoint(output_dir, name, self.model, self.optimizer, self.scheduler, self.state, meta)
            if CKPT_RE.match(name):
                prune_checkpoints(output_dir, self.args.save_total_limit, self.state.run_id)
            self.sinks.plot()
            return path
        return output_dir / name


# ----------------------------------------------------------------------------- the equivalence report
def equivalence_report(metrics: Path, layers: list[int]) -> dict | None:
    """Start and end of the run's held-out evaluation (the first and last eval rows of metrics.jsonl, so a
    resumed run still reports from step 0); None when nothing was evaluated."""
    rows = read_rows(metrics)
    evals = [r for r in rows if r.get("eval_layer_update_error")]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    return {"layers": layers, "step_start": first["step"], "step_final": last["step"],
            "update_error_start": first["eval_layer_update_error"], "update_error_final": last["eval_layer_update_error"],
            "teacher_ppl": last["eval_teacher_ppl"], "student_ppl_start": first["eval_student_ppl"],
            "student_ppl_final": last["eval_student_ppl"], "agreement_start": first["eval_agreement"],
            "agreement_final": last["eval_agreement"]}


def render_equivalence(r: dict) -> str:
    """The report as a table: per layer update error start -> end (1 = the layer's update not reproduced,
    0 = exact), then perplexity and top-1 agreement against the teacher."""
    head = f"step {r['step_start']} -> {r['step_final']}"
    lines = ["equivalence (held-out): update error per NPT layer, 1 = update not reproduced, 0 = exact",
             f"  {'layer':>5}  {head:>22}"]
    start, final = r["update_error_start"], r["update_error_final"]
    lines += [f"  {i:>5}  {a:>10.4f} -> {b:<10.4f}" for i, a, b in zip(r["layers"], start, final)]
    lines.append(f"  {'mean':>5}  {sum(start) / len(start):>10.4f} -> {sum(final) / len(final):<10.4f}")
    lines.append(f"  perplexity: teacher {r['teacher_ppl']:.4g}, student {r['student_ppl_start']:.4g} -> "
                 f"{r['student_ppl_final']:.4g};  top-1 agreement {r['agreement_start']:.3f} -> {r['agreement_final']:.3f}")
    return "\n".join(lines)


def write_equivalence(s: Session) -> None:
    """OUTPUT_DIR/equivalence.json and the printed table, at the end of a run that evaluated."""
    report = equivalence_report(s.sinks.metrics, s.plan.layer_indices)
    if report is None or not s.procs.main:
        return
    tmp = s.plan.output_dir / ".equivalence.json.tmp"
    tmp.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    os.replace(tmp, s.plan.output_dir / "equivalence.json")
    s.sinks.message(render_equivalence(report))


def loop(s: Session) -> int:
    """Optimizer steps until the last one or the end of the data: 0, or 3 after --max_consecutive_nan
    non-finite micro-batches in a row (with the last good adapters saved)."""
    from tqdm.auto import tqdm

    args, st = s.args, s.state
    windows = s.data.stream.windows(tuple(st.position))
    s.bar = tqdm(total=s.total_steps, initial=st.step, disable=not s.procs.main, desc="npt", dynamic_ncols=True)
    if args.eval_steps and st.step == 0:
        s.evaluate()
    exhausted, s.t0 = False, time.time()
    while st.step < s.total_steps and not exhausted:
        group, exhausted = s.next_group(windows)
        if not group:
            break
        out = s.step(group)
        s.record(out, len(group))
        if st.consecutive_nan >= args.max_consecutive_nan:
            undone = s.undo_poisoned_step(group)
            path = s.checkpoint("checkpoint-final")
            why = (f"step {undone} left finite adapters whose forward is non-finite and was undone" if undone
                   else "a step that made them non-finite was undone")
            s.sinks.message(f"error: {st.consecutive_nan} non-finite micro-batches in a row (--max_consecutive_nan "
                            f"{args.max_consecutive_nan}): stopped; {path} holds the adapters of step {st.step}, the "
                            f"last step whose weights stayed finite ({why})")
            return 3
        if out.stepped:
            s.after_step()
    return 0


def finish(s: Session, code: int) -> None:
    """After a complete run: the last eval, checkpoint-best/-final, the final row. Always: close the sinks."""
    s.bar.close()
    if code == 0:
        if s.args.eval_steps:
            s.evaluate()
        s.save_if_best()
        path = s.checkpoint("checkpoint-final")
        final = {"step": s.state.step, "event": "final", "world_size": s.procs.world,
                 "skipped_total": s.state.skipped_total}
        if s.procs.world > 1:  # all ranks must hold the same adapters
            flat = torch.cat([p.detach().flatten().float() for p in npt.get_adapter_params(s.model)]).to(s.procs.device)
            gathered = s.procs.accelerator.gather(flat[None])
            final["ranks_identical"] = bool(all(torch.equal(gathered[0], g) for g in gathered))
        s.sinks.row(final)
        write_equivalence(s)
        s.sinks.message(f"done: {s.state.step} steps, {s.state.skipped_total} skipped micro-batches; "
                        f"adapters in {path}")
    s.sinks.plot()
    s.sinks.close()
    s.procs.accelerator.wait_for_everyone()
    s.procs.accelerator.end_training()


def run_session(s: Session) -> int:
    """Open the session, loop, finish; a full disk stops the run with one line and EXIT_DISK_FULL."""
    from tqdm.auto import tqdm

    try:
        s.open()
        start = closed_form_start(s)  # exact target: before step 0's eval
        if start:
            s.sinks.message(start)
        code = loop(s)
        finish(s, code)
        return code
    except (OSError, DiskFull) as e:
        if isinstance(e, OSError) and not is_disk_full(e):
            raise
        line = (f"error: {e}" if isinstance(e, DiskFull) else f"error: no space left on the device writing "
                f"{e.filename or s.plan.output_dir}: free space and resume from the last checkpoint")
    tqdm.write(line, file=sys.stderr)
    if s.sinks is not None:
        with contextlib.suppress(OSError):  # the log file may be on the full disk too
            s.sinks.log(line)
        with contextlib.suppress(OSError):
            s.sinks.close()
    return EXIT_DISK_FULL


def train(args: TrainArgs) -> int:
    """A whole run, phase by phase; the exit code (0; 3 after too many non-finite micro-batches; 4 on a full disk)."""
    plan = args.validate()  # every bad flag refused here, before any work
    with hold_output_dir(args, plan):  # one run per --output_dir, for the run's whole life
        data = load_data(args)  # tokenizer, training windows, held-out text
        procs = start_processes(args)  # accelerate / torchrun, precision
        total_steps = count_steps(args, data, procs.world)
        model, optimizer, scheduler = build_model(args, plan, procs, total_steps)
        state = restore(plan, model, optimizer, scheduler)
        return run_session(Session(args, plan, data, procs, model, optimizer, scheduler, state, total_steps))


LOCK_NAME, HOLDER_NAME = ".npt-lock", ".npt-lock.holder"  # the advisory lock; who holds it (for the message)


@contextlib.contextmanager
def hold_output_dir(args: TrainArgs, plan: Plan):
    """Hold an advisory lock (filelock) on --output_dir while the run lives; the main process takes it. The OS
    drops it when the process dies, so a killed run's lock never blocks its resume. A run refused after the
    lock leaves nothing behind that it created."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    from filelock import FileLock, Timeout

    out = plan.output_dir
    created = not out.exists()
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        fail(f"--output_dir {args.output_dir!r} is in use by another run ({lock_holder(out)}): wait for it to end, "
             "or use another --output_dir")
    except OSError as e:
        fail(f"--output_dir {args.output_dir!r}: cannot create it or its lock file {LOCK_NAME}: {e.strerror or e}")
    ok = False
    try:
        with contextlib.suppress(OSError):  # only for the message a second run prints
            (out / HOLDER_NAME).write_text(json.dumps({"pid": os.getpid(), "run_id": plan.run_id,
                                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        args._check_run_of(out, plan.resume)  # again under the lock: a run that ended meanwhile left its files
        yield
        ok = True
    finally:
        with contextlib.suppress(OSError):
            (out / HOLDER_NAME).unlink()
            if not ok and set(os.listdir(out)) == {LOCK_NAME}:  # refused before writing anything
                (out / LOCK_NAME).unlink()
                if created:
                    out.rmdir()
        lock.release()


def lock_holder(out: Path) -> str:
    """'pid N, run ID, since T' from the holder's side file (it may still be writing it)."""
    try:
        h = json.loads((out / HOLDER_NAME).read_text())
        return f"pid {h['pid']}, run {h['run_id']}, since {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"


# ----------------------------------------------------------------------------- CLI
@command(max_content_width=100)
@train_options
def main(**flags):
    """Safe NPT equivalence pre-training: the NPT student learns to reproduce the base model's layers."""
    sys.exit(train(TrainArgs(**flags)))


if __name__ == "__main__":
    main()
