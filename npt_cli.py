"""What the NPT command-line scripts share: one-line user errors, the model and precision options,
model / config / tokenizer loading with their user errors, and the output-dir check.

Imports point one way: kernels <- npt <- npt_cli <- pretrain_npt_safe.py, debug_nan.py, test_fixed_npt.py.
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import click

import npt


class UserError(Exception):
    """Bad input a user can fix: reported as one line, exit code 2."""


def fail(message: str):
    raise UserError(message)


def first_line(e: BaseException) -> str:
    """An exception's first line (its type when it has no message), for one-line errors."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


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


def command(**context_settings):
    """click.command with one-line errors and -h/--help."""
    return click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"],
                                                               **context_settings})


def model_options(f):
    """The model and precision flags every script takes."""
    options = [
        click.option("--model_name", default=npt.EMBEDDED_MODEL, show_default=True,
                     help="Hub id, local directory, or the embedded 'smollm2-135m'."),
        click.option("--use_quantization", is_flag=True, help="Load the base model in 4-bit NF4 (FP32 compute)."),
        click.option("--use_fp16", is_flag=True, help="Load the base model in fp16 (ignored with --use_quantization)."),
        click.option("--trust_remote_code", is_flag=True,
                     help="Run a model's own Python code (config.json auto_map). Off: such a model is refused."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def precision_name(use_quantization: bool, use_fp16: bool) -> str:
    if use_quantization:
        return "4-bit NF4, fp32 compute"
    return "fp16" if use_fp16 else "fp32"


def _cannot_load_model(model_name: str, e: BaseException):
    if "trust_remote_code" in str(e):
        fail(f"model {model_name!r} needs its own Python code (auto_map in its config): pass --trust_remote_code "
             "only if you trust that code")
    fail(f"cannot load model {model_name!r}: {first_line(e)} (give a hub id, a local model directory, or smollm2-135m)")


def load_model_or_fail(model_name: str, use_quantization: bool = False, use_fp16: bool = False, **kwargs):
    """npt.load_base_model, with a missing, unreadable or truncated model reported as a user error."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # an error after loading must stay one line
    try:
        return npt.load_base_model(model_name, use_quantization=use_quantization, use_fp16=use_fp16, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        _cannot_load_model(model_name, e)


def load_model_config_or_fail(model_name: str, trust_remote_code: bool = False):
    """The model's transformers config (cheap: no weights), so shapes are validated before loading."""
    from transformers import AutoConfig

    if model_name != npt.EMBEDDED_MODEL and not Path(model_name).is_dir() and (
            Path(model_name).exists() or model_name.startswith((".", "/", "~")) or model_name.count("/") > 1):
        fail(f"model {model_name!r} not found: give a hub id, a local model directory, or smollm2-135m")
    try:
        config = AutoConfig.from_pretrained(npt.model_path(model_name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        _cannot_load_model(model_name, e)
    config = getattr(config, "text_config", None) or config
    check_convertible_or_fail(model_name, config)
    return config


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # Mixtral, Qwen-MoE, DeepSeek


def check_convertible_or_fail(model_name: str, config) -> None:
    """Refuse, from config.json alone, a model whose layers NPT cannot wrap: one dense SwiGLU MLP per layer."""
    why = None
    experts = next((k for k in MOE_KEYS if (getattr(config, k, None) or 0) > 1), None)
    if experts is not None:
        why = f"it is a mixture of experts ({experts} = {getattr(config, experts)}), not one dense MLP per layer"
    elif getattr(config, "hidden_act", None) is None:
        act = getattr(config, "activation_function", None)
        why = (f"its {config.model_type} MLP has no gate_proj (no SwiGLU; activation {act!r})" if act else
               f"its {config.model_type} config names no SwiGLU MLP (no hidden_act)")
    elif config.hidden_act not in ("silu", "swish"):
        why = f"it needs a SwiGLU MLP (hidden_act silu), this one uses {config.hidden_act!r}"
    if why:
        fail(f"model {model_name!r} cannot be converted to NPT: {why}; convertible: Llama, Mistral, Qwen2, SmolLM")


def load_tokenizer_or_fail(model_name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = npt.model_path(model_name)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        fail(f"model folder {model_name!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save one there with "
             "tokenizer.save_pretrained(folder)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        fail(f"cannot load the tokenizer of {model_name!r}: {' '.join(str(e).split())[:300] or type(e).__name__}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_output_dir_or_fail(output_dir: str, flag: str = "--output_dir") -> Path:
    """The resolved directory, refused when it is a file or cannot be created or written."""
    path = Path(output_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        fail(f"{flag} {output_dir!r} is a file, not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not can_create_in(probe):
        fail(f"{flag} {output_dir!r} is not writable ({probe} does not allow writing)")
    return path


def can_create_in(folder: Path) -> bool:
    """Whether a directory can be created in `folder`: tried with a probe (removed at once), since
    os.access says yes to root even under /proc or on a read-only mount."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".npt-probe-", dir=folder))
    except OSError:
        return False
    return True
