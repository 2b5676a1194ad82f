"""Neuro-Plastic Transformer (NPT) layers for Hugging Face decoder models: config, adapter, layer, conversion, the
teacher toggle, capture, save/load, consolidation. The attention output a modulates the MLP through z = A_proj(a):
    gate:   h' = h + down(silu(g) * up),  g = gate * (0.5 + sigmoid(z B_mult^T)) + add_scale * z B_add^T
    down:   h' = h + (W_down + sum_k v_k u_k^T)(silu(gate) * up),  v = B_down z in K vectors, u_k learned
    exact:  a_hat = mu + B A_proj(a - mu),  h' = h + a_hat + MLP(LN2(h + a_hat)),  an identity at rank d_model
    (per-token rank-1 patches of W_gate, W_up, W_down and the norm's scale: docs/CONTRACT.md section 1b)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

_KERNELS = Path(__file__).with_name("kernels")  # in a checkout; installed, the package npt_kernels
if "npt_kernels" not in sys.modules and (_KERNELS / "modulated_swiglu.py").is_file():  # not `kernels`: that is HF's
    sys.modules["npt_kernels"] = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(
        "npt_kernels", None, is_package=True))
    sys.modules["npt_kernels"].__path__ = [str(_KERNELS)]
from npt_kernels.modulated_swiglu import modulated_gate, modulated_swiglu, modulation_factor  # noqa: E402

__all__ = ["NPTConfig", "NPTAdapter", "NPTLayer", "convert_to_npt", "convert_llama_to_npt", "config_from_dict",
           "get_adapter_params", "npt_layers", "npt_disabled", "set_kernel", "modulation_factor", "modulated_gate",
           "regularization", "masked_mean", "capture", "CAPTURE_NAMES", "run_captured", "norm_rms", "TARGETS",
           "is_4bit", "save_adapters", "load_adapters", "consolidate"]

MODULATIONS = ("both", "additive", "multiplicative")
TARGETS = ("gate", "down", "gate+down", "exact")
CONFIG_NAME = "npt_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class NPTConfig:
    rank: int = 16
    modulation: str = "both"  # both | additive | multiplicative
    layers: str | list[int] = "all"  # all | upper_half | lower_half | "8-15" | "1,3,5" | [ints]
    add_scale: float = 0.1
    modulation_target: str = "gate"  # gate | down | gate+down | exact
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
        if not _is_number(self.add_scale) or not math.isfinite(self.add_scale):
            raise ValueError(f"add_scale must be a finite number, got {self.add_scale!r}")
        if not isinstance(self.layers, (str, list, tuple)) or (
                not isinstance(self.layers, str) and not all(_is_int(i) for i in self.layers)):
            raise ValueError(f"layers must be a string or a list of integers, got {self.layers!r}")

    @property
    def additive(self) -> bool:
        return self.modulation in ("both", "additive") and "gate" in self.modulation_target

    @property
    def multiplicative(self) -> bool:
        return self.modulation in ("both", "multiplicative") and "gate" in self.modulation_target

    @property
    def down(self) -> bool:
        return "down" in self.modulation_target

    @property
    def exact(self) -> bool:
        return self.modulation_target == "exact"

    def layer_indices(self, num_layers: int) -> list[int]:
        """The 0-based decoder layers this config converts, validated against `num_layers`."""
        spec, half = self.layers, num_layers // 2
        named = {"all": (0, num_layers), "upper_half": (half, num_layers), "lower_half": (0, half)}
        if isinstance(spec, (list, tuple)):
            idx = [int(i) for i in spec]
        elif spec in named:
            idx = list(range(*named[spec]))
        elif isinstance(spec, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", spec):
            lo, hi = (int(s) for s in spec.split("-"))
            if lo > hi:
                raise ValueError(f"layer range {spec!r} is empty: write low-high, e.g. 8-15")
            if hi >= num_layers:  # before building the list: 0-10000000000 must not exhaust memory
                raise ValueError(f"layers {spec!r} reach layer {hi} but the model has layers 0-{num_layers - 1}")
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

    def check_compatible(self, other: "NPTConfig", num_layers: int, what: str = "the adapters") -> None:
        """Adapters made under `other` fit NPT layers made under this config (on a model of `num_layers`
        layers) only if these agree; otherwise a ValueError naming every field that differs."""
        mine, theirs = self._fingerprint(num_layers), other._fingerprint(num_layers)
        diff = [f"{name} is {theirs[name]!r} there, {mine[name]!r} here" for name in mine if mine[name] != theirs[name]]
        if diff:
            raise ValueError(f"{what} do not fit this model's NPT layers: {'; '.join(diff)}")

    def _fingerprint(self, num_layers: int) -> dict:
        return {"rank": self.rank, "modulation": self.modulation, "add_scale": self.add_scale,
                "modulation_target": self.modulation_target, "down_rank": self.down_rank,
                "layers": self.layer_indices(num_layers)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NPTConfig":
        """From a saved npt_config.json; a ValueError naming the field that is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"an NPT config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- adapter
class NPTAdapter(nn.Module):
    """Low-rank code z = A_proj(attn) (fp32) and its expansions: B_add, B_mult (F, r) modulate the gate; B_down
    (K*D, r) gives the per-token v_k and down_u (K, F) the static u_k of dW_down = sum_k v_k u_k^T; for exact,
    z = A_proj(attn - mu), a_hat = mu + B z (0 until the closed-form start sets mu, A_proj, B)."""

    def __init__(self, d_model: int, d_ffn: int, config: NPTConfig):
        super().__init__()
        r = config.rank
        self.A_proj = nn.Linear(d_model, r, bias=False)
        nn.init.normal_(self.A_proj.weight, std=0.02)
        self.B_add = self.B_mult = self.B_down = self.down_u = self.B = self.mu = None
        if config.exact:
            self.B = nn.Linear(r, d_model, bias=False)
            nn.init.zeros_(self.B.weight)
            self.mu = nn.Parameter(torch.zeros(d_model))
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
        return tuple(None if b is None else b.weight for b in (self.B_add, self.B_mult))

    def down_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """v = the per-token output vectors v_k of dW_down, from the code z."""
        return self.B_down(z).unflatten(-1, (self.down_u.shape[0], -1))  # (..., K, D)

    def code(self, attn: torch.Tensor) -> torch.Tensor:
        """z = A_proj(attn - mu) for the exact target (fp32)."""
        return self.A_proj(attn.float() - self.mu)  # (..., r)

    def attention_estimate(self, z: torch.Tensor) -> torch.Tensor:
        """a_hat = mu + B z: the rank-r estimate of the attention output (fp32)."""
        return self.mu + self.B(z)  # (..., D)


# ----------------------------------------------------------------------------- layer
class NPTLayer(nn.Module):
    """Wraps a decoder layer; runs it as NPT, or exactly as the original when disabled. Follows transformers'
    decoder-layer contract (v5: returns a tensor), so `model(...)`, `generate` and the KV cache work unchanged;
    an instance is also one of the wrapped class (e.g. `NPTLlamaDecoderLayer`), for what transformers hooks by class."""

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

    def modulated_mlp(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h' = h + down(silu(g) * up); the MLP reads LN2(h), not LN2(h + attn). For the exact target,
        exact_mlp."""
        if self.config.exact:
            return self.exact_mlp(hidden_states, attn)
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
            terms.append(v.float().square().mean((-2, -1)))  # fp32: under fp16 autocast v is fp16
        self.last_reg = sum(terms) / len(terms)  # (B, T)
        return hidden_states + out.to(hidden_states.dtype)

    def exact_mlp(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """y = h + a_hat + MLP(LN2(h + a_hat)), a_hat = mu + B A_proj(a - mu): the identity's per-token patches
        (which consolidate writes), computed as the original layer computes it, in the base model's dtype, so at
        full rank with the closed-form start it is the original layer."""
        ad = self.adapter
        z = ad.code(attn)  # (B, T, r) fp32
        residual = hidden_states + ad.attention_estimate(z).to(hidden_states.dtype)  # h + a_hat
        self.last_reg = z.new_zeros(z.shape[:-1])  # (B, T): the code reproduces the attention, nothing to shrink
        return residual + self.layer.mlp(self.layer.post_attention_layernorm(residual))

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
        return (f"layer_idx={self.layer_idx}, rank={c.rank}" + ("" if c.exact else f", modulation={c.modulation}")
                + f", target={c.modulation_target}" + (f", down_rank={c.down_rank}" if c.down else ""))


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


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (what load_base_model(use_quantization=True) makes)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def keep_4bit_differentiable(model: nn.Module) -> None:
    """bitsandbytes (0.50, CPU with AVX512-BF16) repacks 4-bit weights on the first no-grad eval forward into a
    path with no autograd (adapter gradients would be wrong): turned off for good at conversion, undone if done."""
    for m in filter(is_4bit, model.modules()):
        m.support_avx512bf16_for_cpu = False
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)


# the seed's adapter_config keys: modulation_type names -> NPTConfig.modulation
SEED_MODULATIONS = {"both": "both", "hybrid": "both", "additive": "additive", "add": "additive",
                    "multiplicative": "multiplicative", "mult": "multiplicative", "multiply": "multiplicative"}
SEED_KEYS = ("r", "modulation_type", "consolidation_alpha", "d_model", "d_ffn", "compute_dtype")


def config_from_dict(d: dict, d_model: int, d_ffn: int) -> NPTConfig:
    """An NPTConfig from the seed's adapter_config dict (r -> rank, modulation_type -> modulation; d_model, d_ffn
    checked; compute_dtype ignored: adapters compute in fp32; consolidation_alpha kept on the object, not a field)
    or NPTConfig's own field names; any other key is refused by name."""
    fields = {f.name for f in dataclasses.fields(NPTConfig)}
    unknown = [k for k in d if k not in fields and k not in SEED_KEYS]
    if unknown:
        raise ValueError(f"unknown adapter config key(s) {', '.join(map(repr, unknown))}: use "
                         f"{', '.join(SEED_KEYS)} (the seed's names) or {', '.join(sorted(fields))}")
    for seed_key, ours, given in (("d_model", "d_model", d_model), ("d_ffn", "d_ffn", d_ffn)):
        if seed_key in d and d[seed_key] != given:
            raise ValueError(f"adapter config {seed_key}={d[seed_key]!r} but the model's {ours} is {given}")
    kwargs = {k: v for k, v in d.items() if k in fields}
    if "modulation_type" in d and d["modulation_type"] not in SEED_MODULATIONS:
        raise ValueError(f"modulation_type {d['modulation_type']!r} not understood: use one of "
                         f"{', '.join(SEED_MODULATIONS)}")
    seeds = (("r", "rank", d.get("r")),
             ("modulation_type", "modulation", SEED_MODULATIONS.get(d.get("modulation_type"))))
    for seed_key, ours, value in (t for t in seeds if t[0] in d):
        if ours in kwargs and kwargs[ours] != value:
            raise ValueError(f"adapter config gives both {seed_key}={d[seed_key]!r} and {ours}={kwargs[ours]!r}: "
                             "give one of them")
        kwargs[ours] = value
    config = NPTConfig(**kwargs)
    config.consolidation_alpha = float(d.get("consolidation_alpha", 1.0))  # not a field: never saved or compared
    return config


def convert_to_npt(model: nn.Module, config: NPTConfig | dict | None = None) -> nn.Module:
    """Wrap the selected decoder layers in NPTLayer, in place; freezes every base parameter. `config` may
    also be the seed's adapter_config dict (config_from_dict)."""
    if npt_layers(model):
        raise ValueError("model is already converted to NPT")
    layers = decoder_layers(model)
    if isinstance(config, dict):
        gate = layers[0].mlp.gate_proj
        config = config_from_dict(config, gate.in_features, gate.out_features)
    config = config or NPTConfig()
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
    keep_4bit_differentiable(model)
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


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens; padding never counts, even where its value is not finite."""
    if mask is None:
        return per_token.mean()
    real = mask[..., -per_token.shape[-1]:].bool()  # with a KV cache: the new tokens
    return torch.where(real, per_token, 0).sum() / real.sum().clamp_min(1)


def norm_rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """rms(x) as an RMSNorm module computes it (its eps inside the root), in fp32, over the last dimension."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return (x.float().square().mean(-1) + eps).sqrt()


# ----------------------------------------------------------------------------- capture
_CAPTURE_MODULES = {  # name -> the module (under an NPTLayer) whose output it is
    "input_norm": "layer.input_layernorm",  # LN1(h)
    "attn": "layer.self_attn",  # SelfAttn(LN1(h))
    "mlp_input": "layer.post_attention_layernorm",  # x = LN2(h) (NPT) or LN2(h + attn) (disabled)
    "gate": "layer.mlp.gate_proj",  # W_gate x, before modulation
    "up": "layer.mlp.up_proj",
    "z": "adapter.A_proj",  # low-rank code (NPT only)
    "mlp_out": "layer.mlp.down_proj",  # down(silu(g) * up)
    "output": "",  # the layer's output h'
}
CAPTURE_NAMES = ("input", *_CAPTURE_MODULES)  # "input": the layer's input h


@contextlib.contextmanager
def capture(model: nn.Module, names=CAPTURE_NAMES, edit=None, keep: bool = True):
    """Record named per-layer tensors (CAPTURE_NAMES) of the forwards run inside: yields {layer_idx: {name: tensor}}.
    `edit(layer_idx, name, tensor)` sees each as it is produced; a tensor it returns replaces that module's output
    (and is recorded; an input is never replaced). keep=False stores nothing. Hooks are removed on exit."""
    unknown = sorted(set(names) - set(CAPTURE_NAMES))
    if unknown:
        raise ValueError(f"cannot capture {unknown}: choose from {', '.join(CAPTURE_NAMES)}")
    records = {}
    with contextlib.ExitStack() as stack:
        for layer in npt_layers(model):
            rec = records[layer.layer_idx] = {}
            for name in names:
                if name == "input":
                    handle = layer.register_forward_pre_hook(
                        functools.partial(_record_input, rec, keep, edit, layer.layer_idx), with_kwargs=True)
                else:
                    hook = functools.partial(_record_output, rec, keep, edit, layer.layer_idx, name)
                    handle = layer.get_submodule(_CAPTURE_MODULES[name]).register_forward_hook(hook)
                stack.callback(handle.remove)
        yield records


def _record_input(rec, keep, edit, layer_idx, module, args, kwargs):
    tensor = args[0] if args else kwargs["hidden_states"]
    if edit is not None:
        edit(layer_idx, "input", tensor)  # observed only: a layer's input is not replaced
    if keep:
        rec["input"] = tensor


def _record_output(rec, keep, edit, layer_idx, name, module, args, out):
    tensor = out[0] if isinstance(out, (tuple, list)) else out
    edited = edit(layer_idx, name, tensor) if edit is not None else None
    if keep:
        rec[name] = tensor if edited is None else edited
    if edited is not None:
        return (edited, *out[1:]) if isinstance(out, (tuple, list)) else edited


def run_captured(model: nn.Module, batch: dict, names=("input", "output"), teacher: bool = False,
                 logits: bool = False):
    """One forward capturing `names` of every NPT layer: (records, logits or None). teacher=True: the original layers
    (npt_disabled), no gradients; without `logits` the forward stops after the last NPT layer."""
    ctx = npt_disabled(model) if teacher else contextlib.nullcontext()
    grad = torch.no_grad() if teacher else contextlib.nullcontext()
    stop = contextlib.nullcontext() if logits else _stop_after_last_npt_layer(model)
    with capture(model, names) as records, ctx, grad, stop:
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward:  # without logits, layers after the last NPT layer are never run
            out = None
    return records, (out.logits if logits else None)


class _StopForward(Exception):
    pass


def _raise_stop(module, args, output):
    raise _StopForward


@contextlib.contextmanager
def _stop_after_last_npt_layer(model: nn.Module):
    """Ends a forward once the last NPT layer has run (its captures, registered before, have fired)."""
    layers = npt_layers(model)
    with contextlib.ExitStack() as stack:
        if layers:
            stack.callback(max(layers, key=lambda la: la.layer_idx).register_forward_hook(_raise_stop).remove)
        yield


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
    """path/npt_config.json as a dict, checked: a ValueError naming the file and the malformed field."""
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"no NPT adapters at {path}: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{f} must hold a JSON object, not a {type(meta).__name__}: the checkpoint is corrupt")
    if "num_layers" in meta and (not _is_int(meta["num_layers"]) or meta["num_layers"] < 1):
        raise ValueError(f"{f}: num_layers must be a positive integer, got {meta['num_layers']!r}")
    try:
        NPTConfig.from_dict(meta)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f}: {e}") from None
    return meta


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
    model.npt_config.check_compatible(config, num_layers, f"adapters at {path}")
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
@torch.no_grad()
def consolidate(model: nn.Module, input_ids: torch.Tensor, token_index: int = -1, alpha: float = 1.0,
                attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Permanent update: add to each NPT layer's W_gate the rank-1 matrix that reproduces the chosen token's
    modulation, dW = alpha (g_t - gate_t) x_t^T / ||x_t||^2, x_t = LN2(h_t); for the down target, alpha sum_k v_k
    u_k^T of that token to W_down (exact); for exact, the token's patches of W_gate, W_up, W_down and the norm scale.
    `token_index` counts the real tokens of sequence 0 (the default -1: the last real one under right padding).
    Every patch is computed first: a patch or patched weight not finite in the weight's dtype, or non-finite logits
    of the patched model on input_ids, is a ValueError and no weight changes.
    Returns {layer_idx: dW_gate} ({layer_idx: dW_down} for down; {layer_idx: {gate, up, down, norm_scale}} for exact)."""
    token_index = _consolidation_position(model, input_ids, token_index, alpha, attention_mask)
    layers = npt_layers(model)
    if any(is_4bit(w) or not torch.is_floating_point(w.weight) for layer in layers
           for w in (layer.layer.mlp.gate_proj, layer.layer.mlp.up_proj, layer.layer.mlp.down_proj)):
        raise ValueError("consolidate needs full-precision MLP weights; this model is quantized (4-bit): reload it "
                         "without use_quantization")
    names = ("input", "gate", "up", "z") if model.npt_config.exact else ("mlp_input", "gate", "z")
    with capture(model, names) as captures:  # what every NPT layer's updates need, one forward
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    updates, edits = {}, []  # edits: (module, patch, multiplies), applied once every one is checked
    for layer in layers:
        c = {k: v[0, token_index] for k, v in captures[layer.layer_idx].items()}
        ad, mlp = layer.adapter, layer.layer.mlp
        if layer.config.exact:
            updates[layer.layer_idx] = _consolidate_exact(layer, c, alpha, edits)
            continue
        if ad.down_u is not None:  # W_down's patch does not depend on the input
            updates[layer.layer_idx] = alpha * ad.down_vectors(c["z"]).t() @ ad.down_u  # (D, K) @ (K, F)
            edits.append((mlp.down_proj, updates[layer.layer_idx], False))
        if ad.B_add is not None or ad.B_mult is not None:
            x, gate = c["mlp_input"].float(), c["gate"].float()  # (D,), (F,)
            g = modulated_gate(gate, c["z"], *ad.weights(), layer.config.add_scale)[0]
            updates[layer.layer_idx] = alpha * torch.outer(g - gate, x) / x.square().sum()  # (F, D)
            edits.append((mlp.gate_proj, updates[layer.layer_idx], False))
    _apply_if_finite(model, edits, alpha, input_ids, attention_mask)
    return updates


def _consolidate_exact(layer: NPTLayer, c: dict[str, torch.Tensor], alpha: float, edits: list) -> dict:
    """One token's exact patches, so that the plain layer h + MLP(LN2(h)) gives the exact layer's output at alpha 1:
    W_gate, W_up += alpha (W (w a_hat) / rms(h)) x^T / |x|^2, x = LN2(h); W_down += alpha a_hat act^T / |act|^2; the
    norm's weight w *= 1 + alpha (s - 1), s = rms(h) / rms(h + a_hat)."""
    dec, norm = layer.layer, layer.layer.post_attention_layernorm
    h = c["input"].float()  # (D,)
    a_hat = layer.adapter.attention_estimate(c["z"].float())  # (D,)
    w = norm.weight.float()
    x, direction = w * h / norm_rms(norm, h), w * a_hat / norm_rms(norm, h)  # LN2(h); what a_hat adds to it
    act = torch.nn.functional.silu(c["gate"].float()) * c["up"].float()  # (F,)
    s = norm_rms(norm, h) / norm_rms(norm, h + a_hat)
    proj = {k: getattr(dec.mlp, f"{k}_proj") for k in ("gate", "up", "down")}
    patches = {k: alpha * torch.outer(proj[k].weight.float() @ direction, x) / x.square().sum() for k in ("gate", "up")}
    patches |= {"down": alpha * torch.outer(a_hat, act) / act.square().sum().clamp_min(torch.finfo(torch.float32).tiny),
                "norm_scale": 1 + alpha * (s - 1)}
    edits += [(proj[k], patches[k], False) for k in proj] + [(norm, patches["norm_scale"], True)]
    return patches


def _apply_if_finite(model: nn.Module, edits: list, alpha: float, input_ids, attention_mask) -> None:
    """Write every (module, patch, multiplies) edit, or none: each patch and patched weight finite in the weight's
    dtype, and the logits of the patched plain model on input_ids finite (finite weights of 1e37 overflow them)."""
    names, new = {id(p): n for n, p in model.named_parameters()}, {}
    for module, patch, multiplies in edits:
        w, name = module.weight, names[id(module.weight)]
        new[name] = (w.float() * patch if multiplies else w.float() + patch).to(w.dtype)
        if not (torch.isfinite(patch.to(w.dtype)).all() and torch.isfinite(new[name]).all()):
            raise ValueError(f"alpha {alpha:g} overflows {name} in {w.dtype}: use a smaller alpha (nothing changed)")
    with npt_disabled(model):
        logits = torch.func.functional_call(model, new, (), {"input_ids": input_ids, "attention_mask": attention_mask,
                                                             "use_cache": False}).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"alpha {alpha:g} overflows the patched model's logits: use a smaller alpha (nothing changed)")
    for module, _, _ in edits:
        module.weight.copy_(new.pop(names[id(module.weight)]))


def _consolidation_position(model: nn.Module, input_ids, token_index, alpha, attention_mask) -> int:
    """consolidate's inputs checked before any weight changes; the position of sequence 0's token_index-th real token."""
    if not npt_layers(model):
        raise ValueError("model has no NPT layers: convert_to_npt first")
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty 2-D tensor (batch, tokens), got {shape}")
    if attention_mask is None:
        real = torch.arange(input_ids.shape[1])
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}")
    else:
        real = attention_mask[0].nonzero().flatten().cpu()  # positions of sequence 0's real tokens
    if not len(real):
        raise ValueError("attention_mask marks no real token in sequence 0: there is no token to consolidate")
    if not _is_int(token_index) or not -len(real) <= token_index < len(real):
        raise ValueError(f"token_index {token_index!r} is outside the {len(real)} real tokens of sequence 0 "
                         f"(use -{len(real)}..{len(real) - 1})")
    if not all(bool(torch.isfinite(p).all()) for p in get_adapter_params(model)):
        raise ValueError("the adapters are not finite: consolidating them would write NaN/Inf into the base weights")
    return int(real[token_index])

