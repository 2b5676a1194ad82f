"""Checkpoints: the adapters (npt's format), the optimizer, RNG and trainer state, written without pickle
(safetensors and JSON: a checkpoint is data, never code) to a temporary folder, synced, then renamed; which
folders are this trainer's (never a user's); reading a checkpoint back with every value checked first."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import torch

import npt
from npt_tools.cli import fail, first_line, is_disk_full
from npt_tools.metrics import json_safe
from npt_tools.step import weights_finite

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
    closed_form_start: dict | None = None  # the exact target's start (init_exact): what it was computed from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainerState":
        """From a trainer_state.json; missing fields keep their defaults."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


CKPT_RE = re.compile(r"checkpoint-(\d+)$")
STATE_NAME, OPTIM_NAME, RNG_NAME = "trainer_state.json", "optimizer.safetensors", "rng_state.safetensors"


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
            need = checkpoint_bytes(sum(p.numel() for p in npt.get_adapter_params(model)))
            raise DiskFull(f"no space left on the device to save {final} (a checkpoint needs about {need / 1e6:.2f} "
                           f"MB, {shutil.disk_usage(output_dir).free / 1e6:.2f} MB are free): "
                           f"{resume_hint(output_dir, state.run_id)}") from None
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


def checkpoint_bytes(adapter_numel: int) -> int:
    """About what a checkpoint takes on disk once the optimizer has state: the fp32 adapters and Adam's two fp32
    moments of each (12 bytes a parameter), the trainer state, RNG and config files and their file-system blocks."""
    return 12 * adapter_numel + 64_000


def resume_hint(output_dir: Path, run_id: str) -> str:
    """What to do after a full disk: resume from this run's newest checkpoint, named, or start again."""
    found = newest_checkpoint(output_dir, run_id)
    if found is None:
        return ("no checkpoint of this run was written: free space, then start again with the same flags and "
                "--overwrite_output_dir")
    return (f"free space, then resume from {found} (step {checkpoint_run(found)[1]}, the newest checkpoint kept) "
            f"with --resume_from_checkpoint {found}")


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
    (tmp / STATE_NAME).write_text(json.dumps(json_safe(full), indent=1) + "\n")
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
    """The checkpoint with the highest step (checkpoint-<step>, -final or -best: after a full disk the best may be
    all a run kept); a ValueError when the directory holds checkpoints of several runs (which one is meant is then
    the user's call)."""
    found = _checkpoints(output_dir)
    if len({run_id for run_id, _ in found.values()}) > 1:
        raise ValueError(f"{len({r for r, _ in found.values()})} runs wrote checkpoints there")
    return _newest(found)


def newest_checkpoint(output_dir: Path, run_id: str) -> Path | None:
    """Run `run_id`'s checkpoint with the highest step in output_dir, or None."""
    return _newest({d: run for d, run in _checkpoints(output_dir).items() if run[0] == run_id})


def _checkpoints(output_dir: Path) -> dict[Path, tuple[str, int]]:
    return {d: run for d in (output_dir.iterdir() if output_dir.is_dir() else ())
            if is_checkpoint_name(d.name) and (run := checkpoint_run(d)) is not None}


def _newest(found: dict[Path, tuple[str, int]]) -> Path | None:
    # the highest step; on a tie checkpoint-<step> (its name says the step), then -final, then -best (equal adapters)
    return max(found, key=lambda d: (found[d][1], bool(CKPT_RE.match(d.name)), d.name == "checkpoint-final"),
               default=None)


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

    if path.exists() and not path.is_dir():
        fail(f"--resume_from_checkpoint {str(path)!r} is a file: give a checkpoint directory (OUTPUT_DIR/checkpoint-"
             "<step>, -best or -final) or latest")
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
    if not weights_finite(params, optimizer):
        raise ValueError("its adapters or optimizer state are not finite (a diverged run): resume from an earlier "
                         "checkpoint")
    py = resume.saved["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
