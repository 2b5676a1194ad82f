"""The edit artifact: a weight edit (what consolidation writes into the base weights) as a small, separate folder
that loads onto any copy of the base model, as a PEFT adapter does:

    edit.safetensors   the fp32 delta of each base parameter the edit changes, keyed by the parameter's name in the
                       plain Hugging Face model (`model.layers.7.mlp.down_proj.weight`)
    edit.json          format_version, method, contexts, layers, per-parameter norms, time, model name, dtype, ...

`apply_edit` adds the deltas (every check first: no weight changes unless all are good) and returns the handle
`undo_edit` restores the weights from, bitwise; `merge_edit` writes the edited plain model as a Hugging Face folder.
On an NPT-converted model the names are the plain model's too (the wrapper's `.layer` segment dropped, adapters
never edited), so one artifact serves both."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import npt

FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "edit.safetensors", "edit.json"
EDIT_FILES = (WEIGHTS_FILE, META_FILE)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ----------------------------------------------------------------------------- names
def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{Hugging Face name: parameter} of every base parameter, on a plain model and on an NPT-converted one (where
    `model.layers.7.layer.mlp.down_proj.weight` is named `model.layers.7.mlp.down_proj.weight`); adapters are
    left out. Tied parameters appear under each of their names (one tensor)."""
    wrappers = {name for name, m in model.named_modules() if isinstance(m, npt.NPTLayer)}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        under = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) in wrappers), None)
        if under is None:
            params[name] = p
        elif parts[under] == "layer":  # the wrapped decoder layer: its own names without the `.layer` segment
            params[".".join(parts[:under] + parts[under + 1:])] = p
    return params


def edited_layers(names) -> list[int]:
    """The decoder-layer indices the parameter names lie in (`model.layers.7.` -> 7), sorted."""
    return sorted({int(m.group(1)) for n in names for m in [_LAYER_RE.search(n)] if m})


# ----------------------------------------------------------------------------- apply / undo
@dataclasses.dataclass
class EditHandle:
    """What `undo_edit` needs: each changed parameter's original tensor (a copy, so the undo is bitwise)."""
    originals: dict[str, torch.Tensor]


@torch.no_grad()
def apply_edit(model: nn.Module, deltas: dict[str, torch.Tensor]) -> EditHandle:
    """Add each delta to its base parameter: w + d exactly (in float64, for fp32 weights the same as fp32
    addition), rounded once to the weight's own dtype. Everything is checked first (names, shapes, finite deltas,
    results finite in the weight's dtype, full-precision weights): on any problem a ValueError, and no weight
    changes. Returns the handle `undo_edit` takes."""
    new = edited_weights(model, deltas)
    params = base_parameters(model)
    handle = EditHandle({name: params[name].detach().clone() for name in new})
    for name, w in new.items():
        params[name].copy_(w)
    return handle


@torch.no_grad()
def undo_edit(model: nn.Module, handle: EditHandle) -> None:
    """Restore every weight `apply_edit` changed to its original tensor, bitwise."""
    params = base_parameters(model)
    missing = [n for n in handle.originals if n not in params or params[n].shape != handle.originals[n].shape]
    if missing:
        raise ValueError(f"undo_edit: {missing[0]} is not a parameter of this model with the edited shape: "
                         "undo on the model the edit was applied to")
    for name, w in handle.originals.items():
        params[name].copy_(w)


@contextlib.contextmanager
def applied(model: nn.Module, deltas: dict[str, torch.Tensor]):
    """The model with the edit applied inside the block (apply_edit's checks); every weight bitwise as before
    afterwards, on an exception too."""
    handle = apply_edit(model, deltas)
    try:
        yield model
    finally:
        undo_edit(model, handle)


@torch.no_grad()
def edited_weights(model: nn.Module, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: w + d in the weight's dtype and device} for every delta, after every check (see apply_edit);
    the model is not changed."""
    params = base_parameters(model)
    check_deltas(deltas)
    bad = [n for n in deltas if n not in params]
    if bad:
        example = next(iter(params), "none")
        raise ValueError(f"the edit changes {bad[0]!r}, which is not a base parameter of this model "
                         f"({len(bad)} unknown names; this model's are like {example!r}): apply it to the model "
                         "it was made for")
    seen = {}
    for name, d in deltas.items():
        p = params[name]
        if id(p) in seen:
            raise ValueError(f"the edit changes {seen[id(p)]!r} and {name!r}, which are one tied tensor: "
                             "give its delta once")
        seen[id(p)] = name
        if _is_quantized(p):
            raise ValueError(f"{name} is a quantized (4-bit bitsandbytes) weight: an edit needs full-precision "
                             "weights; reload the model without quantization")
        if d.shape != p.shape:
            raise ValueError(f"the edit's delta of {name} has shape {tuple(d.shape)}, the model's parameter "
                             f"{tuple(p.shape)}: apply it to the model it was made for")
    return {name: _sum_in_dtype(name, params[name], d) for name, d in deltas.items()}


def _sum_in_dtype(name: str, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    total = (w.detach().double() + d.to(device=w.device, dtype=torch.float64)).to(w.dtype)
    if not torch.isfinite(total).all():
        biggest = (w.detach().double() + d.to(device=w.device, dtype=torch.float64)).abs().max().item()
        raise ValueError(f"the edit overflows {name}: w + delta reaches {biggest:.3g}, beyond {w.dtype}'s largest "
                         f"{torch.finfo(w.dtype).max:.3g}; no weight was changed (a smaller edit, or load the model "
                         "in fp32)")
    return total


def _is_quantized(p: torch.Tensor) -> bool:
    return type(p).__name__ == "Params4bit" or not torch.is_floating_point(p)


def check_deltas(deltas) -> None:
    """A non-empty {name: finite floating-point tensor}, or a ValueError naming the first bad entry."""
    if not isinstance(deltas, dict) or not deltas:
        raise ValueError(f"an edit is a non-empty dict {{parameter name: delta tensor}}, got "
                         f"{type(deltas).__name__ if not isinstance(deltas, dict) else 'an empty dict'}")
    for name, d in deltas.items():
        if not isinstance(name, str) or not isinstance(d, torch.Tensor) or not torch.is_floating_point(d):
            raise ValueError(f"the edit's entry {name!r} is not a parameter name with a floating-point tensor")
        if not torch.isfinite(d).all():
            raise ValueError(f"the edit's delta of {name} is not finite (NaN/Inf): refused, no weight was changed")


# ----------------------------------------------------------------------------- the artifact on disk
def save_edit(path: str | os.PathLike, deltas: dict[str, torch.Tensor], meta: dict | None = None,
              overwrite: bool = False) -> Path:
    """Write the artifact: `path/edit.safetensors` (fp32 deltas) and `path/edit.json` (`meta` plus the format
    version, the edited layers, each delta's norm, the time and the dtype), into a temporary folder beside `path`,
    then renamed: never half-written. `path` must not exist or be empty; with `overwrite`, an earlier edit there is
    replaced. Nothing else is ever replaced."""
    from safetensors.torch import save_file

    check_deltas(deltas)
    path = Path(path)
    check_target(path, overwrite, EDIT_FILES, "an edit")
    tensors = {n: d.detach().to(device="cpu", dtype=torch.float32).contiguous() for n, d in deltas.items()}
    text = meta_json(tensors, meta)

    def write(tmp: Path):
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "npt_edit": str(FORMAT_VERSION)})
        (tmp / META_FILE).write_text(text)
    return write_folder(path, write)


def meta_json(deltas: dict[str, torch.Tensor], meta: dict | None) -> str:
    """edit.json's text: `meta` with the format version, the deltas' dtype, the edited layers, each delta's norm
    and the time it was made (kept when `meta` has one)."""
    full = {**(meta or {}), "format_version": FORMAT_VERSION, "dtype": "float32", "layers": edited_layers(deltas),
            "norms": {n: d.double().norm().item() for n, d in deltas.items()},
            "created": (meta or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        return json.dumps(full, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"the edit's meta cannot be written as JSON: {e}") from None


def load_edit(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(deltas, meta) of an artifact folder; a missing folder or file, or a corrupt or inconsistent one, is one
    clear line (FileNotFoundError / ValueError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for f in EDIT_FILES:
        if not (path / f).is_file():
            raise FileNotFoundError(f"no edit at {str(path)!r}: {f} is missing (an edit folder holds "
                                    f"{' and '.join(EDIT_FILES)}, as save_edit writes them)")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the edit at {str(path)!r} is corrupt: {META_FILE} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("norms"), dict):
        raise ValueError(f"the edit at {str(path)!r} is corrupt: {META_FILE} holds no 'norms' object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"the edit at {str(path)!r} has format_version {meta.get('format_version')!r}; this "
                         f"version of npt reads {FORMAT_VERSION}")
    try:
        deltas = load_file(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"the edit at {str(path)!r} is corrupt: {WEIGHTS_FILE} does not load "
                         f"({' '.join(str(e).split())})") from None
    if set(deltas) != set(meta["norms"]):
        raise ValueError(f"the edit at {str(path)!r} is inconsistent: {WEIGHTS_FILE} and {META_FILE} name "
                         "different parameters (files from two edits?)")
    return deltas, meta


def merge_edit(model_name: str, edit_path: str | os.PathLike, out_dir: str | os.PathLike,
               dtype: torch.dtype = torch.float32, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """The plain Hugging Face model (`model_name`: a hub id, a local folder or smollm2-135m; loaded in `dtype`) with
    the edit at `edit_path` added, saved with its tokenizer (and a copy of edit.json) to `out_dir`, so that
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads the edited model. `out_dir` must not exist or be empty;
    with `overwrite`, an earlier merge there is replaced. Written to a temporary folder, then renamed."""
    deltas, meta = load_edit(edit_path)
    return write_merged(model_name, deltas, meta, out_dir, dtype, overwrite, trust_remote_code)


def write_merged(model_name: str, deltas: dict[str, torch.Tensor], meta: dict, out_dir: str | os.PathLike,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False,
                 trust_remote_code: bool = False) -> Path:
    """merge_edit with the edit in memory."""
    from npt_tools.models import load_base_model

    out_dir = Path(out_dir)
    check_target(out_dir, overwrite, (META_FILE, "config.json"), "a merged model")
    check_deltas(deltas)
    text = meta_json(deltas, {**meta, "merged_into": model_name})
    model, tokenizer = load_base_model(model_name, dtype=dtype, trust_remote_code=trust_remote_code)
    apply_edit(model, deltas)

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(text)
    return write_folder(out_dir, write)


def check_target(path: Path, overwrite: bool, own_files: tuple[str, ...], what: str,
                 overwrite_hint: str = "overwrite=True") -> None:
    """`path` may be written: it does not exist, is an empty folder, or (with overwrite) holds `what` (all of
    `own_files`). A ValueError otherwise (`overwrite_hint`: how the caller asks to overwrite)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder: give a new folder for {what}")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not all((path / f).is_file() for f in own_files):
        raise ValueError(f"{str(path)!r} already holds other files (not {what}): give a new or empty folder")
    if not overwrite:
        raise ValueError(f"{str(path)!r} already holds {what}: give a new folder, or {overwrite_hint} to replace it")


def write_folder(path: Path, write) -> Path:
    """Call write(tmp) on a temporary folder beside `path`, sync its files and rename it to `path` (an existing
    `path` moved aside first, then removed): readers see the old folder or the new one, never half of one. The
    folder and its files get the modes the umask gives a new folder and file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        umask = os.umask(0o22)
        os.umask(umask)
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors create theirs private (0700, 0600)
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
            if f.is_file():  # the data on disk before the rename makes it visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def delta_norm(deltas: dict[str, torch.Tensor]) -> float:
    """The Frobenius norm of the whole edit (all deltas as one vector)."""
    return math.sqrt(sum(d.double().square().sum().item() for d in deltas.values()))
