"""Baseline knowledge editors for the plasticity benchmark. Each returns the edit as deltas of the base parameters,
keyed by their names in the Hugging Face model (fp32), and leaves the model as it found it; `edited` applies such
deltas for the length of a block and puts every weight back bitwise.

finetune_edit: plain fine-tuning on the context's tokens, what a user would try first (Adam, next-token loss on
every token of the context, on the MLP weights of a band of layers or on all weights)."""
from __future__ import annotations

import torch
import torch.nn as nn

FINETUNE_PARAMS = ("mlp", "all")


def finetune_parameters(model: nn.Module, params: str = "mlp", layers: list[int] | None = None) -> dict[str, nn.Parameter]:
    """{name: parameter} that fine-tuning changes: "mlp", the MLP weights (gate, up, down) of `layers` (None: every
    layer); "all", every parameter (`layers` unused)."""
    if params not in FINETUNE_PARAMS:
        raise ValueError(f"params must be one of {', '.join(FINETUNE_PARAMS)}, got {params!r}")
    named = dict(model.named_parameters())
    if params == "all":
        return named
    n_layers = model.config.num_hidden_layers
    chosen = range(n_layers) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {n_layers} layers")
    return {n: p for n, p in named.items()
            if any(n.startswith(f"model.layers.{i}.mlp.") for i in chosen) and n.endswith(".weight")}


def finetune_edit(model: nn.Module, tokenizer, context: str, steps: int = 10, lr: float = 3e-5, params: str = "mlp",
                  layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Adam for `steps` steps at learning rate `lr` on the next-token loss of every token of `context`, changing
    finetune_parameters(model, params, layers); returns {name: new - old} (fp32) and restores the model (weights
    bitwise, requires_grad, train/eval mode)."""
    chosen = finetune_parameters(model, params, layers)
    original = {n: p.detach().clone() for n, p in chosen.items()}
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(context)["input_ids"]], device=device)  # (1, T)
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
        model.eval()  # no dropout: the edit is deterministic
        opt = torch.optim.Adam(chosen.values(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
        return {n: (p.detach().float() - original[n].float()) for n, p in chosen.items()}
    finally:
        with torch.no_grad():
            for n, p in chosen.items():
                p.copy_(original[n])
                p.grad = None
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags[n])
        model.train(was_training)
