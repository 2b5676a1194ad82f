"""Consolidation: the per-token modulation of one chosen token written permanently into the base MLP weights (the
rank-1 W_gate update of the gate target, the rank-K W_down update of the down target, the exact target's patches of
W_gate, W_up, W_down and the post-attention norm's scale); refused before any weight changes on bad input."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from npt import NPTLayer, capture, get_adapter_params, is_4bit, modulated_gate, norm_rms, npt_layers
from npt_tools.step import weights_finite

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
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
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
    if isinstance(token_index, bool) or not isinstance(token_index, int) or not -len(real) <= token_index < len(real):
        raise ValueError(f"token_index {token_index!r} is outside the {len(real)} real tokens of sequence 0 "
                         f"(use -{len(real)}..{len(real) - 1})")
    if not weights_finite(get_adapter_params(model)):
        raise ValueError("the adapters are not finite: consolidating them would write NaN/Inf into the base weights")
    return int(real[token_index])


def _add_to_weight(w: torch.Tensor, delta: torch.Tensor) -> None:
    w.copy_((w.float() + delta).to(w.dtype))
