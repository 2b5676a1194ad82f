"""What the NPT command-line scripts share: one-line user errors (exit code 2), click commands whose options
come from an argument dataclass (one CLI style for the three scripts), lines a user must read on their own line
(progress bars only on a terminal), SIGTERM handled as Ctrl-C, and the output-dir check."""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click


class UserError(Exception):
    """Bad input a user can fix: reported as one line, exit code 2."""


def fail(message: str):
    raise UserError(message)


def first_line(e: BaseException) -> str:
    """An exception's first line (its type when it has no message), for one-line errors."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def say(line: str) -> None:
    """A line a user must read (an error, a warning, a result) on stderr, on a line of its own: a progress bar
    open on a terminal is cleared first and redrawn below it (tqdm.write)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def progress(iterable=None, shown: bool = True, **kwargs):
    """A progress bar on stderr, drawn only where stderr is a terminal: in a log file its carriage returns would
    put the next line (an error, a warning) on the bar's line, where `grep '^error:'` cannot find it."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if shown else True, dynamic_ncols=True, **kwargs)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does (locks and temporary files removed)."""


def _terminate(signum, frame):
    raise Terminated


class OneLineCommand(click.Command):
    """Bad input (click's own or ours) prints one 'error: ...' line and exits 2: no usage dump, no traceback.
    Ctrl-C and SIGTERM print 'error: aborted' and exit 1, after the code they interrupt has cleaned up."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort as e:
            say(f"error: aborted{' (SIGTERM)' if isinstance(e.__cause__, Terminated) else ''}")
            sys.exit(1)
        except (click.ClickException, UserError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            say(f"error: {' '.join(msg.split())}")
            sys.exit(2)
        finally:
            if main_thread and previous is not None:  # None: a handler not set from Python, left as it is
                signal.signal(signal.SIGTERM, previous)


def command(**context_settings):
    """click.command with one-line errors and -h/--help."""
    return click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"],
                                                               **context_settings})


def flag(default, help=None, **click_kwargs):
    """A dataclass field and its click option (help text, type) in one place: see `options`."""
    return dataclasses.field(default=default, metadata={"help": help, **click_kwargs})


def options(cls):
    """One click option `--<field>` per field of the argument dataclass `cls` (bool fields are flags; the
    field's `flag()` metadata gives help and type); the command receives them as keyword arguments, so
    `main(**flags)` builds `cls(**flags)`."""
    def decorate(f):
        for field in reversed(dataclasses.fields(cls)):
            kwargs = dict(field.metadata)
            if field.type == "bool":
                kwargs["is_flag"] = True
            elif not kwargs.get("multiple"):
                kwargs.update(default=field.default, show_default=field.default is not None)
            f = click.option(f"--{field.name}", **kwargs)(f)
        return f
    return decorate


def check_output_dir_or_fail(output_dir: str, option: str = "--output_dir") -> Path:
    """The resolved directory, refused when it is a file or cannot be created or written."""
    path = Path(output_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        fail(f"{option} {output_dir!r} is a file, not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not can_create_in(probe):
        fail(f"{option} {output_dir!r} is not writable ({probe} does not allow writing)")
    return path


def can_create_in(folder: Path) -> bool:
    """Whether a directory can be created in `folder`: tried with a probe (removed at once), since
    os.access says yes to root even under /proc or on a read-only mount."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".npt-probe-", dir=folder))
    except OSError:
        return False
    return True


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as safetensors' own error (which wraps the OS error in its text)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    code = re.search(r"(?:os error|code:) (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return code is not None and int(code.group(1)) in (errno.ENOSPC, errno.EDQUOT)
