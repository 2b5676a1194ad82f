"""What a run may do, established before any work: the checks that read files (the model's config, a checkpoint
to resume, adapters to start from, the output dir's other runs), and the output dir's lock for the run's life."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import torch

import npt
from npt_tools.arguments import (LAYOUT_FLAGS, RESUME_FIXED, START_FIXED, TARGET_DEFAULTS, TrainArgs, flag_takes,
                                  parse_steps)
from npt_tools.checkpoints import (STATE_NAME, Resume, checkpoint_bytes, checkpoint_run, is_checkpoint,
                                   is_checkpoint_name, is_own_checkpoint, latest_checkpoint, read_checkpoint_or_fail)
from npt_tools.cli import can_create_in, check_output_dir_or_fail, fail, first_line
from npt_tools.models import check_length_or_fail, load_model_config_or_fail


@dataclasses.dataclass
class Plan:
    """What make_plan established, before any work: where to write, the NPT layers, what to resume."""
    output_dir: Path
    npt_config: npt.NPTConfig
    layer_indices: list[int]
    resume: "Resume | None"
    inject: set[int]  # micro-batch groups to poison (tests)
    run_id: str = ""  # the resumed run's id, or a new one: checkpoints and the output-dir lock name it


def make_plan(args: TrainArgs) -> Plan:
    """Refuse bad input (one line, exit 2) before any model or data loads or any file is written; what the flags
    resolve to (the flags left unset get their values here, in place: TrainArgs.resolve). Reads the model's config,
    a checkpoint to resume and adapters to start from, never weights."""
    args.check()
    if args.use_wandb and importlib.util.find_spec("wandb") is None:
        fail("--use_wandb needs the wandb package: pip install wandb (or drop --use_wandb)")
    if args.log_file is not None:
        log = Path(args.log_file).expanduser().resolve()
        if log.is_dir() or not log.parent.is_dir() or not can_create_in(log.parent):
            fail(f"--log_file {args.log_file!r}: cannot write there (its folder must exist and be writable)")
    output_dir = check_output_dir_or_fail(args.output_dir)
    resume = _resume_or_fail(args, output_dir)
    for line in args.resolve(_resumed_values(args, resume)):
        warnings.warn(line, stacklevel=1)
    if resume is not None and args.learning_rate is None:  # exact: the rate its start set, never decided again
        fail(f"checkpoint {str(resume.path)!r} is corrupt: {STATE_NAME} args hold no --learning_rate: "
             "pass --learning_rate")
    args.check()  # again: values taken from the checkpoint
    check_run_of(args, output_dir, resume)
    config = load_model_config_or_fail(args.model_name, args.trust_remote_code)  # refuses unconvertible models
    check_length_or_fail(args.max_length, config)
    npt_config = args.npt_config(config.hidden_size)
    try:
        layer_indices = npt_config.layer_indices(config.num_hidden_layers)
    except ValueError as e:
        fail(f"--npt_layers: {e}")
    check_room_or_fail(args, output_dir, config, npt_config, len(layer_indices))
    if resume is not None:
        try:
            npt_config.check_compatible(resume.npt_config, config.num_hidden_layers,
                                        f"the adapters in checkpoint {str(resume.path)!r}")
        except ValueError as e:
            fail(f"{e}: pass the same {LAYOUT_FLAGS}")
    if args.init_adapters is not None:
        _check_init_adapters(args, npt_config, config.num_hidden_layers, resume)
    if (args.kernel == "triton" and not args.idle("kernel") and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        fail("--kernel triton needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU); use --kernel auto")
    run_id = resume.state.run_id if resume is not None and resume.state.run_id else uuid.uuid4().hex[:12]
    return Plan(output_dir, npt_config, layer_indices, resume, parse_steps(args.inject_nan_steps), run_id)


def check_room_or_fail(args: TrainArgs, output_dir: Path, config, npt_config: npt.NPTConfig, layers: int) -> None:
    """The output disk must hold one checkpoint (else one line, exit 2, before any work); a warning where it cannot
    hold every checkpoint the run keeps at once (it then stops with exit 4 when full, keeping the newest)."""
    with torch.device("meta"):  # the adapters' shapes, no memory
        adapter = npt.NPTAdapter(config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                                 npt_config)
    need = checkpoint_bytes(layers * sum(p.numel() for p in adapter.parameters()))
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        fail(f"--output_dir {args.output_dir!r}: {free / 1e6:.2f} MB free on its disk, and one checkpoint of this run "
             f"needs about {need / 1e6:.2f} MB: free space there or use another --output_dir")
    saves = (args.max_steps // args.save_steps if args.max_steps > 0 else 1) if args.save_steps else 0
    if args.save_total_limit and saves > args.save_total_limit:
        saves = args.save_total_limit + 1  # a new checkpoint is written before the oldest is removed
    if free < (saves + 2) * need:  # + checkpoint-best and checkpoint-final
        warnings.warn(f"--output_dir {args.output_dir!r} has room for {free // need} of the {saves + 2} checkpoints "
                      f"this run keeps (about {need / 1e6:.2f} MB each): if it fills, the run stops with exit code 4 "
                      "and keeps the newest checkpoint that fit", stacklevel=1)


def _resumed_values(args: TrainArgs, resume: "Resume | None") -> dict:
    """The resumed run's own values (its trainer_state.json args) of the per-target and closed-form start flags not
    given: a resume continues that run, whatever today's defaults are. A value the flag could not take is refused."""
    saved = resume.saved.get("args", {}) if resume is not None else {}
    values = {k: saved[k] for k in (*TARGET_DEFAULTS[args.modulation_target], *START_FIXED)
              if getattr(args, k) is None and saved.get(k) is not None}
    for name, value in values.items():
        if not flag_takes(name, value):
            fail(f"checkpoint {str(resume.path)!r} is corrupt: {STATE_NAME} args hold --{name} {value!r}, not a value "
                 f"of that flag: pass --{name}")
    return values


def _check_init_adapters(args: TrainArgs, npt_config: npt.NPTConfig, num_layers: int, resume: "Resume | None") -> None:
    """--init_adapters names saved adapters of this layout (their config is read; weights load later)."""
    if resume is not None:
        fail("--init_adapters starts a new run and --resume_from_checkpoint continues one: give only one")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(args.init_adapters).expanduser()
    try:
        saved = npt.NPTConfig.from_dict(npt.read_adapter_config(path))
        npt_config.check_compatible(saved, num_layers, f"the adapters in {args.init_adapters!r}")
        weights = load_file(str(path / npt.WEIGHTS_NAME)) if (path / npt.WEIGHTS_NAME).is_file() else {}
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        fail(f"--init_adapters: {first_line(e)}: give a checkpoint directory of a run with the same {LAYOUT_FLAGS}")
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        fail(f"--init_adapters: the adapters in {args.init_adapters!r} are not finite ({bad[0]}"
             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): give a checkpoint of a run that stayed finite")


def check_run_of(args: TrainArgs, output_dir: Path, resume: "Resume | None") -> None:
    """Refuse to start a new run over another one's files, and to resume with changed data or optimisation
    flags (the checkpoint's trainer_state.json records the original ones)."""
    foreign = sorted(p.name for p in output_dir.glob("checkpoint-*")
                     if is_checkpoint_name(p.name) and not is_own_checkpoint(p))
    if foreign:
        fail(f"--output_dir {args.output_dir!r} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
             f", not written by this trainer (no {STATE_NAME} of its own): the trainer would replace it; move it "
             "away or use a new --output_dir")
    if resume is None:
        theirs = sorted(p.name for p in output_dir.glob("*") if p.name == "metrics.jsonl" or is_checkpoint(p))
        if theirs and not args.overwrite_output_dir:
            fail(f"--output_dir {args.output_dir!r} already holds another run ({', '.join(theirs[:3])}"
                 f"{', ...' if len(theirs) > 3 else ''}): use a new --output_dir, --resume_from_checkpoint, "
                 "or --overwrite_output_dir")
        return
    _check_resume_target(args, output_dir, resume)
    saved = resume.saved.get("args", {})
    fixed = RESUME_FIXED + (START_FIXED if resume.state.closed_form_start else ())  # the start ran: it stays as it was
    changed = [f"--{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in fixed
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        fail(f"cannot resume from {str(resume.path)!r} with changed flags ({'; '.join(changed)}): pass the "
             "checkpoint's values, or start a new run in a new --output_dir")


def _check_resume_target(args: TrainArgs, output_dir: Path, resume: "Resume") -> None:
    """Resuming from a checkpoint outside --output_dir must not write into another run's files there."""
    if resume.path.expanduser().resolve().parent == output_dir:
        return
    runs = {checkpoint_run(d) for d in output_dir.glob("checkpoint-*") if is_checkpoint(d)}
    others = {r[0] for r in runs if r is not None and r[0] != resume.state.run_id}
    ours = any(r is not None and r[0] == resume.state.run_id for r in runs)
    if others or ((output_dir / "metrics.jsonl").exists() and not ours):
        fail(f"--output_dir {args.output_dir!r} holds another run than the checkpoint "
             f"{args.resume_from_checkpoint!r}: resume into a new --output_dir or the checkpoint's own")


def _resume_or_fail(args: TrainArgs, output_dir: Path) -> "Resume | None":
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        try:
            path = latest_checkpoint(output_dir)
        except ValueError as e:
            fail(f"--resume_from_checkpoint latest is ambiguous in {args.output_dir!r}: {e}; name the checkpoint "
                 "directory instead")
        if path is None:
            fail(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir!r}")
    else:
        path = Path(args.resume_from_checkpoint).expanduser()
    return read_checkpoint_or_fail(path)


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
            part = out / (HOLDER_NAME + ".part")  # renamed into place: a reader never sees half of it
            part.write_text(json.dumps({"pid": os.getpid(), "run_id": plan.run_id,
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            part.replace(out / HOLDER_NAME)
        check_run_of(args, out, plan.resume)  # again under the lock: a run that ended meanwhile left its files
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


def lock_holder(out: Path, wait: float = 2.0) -> str:
    """'pid N, run ID, since T' from the holder's side file. The holder writes it just after taking the lock,
    so a run that lost the race may look before it is there: it looks again for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            h = json.loads((out / HOLDER_NAME).read_text())
            return f"pid {h['pid']}, run {h['run_id']}, since {h['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "its pid is not recorded yet"
            time.sleep(0.05)
