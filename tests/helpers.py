"""Plain helpers shared by the test modules (fixtures live in conftest.py): the one tiny random decoder
builder, float64 comparisons, the naive equivalence references, and the trainer-subprocess helpers.
Test modules import from here, never from each other."""
import copy
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import npt

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- tiny random decoders
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def tiny_config(arch="llama", **overrides):
    """A tiny Llama / Mistral / Qwen2 config: TINY with `overrides` (transformers' field names)."""
    return ARCHS[arch][0](**{**TINY, **overrides})


def tiny_model(arch="llama", layers=3, hidden=64, ffn=96, seed=0, **overrides):
    """A tiny random decoder in eval mode, its weights drawn after torch.manual_seed(seed)."""
    config = tiny_config(arch, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn, **overrides)
    torch.manual_seed(seed)
    return ARCHS[arch][1](config).eval()


def seeded_deltas(model, names, scale=0.05, seed=7) -> dict:
    """fp32 deltas of the named base parameters (npt_tools.edit names), drawn from a fixed seed: a stand-in for
    a consolidation method in the edit artifact's tests."""
    from npt_tools.edit import base_parameters

    gen = torch.Generator().manual_seed(seed)
    params = base_parameters(model)
    return {n: scale * torch.randn(params[n].shape, generator=gen) for n in names}


def parameter_snapshot(model) -> dict:
    """A copy of every parameter (tied ones under each name), for bitwise before / after checks."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def assert_parameters_unchanged(model, before):
    changed = [n for n, p in model.named_parameters(remove_duplicate=False) if not torch.equal(p, before[n])]
    assert not changed, f"{len(changed)} parameters changed, e.g. {changed[0]}"


def randomize_adapters(model, std=0.3):
    with torch.no_grad():
        for p in npt.get_adapter_params(model):
            p.normal_(std=std)


# ----------------------------------------------------------------------------- comparisons
def rel_err(x, ref):
    """max |x - ref| / max |ref| in float64; x and ref must have one shape and x must be finite."""
    x, ref = x.detach().double(), ref.detach().double()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert torch.isfinite(x).all(), "non-finite values (unwritten output?)"
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_same(a, b, what="value"):
    """a and b bitwise equal, recursively through dicts, lists and tuples (tensors: torch.equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b), f"{what} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: keys changed"
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a is b or a == b, f"{what} changed: {a!r} -> {b!r}"


def rms_norm64(x, norm):
    w = norm.weight.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * w


# ----------------------------------------------------------------------------- NPT layers' inputs and outputs
def capture_layer_io(model):
    """Per NPT layer: its input h, its attention output and its output, from one forward."""
    records, handles = {}, []
    for layer in npt.npt_layers(model):
        rec = records.setdefault(layer.layer_idx, {})
        handles.append(layer.register_forward_hook(
            lambda m, args, kwargs, out, rec=rec: rec.update(h=(args[0] if args else kwargs["hidden_states"]),
                                                             out=out), with_kwargs=True))
        handles.append(layer.layer.self_attn.register_forward_hook(
            lambda m, args, out, rec=rec: rec.update(attn=out[0])))
    return records, handles


def padded_npt_forward(arch, config):
    """A tiny model converted with `config` and random adapters, run on a left-padded batch:
    (model, per-layer records of capture_layer_io, attention mask)."""
    model = npt.convert_to_npt(tiny_model(arch), config)
    randomize_adapters(model)
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second sequence
    records, handles = capture_layer_io(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return model, records, mask


# ----------------------------------------------------------------------------- naive equivalence references
LAYERS = [0, 2]  # of 3: a gap, and the last layer (compared before the final norm)
LAMBDA = 0.3


def npt_model(base, modulation="both"):
    """A copy of `base` converted on LAYERS with random, non-zero adapters (every branch matters)."""
    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(modulation_target="gate",
                                                                  rank=4, modulation=modulation, layers=LAYERS))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in npt.get_adapter_params(model):
            p.normal_(0, 0.3)
    return model


def make_batch(lengths, seed=0, total=None, vocab=97):
    """Right-padded batch of random sequences with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i] = torch.randint(1, vocab, (total,), generator=g)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def ref_nmse(s, t, mask):
    s = s / s.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    per_token = ((s - t) ** 2).sum(-1)
    m = mask.float()
    return (per_token * m).sum() / m.sum()


def ref_update64(s, t, h, mask):
    """Float64, per real token |s - t|^2 / |t - h|^2: the share of the layer's update missed."""
    s, t, h = s.double(), t.double(), h.double()
    per_token = (s - t).pow(2).sum(-1) / (t - h).pow(2).sum(-1)
    return per_token[mask.bool()].mean()


def ref_update(s, t, h, mask):
    return ref_update64(s, t, h, mask).float()


def reference(loss, s, t, h, mask):
    return ref_update(s, t, h, mask) if loss == "update" else ref_nmse(s, t, mask)


def layer_outputs(model, batch):
    """Per-layer outputs from output_hidden_states, the last one taken before the final norm."""
    pre_norm = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: pre_norm.__setitem__("x", a[0]))
    try:
        hs = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        h.remove()
    n = len(model.model.layers)
    return [hs[i] for i in range(n + 1)][:n] + [None], [hs[i + 1] if i < n - 1 else pre_norm["x"] for i in range(n)]


def naive_layerwise(model, batch, loss="cosine"):
    layers = {layer.layer_idx: layer for layer in npt.npt_layers(model)}
    mask = batch["attention_mask"]
    with npt.npt_disabled(model), torch.no_grad():
        inputs, teacher = layer_outputs(model, batch)
    mses, regs = [], []
    for i, layer in layers.items():
        for other in layers.values():  # only layer i is NPT: its input is exactly the teacher's
            other.npt_enabled = other is layer
        try:
            _, student = layer_outputs(model, batch)
        finally:
            for other in layers.values():
                other.npt_enabled = True
        mses.append(reference(loss, student[i], teacher[i], inputs[i], mask))
        regs.append((layer.last_reg * mask).sum() / mask.sum())
    mse, reg = torch.stack(mses).mean(), torch.stack(regs).mean()
    return mse + LAMBDA * reg, mse, reg


def naive_end_to_end(model, batch, loss="cosine"):
    mask = batch["attention_mask"]
    with npt.npt_disabled(model), torch.no_grad():
        inputs, teacher = layer_outputs(model, batch)
    _, student = layer_outputs(model, batch)
    mse = torch.stack([reference(loss, student[i], teacher[i], inputs[i], mask) for i in LAYERS]).mean()
    layers = npt.npt_layers(model)
    reg = torch.stack([(layer.last_reg * mask).sum() / mask.sum() for layer in layers]).mean()
    return mse + LAMBDA * reg, mse, reg


# ----------------------------------------------------------------------------- pretrain_npt_safe.py as a process
SCRIPT = str(ROOT / "pretrain_npt_safe.py")
FAST = ["--max_length", "32", "--batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
        "--warmup_steps", "2", "--log_steps", "1", "--save_steps", "0", "--seed", "3"]
GATE = ["--modulation_target", "gate", "--objective", "layerwise"]  # the seed's form, where a test is about it


def run(*args, env=None, timeout=300, launcher=()):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *launcher, SCRIPT, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapters(path):
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def assert_bitwise(a, b):
    a, b = adapters(a), adapters(b)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} adapter tensors differ, e.g. {diff[0]}"


def assert_loadable(ckpt, model_dir):
    """A checkpoint directory loads: adapters onto a fresh model, trainer state, optimizer, RNG."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    npt.load_adapters(model, ckpt)
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    assert isinstance(state["step"], int) and len(state["position"]) == 3
    load_file(str(Path(ckpt) / "optimizer.safetensors"))
    assert load_file(str(Path(ckpt) / "rng_state.safetensors"))["torch"].dtype == torch.uint8
    return state


def run_in_terminal(args, typed: bytes = b"", env: dict | None = None, timeout=300) -> tuple[int, str]:
    """The trainer under a pseudo-terminal (so transformers could prompt), `typed` waiting in its input;
    (exit code, what the terminal showed, the typed echo included)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the trainer, its stdin/stdout/stderr the terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, SCRIPT, *map(str, args)], {**os.environ, **(env or {})})
    out, deadline = b"", time.time() + timeout
    os.write(fd, typed)
    while time.time() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")
