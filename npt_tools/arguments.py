"""The trainer's arguments: one dataclass field per flag (`--help` shows them), with cheap checks only."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

import npt
from npt_tools.cli import fail, flag
from npt_tools.closed_form import STARTS
from npt_tools.models import ModelArgs
from npt_tools.objective import LOSSES, OBJECTIVES

EXACT_RANK = 384  # the exact target's default rank: the measured choice (README, "Which modulation target")
EXACT_LR_SCALE = 3e-3  # exact, --learning_rate not given: this x the share the closed-form start misses (measured)
# the defaults that depend on --modulation_target, in one place to retune: a flag not given takes its target's value
TARGET_DEFAULTS = {
    "exact": {"objective": "kl", "learning_rate": 1e-5},
    **{target: {"objective": "layerwise", "learning_rate": 3e-3} for target in npt.TARGETS if target != "exact"},
}
# the flags whose default is None only so that giving one shows (it may do nothing: DOES_NOTHING): their values
UNSET_DEFAULTS = {"kernel": "auto", "loss": "update", "regularization_lambda": 0.01,
                  "down_rank": npt.NPTConfig.down_rank, "init_batches": 64, "init_gradient_batches": 32,
                  "exact_start": "fisher"}
# where a flag does nothing: (the flag it hangs on, its values where it does, why) for --help and the warning
DOES_NOTHING = {
    "kernel": ("modulation_target", ("exact",), "the modulated-SwiGLU kernel is never called there"),
    "safe_mode": ("modulation_target", ("down", "exact"), "no gate modulation there"),
    "regularization_lambda": ("modulation_target", ("exact",), "no regularizer term there"),
    "loss": ("objective", ("kl",), "it fits the next-token distribution, not layers"),
    "down_rank": ("modulation_target", ("gate", "exact"), "only down and gate+down modulate W_down"),
    "init_batches": ("modulation_target", ("gate", "down", "gate+down"), "only exact starts in closed form"),
    "init_gradient_batches": ("modulation_target", ("gate", "down", "gate+down"), "only exact starts in closed form"),
    "exact_start": ("modulation_target", ("gate", "down", "gate+down"), "only exact starts in closed form"),
}


def _help(text: str, name: str) -> str:
    """A flag's help text, with where it does nothing and, for a None default, what it resolves to."""
    if name in DOES_NOTHING:
        on, values, why = DOES_NOTHING[name]
        text += f" Does nothing with --{on} {', '.join(values)} ({why})."
    if name in UNSET_DEFAULTS:
        return f"{text}  [default: {UNSET_DEFAULTS[name]}]"
    if name in TARGET_DEFAULTS["exact"]:
        by_value = {}
        for target, values in TARGET_DEFAULTS.items():
            by_value.setdefault(values[name], []).append(target)
        per = "; ".join(f"{value} for {', '.join(targets)}" for value, targets in by_value.items())
        return f"{text}  [default per --modulation_target: {per}]"
    return text


@dataclasses.dataclass
class TrainArgs(ModelArgs):
    """The trainer's arguments, one field per flag after the model flags (`npt_tools.models.ModelArgs`)."""
    adapter_rank: int | None = flag(None, "Rank r of the NPT adapters (1..d_model). [default: "
                                          f"{EXACT_RANK} for the exact "
                                          "target (d_model if smaller), 16 for the others]", type=click.IntRange(min=1))
    share_embeddings: bool = flag(False, "Accepted for compatibility: the teacher is always the same model "
                                         "(npt_disabled), so embeddings are always shared.")
    safe_mode: bool = flag(False, _help("Additive gate modulation only (no multiplicative branch).", "safe_mode"))
    npt_layers: str = flag("all", "Layers to convert: all, upper_half, lower_half, a range like 8-15 or a list "
                                  "like 1,3,5 (0-based).")
    kernel: str | None = flag(None, _help("Modulated-SwiGLU backend (auto: Triton on CUDA, torch otherwise).",
                                          "kernel"), type=click.Choice(["auto", "triton", "torch"]))
    objective: str | None = flag(None, _help("layerwise: each NPT layer on the teacher's input and attention; "
                                             "end_to_end: the student's own trajectory; kl: the teacher's next-token "
                                             "distribution against the student's (its own trajectory).", "objective"),
                                 type=click.Choice(OBJECTIVES))
    loss: str | None = flag(None, _help("Per-layer fit: update (|y_s - y_t|^2 / |y_t - h|^2 per token: the share of "
                                        "the layer's update missed) or cosine (2 - 2 cos of whole states).", "loss"),
                            type=click.Choice(LOSSES))
    modulation_target: str = flag("exact", "What the attention code modulates: gate (the seed's form), down (a "
                                          "per-token rank-K update of W_down), gate+down, or exact (per-token "
                                          "patches of W_gate, W_up, W_down and the norm scale that reproduce the "
                                          "layer from a rank-r code of its attention).",
                                  type=click.Choice(npt.TARGETS))
    down_rank: int | None = flag(None, _help("K, the rank of the per-token down_proj modulation.", "down_rank"),
                                 type=click.IntRange(min=1))
    init_batches: int | None = flag(None, _help("exact target: training micro-batches whose attention outputs give "
                                                "the closed-form start, before the first step.", "init_batches"),
                                    type=click.IntRange(min=1))
    init_gradient_batches: int | None = flag(
        None, _help("exact target, fisher start: how many of each process's --init_batches also give the gradient "
                    "metric (the first ones; one teacher backward each); the others give the attention covariance "
                    "alone, from a forward that stops before the logits (about a third of the cost). The covariance "
                    "gains most from more windows.",
                    "init_gradient_batches"), type=click.IntRange(min=1))
    exact_start: str | None = flag(None, _help("exact target: the closed-form start's metric: fisher (the code that "
                                               "keeps what matters to the next-token distribution: Fisher-weighted "
                                               "principal directions) or pca (the principal directions of the "
                                               "attention output).", "exact_start"),
                                   type=click.Choice(list(STARTS)))
    dataset_name: str = flag("builtin", "builtin (pydoc_data.topics), a hub dataset, or a local "
                                        ".txt/.jsonl/.json/.parquet file.")
    dataset_split: str = flag("train", "Split of a hub dataset.")
    text_column: str = flag("text", "Column holding the text.")
    streaming: bool = flag(False, "Stream the dataset instead of loading it (needs --max_steps > 0).")
    num_samples: int = flag(-1, "Use only the first N training documents (-1: all).", type=int)
    max_length: int = flag(128, "Tokens per packed sequence.", type=click.IntRange(min=2))
    batch_size: int = flag(2, "Sequences per micro-batch (per process).", type=click.IntRange(min=1))
    gradient_accumulation_steps: int = flag(2, "Micro-batches per optimizer step.", type=click.IntRange(min=1))
    learning_rate: float | None = flag(None, _help("Peak learning rate: small for the exact target, which starts at "
                                                   "the teacher in closed form; large for the gate/down targets, "
                                                   "which start at no effect (benchmarks/RESULTS.md).",
                                                   "learning_rate"), type=click.FloatRange(min=0))
    weight_decay: float = flag(0.0, type=click.FloatRange(min=0))
    optimizer_type: str = flag("adamw", type=click.Choice(["adamw", "adam"]))
    scheduler_type: str = flag("linear", "Learning-rate schedule after warmup.",
                               type=click.Choice(["linear", "cosine", "constant"]))
    warmup_steps: int = flag(10, "Linear warmup, in optimizer steps.", type=click.IntRange(min=0))
    max_grad_norm: float = flag(0.5, "Gradient clipping norm.", type=click.FloatRange(min=0, min_open=True))
    regularization_lambda: float | None = flag(None, _help("Weight of the modulation regularizer.",
                                                           "regularization_lambda"), type=click.FloatRange(min=0))
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
    eval_steps: int = flag(10, "Evaluate on held-out text every N steps, and at start and end (0: off).",
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
    _given = None  # the flags set (not None, or True for a bool) when resolve first ran: not a flag itself

    def check(self) -> "TrainArgs":
        """Refuse (one line, exit 2) what click's types let through: nan and inf floats, seeds numpy/torch refuse,
        contradicting flags. Cheap: no file is read (plan.make_plan does the checks that read files)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("float") and value is not None and not math.isfinite(value):
                fail(f"--{f.name} must be a finite number, got {value}")
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
        try:
            parse_steps(self.inject_nan_steps)
        except ValueError:
            fail(f"--inject_nan_steps {self.inject_nan_steps!r} not understood: use e.g. 3,5-7")
        return self

    def resolve(self, resumed: dict | None = None) -> list[str]:
        """Give each flag left unset (None) its value, in place, before anything reads it: `resumed` (a resumed
        checkpoint's values of the per-target flags not given), else TARGET_DEFAULTS for the target, else
        UNSET_DEFAULTS. Returns a line per flag set where it does nothing (DOES_NOTHING), for a warning."""
        if self._given is None:  # the first call still sees which flags were set
            self._given = frozenset(f.name for f in dataclasses.fields(self)
                                    if getattr(self, f.name) is not None and getattr(self, f.name) is not False)
        for name, value in {**UNSET_DEFAULTS, **TARGET_DEFAULTS[self.modulation_target], **(resumed or {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return [f"--{name}{'' if getattr(self, name) is True else f' {getattr(self, name)}'} does nothing with --{on} "
                f"{getattr(self, on)} ({why}): ignored" for name, (on, _, why) in DOES_NOTHING.items()
                if name in self._given and self.idle(name)]

    def was_given(self, name: str) -> bool:
        """Whether the user set flag `name` (resolve records it before it fills in any value)."""
        return self._given is not None and name in self._given

    def idle(self, name: str) -> bool:
        """Whether flag `name` does nothing under these (resolved) arguments: DOES_NOTHING."""
        on, values, _ = DOES_NOTHING[name]
        return getattr(self, on) in values

    def npt_config(self, d_model: int) -> npt.NPTConfig:
        """The NPT layout the flags ask for on a model of width d_model (the rank's default depends on the target)."""
        rank = self.adapter_rank or (min(EXACT_RANK, d_model) if self.modulation_target == "exact" else 16)
        if not 1 <= rank <= d_model:
            fail(f"--adapter_rank {rank} is out of range: it must lie in 1..{d_model} (the model's d_model)")
        return npt.NPTConfig(rank=rank, modulation="additive" if self.safe_mode else "both", layers=self.npt_layers,
                             modulation_target=self.modulation_target, down_rank=self.down_rank)

    def saved(self) -> dict:
        """The arguments as trainer_state.json records them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "resume_from_checkpoint"}


# the flags the adapters' layout follows: a checkpoint's adapters fit only a run with the same values
LAYOUT_FLAGS = "--adapter_rank/--safe_mode/--npt_layers/--modulation_target/--down_rank"
# changing these on resume would silently make a different run than the checkpoint's (precision flags too: refused)
RESUME_FIXED = ("model_name", "use_quantization", "use_fp16", "mixed_precision", "dataset_name", "dataset_split",
                "text_column", "streaming", "num_samples", "max_length", "batch_size", "gradient_accumulation_steps",
                "learning_rate", "weight_decay", "optimizer_type", "scheduler_type", "warmup_steps", "max_grad_norm", "regularization_lambda", "objective", "loss", "seed")


# the closed-form start's flags: a resume after the start takes the run's values (changed ones are refused)
START_FIXED = ("exact_start", "init_batches", "init_gradient_batches")


def flag_takes(name: str, value) -> bool:
    """Whether --name, given on the command line, could hold `value` (one read from a file): its type and range."""
    kind = next(f for f in dataclasses.fields(TrainArgs) if f.name == name).metadata.get("type")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not isinstance(kind, click.ParamType):
        return False
    try:
        return kind.convert(value, None, None) == value and (isinstance(value, str) or math.isfinite(value))
    except click.BadParameter:
        return False


def exact_learning_rate(kept: float) -> float:
    """The exact target's learning rate when --learning_rate is not given: EXACT_LR_SCALE x (1 - kept), kept the
    share of the (Fisher-weighted) variance the closed-form start keeps. The nearer the start is to the teacher,
    the smaller the steps: larger ones undo it (benchmarks/RESULTS.md)."""
    return EXACT_LR_SCALE * max(1.0 - kept, 1e-3)


def parse_steps(spec: str) -> set[int]:
    """'3,5-7' -> {3, 5, 6, 7}; a ValueError for anything else."""
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
