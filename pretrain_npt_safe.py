#!/usr/bin/env python
"""Safe NPT equivalence pre-training (see ../shared/SPEC.md section 4)."""
from __future__ import annotations

import functools
import sys

import click

import npt


# ----------------------------------------------------------------------------- CLI plumbing shared by the scripts
class UserError(Exception):
    """Bad input a user can fix: reported as one line, exit code 2."""


def fail(message: str):
    raise UserError(message)


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
        fail(f"cannot load model {model_name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
             "(give a hub id, a local model directory, or smollm2-135m)")
