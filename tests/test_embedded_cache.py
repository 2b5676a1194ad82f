"""The embedded model's first conversion (GGUF -> safetensors in $NPT_CACHE, ~20 s, ~0.5 GB) as a user meets it:
interrupted by Ctrl-C, SIGTERM or kill -9, on a full disk, on a read-only one. Every case leaves no temporary
`.smollm2-135m-*` folder once the next run starts, says what to do in one line, and the next run succeeds. The
shared cache (~/.cache/npt) is never touched: NPT_CACHE points at a temporary folder."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import ROOT

pytestmark = pytest.mark.integration  # conversions of the embedded model, debug_nan.py as a process
INSPECT = ["--max_length", "8", "--text", "hello"]  # debug_nan.py on the embedded model: the quickest whole run


def debug_nan(cache, *args, **popen):
    env = {**os.environ, "NPT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: the child never blocks on a full pipe while we poll
    proc = subprocess.Popen([sys.executable, str(ROOT / "debug_nan.py"), *INSPECT, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log, text=True, **popen)
    proc.log = log
    return proc


def stderr_of(proc) -> str:
    proc.wait(timeout=300)
    proc.log.seek(0)
    return proc.log.read()


def leftovers(cache):
    return sorted(p.name for p in cache.glob(".smollm2-135m-*"))


def interrupt_conversion(cache, sig) -> subprocess.Popen:
    """Start a first conversion and send `sig` once its temporary folder exists (the work under way)."""
    proc = debug_nan(cache)
    deadline = time.time() + 120
    while not leftovers(cache) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # into the GGUF reading
    assert proc.poll() is None and leftovers(cache), "the conversion did not start"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_conversion_removes_its_folder(tmp_path, sig):
    proc = interrupt_conversion(tmp_path, sig)
    said = lines(stderr_of(proc))
    assert proc.returncode == 1 and said[-1].startswith("error: aborted"), said
    assert leftovers(tmp_path) == [] and not (tmp_path / "smollm2-135m").exists()


def test_a_killed_conversion_is_cleaned_up_by_the_next_run_which_succeeds(tmp_path):
    proc = interrupt_conversion(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and leftovers(tmp_path), "kill -9 leaves its folder (nothing can stop it)"
    proc = debug_nan(tmp_path)
    err = stderr_of(proc)
    assert proc.returncode == 0, err[-3000:]
    assert leftovers(tmp_path) == [] and (tmp_path / "smollm2-135m" / "config.json").is_file()


def test_a_full_cache_disk_is_one_line_naming_npt_cache(tmpfs):
    cache = tmpfs("100m")  # the converted model takes ~0.52 GB
    proc = debug_nan(cache)
    said = lines(stderr_of(proc))
    assert proc.returncode == 2 and len(said) == 1, said
    assert "no space left on the device" in said[0] and "NPT_CACHE" in said[0] and str(cache) in said[0], said
    assert leftovers(cache) == [] and not (cache / "smollm2-135m").exists()


def test_a_read_only_cache_is_one_line_before_any_conversion(tmpfs):
    cache = tmpfs("1m", "ro")
    started = time.time()
    proc = debug_nan(cache)
    said = lines(stderr_of(proc))
    assert proc.returncode == 2 and len(said) == 1 and "NPT_CACHE" in said[0] and "Read-only" in said[0], said
    assert time.time() - started < 15  # refused before the ~20 s of conversion
