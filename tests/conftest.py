"""Shared fixtures and the two tiers. Tests run offline on CPU; the embedded model is built once per machine.

Tiers: `python -m pytest` runs the fast tier (tiny random models and pure functions); tests marked
`integration` (the embedded smollm2 model, subprocess trainings and CLIs, Triton GPU builds, slow
Triton-interpreter runs) are deselected unless `--full` is given (both tiers) or a `-m` expression
chooses (`-m integration`: that tier alone).
"""
import signal
import subprocess

import pytest

from npt_tools.models import EMBEDDED_MODEL, embedded_model_path, load_base_model
from helpers import tiny_model


def pytest_configure(config):
    """A suite started in the background by a shell without job control inherits SIGINT ignored, and so would every
    CLI it launches (an ignored signal survives exec): the tests that press Ctrl-C on one need it delivered."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the integration tier too (tests marked integration: the embedded model, "
                          "subprocesses, Triton GPU builds); without it (and without -m) they are deselected")


def _integration_deselected(config) -> bool:
    return not config.getoption("--full") and not config.option.markexpr


def pytest_report_header(config):
    if _integration_deselected(config):
        return "tier: fast (integration tests deselected: --full runs both tiers, -m integration only that one)"
    return "tier: full" if config.getoption("--full") else f"tier: -m {config.option.markexpr!r}"


def pytest_collection_modifyitems(config, items):
    if not _integration_deselected(config):
        return
    fast, integration = [], []
    for item in items:
        (integration if item.get_closest_marker("integration") else fast).append(item)
    if integration:
        config.hook.pytest_deselected(items=integration)
        items[:] = fast


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread(request):
    """One intra-op thread for the modules that ask (ONE_TORCH_THREAD = True): on a shared 2-core machine,
    spinning OpenMP threads of several processes slow a small forward pass down by 10-50x."""
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded smollm2-135m, unconverted: copy before converting."""
    return load_base_model(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, d_model 64) saved with the embedded model's tokenizer: a local
    --model_name for fast CLI runs of pretrain_npt_safe.py."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    model = tiny_model("llama", layers=2, hidden=64, ffn=128, seed=0, vocab_size=len(tokenizer),
                       max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny random Llama in memory (3 layers, d_model 32, vocabulary 97): the base of the loss and
    evaluation tests (helpers.npt_model converts copies of it)."""
    return tiny_model("llama", layers=3, hidden=32, ffn=64, seed=0, vocab_size=97, pad_token_id=None)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (unmounted after the test); the test is skipped where mounting
    needs a root this process is not."""
    mounted = []

    def mount(size, *options):
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(d)],
                          capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root; test_reliability's ENOSPC test covers saving in-process")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)
