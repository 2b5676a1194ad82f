#!/usr/bin/env python
"""Forward-pass inspection of an NPT model: where do NaN / Inf values first appear?

Runs one forward pass and reports, for every NPT layer (0-based, as in model.model.layers)
and stage, min / max / mean |x| (over the finite entries of the real, non-padding tokens)
and the NaN and Inf counts:

    input_norm      LN1(h)                               npt.capture "input_norm"
    attn_out        SelfAttn(LN1(h))                     npt.capture "attn"
    low_rank        z = A_proj(attn) (exact: A_proj(attn - mu))  npt.capture "z"
    a_hat           mu + B z, the attention as the exact target sees it   adapter.attention_estimate (exact)
    norm_scale      s = rms(h) / rms(h + a_hat), the norm-scale patch      from the captured input (exact)
    delta_add       a = B_add(z)                         adapter.B_add on the captured z
    delta_mult      modulation_factor(B_mult(z))         adapter.B_mult + npt.modulation_factor
    modulated_gate  g (docs/CONTRACT.md section 1)       npt.modulated_gate on the captured gate, z
    delta_down      v_k of dW_down = sum_k v_k u_k^T     adapter.down_vectors on the captured z (down target)
    mlp_out         down(silu(g) * up)                   npt.capture "mlp_out" (W_down's own part)
    layer_out       h' = h + mlp_out (+ the down update)  npt.capture "output"

Nothing of the layer is re-implemented: the stages are the wrapped modules' own outputs, and
the four that the fused kernel never materializes are recomputed from the captured z and
gate with the adapter's own modules and the kernels' reference math. Also prints the seed's
loss-computation check (standard vs normalized MSE) and the old / new factor ranges.

Exit code 1 when a non-finite value was found, 0 otherwise, 2 on bad input.

--json FILE writes the printed report as one object:
    model            {name, precision, checkpoint, npt_config, npt_layers}
    texts, num_tokens   the inputs (num_tokens counts real tokens)
    inject_nan       null | {layer, stage, where}
    stages           the stage names in forward order
    layers           [{layer, stages: {stage: null (branch off) |
                                       {min, max, mean_abs, nan, inf, numel}}}]   in layer order
    logits           {min, max, mean_abs, nan, inf, numel}
    first_nonfinite  null | {layer, stage}  (layer null and stage "logits" if only the logits are)
    loss_check       {rows: [{scale, standard_mse, normalized_mse}], normalized_bounded}
    factor_ranges    {m: {min, max, points}, old / new: {formula, min, max, at_zero, zeros}}
min / max / mean_abs cover the finite entries only (null when there are none).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

import npt
from npt_tools.cli import can_create_in, command, fail, flag, options
from npt_tools.models import (ModelArgs, check_length_or_fail, load_model_config_or_fail, load_model_or_fail,
                              precision_name)
from npt_tools.objective import normalized_mse

STAGES = ("input_norm", "attn_out", "low_rank", "a_hat", "norm_scale", "delta_add", "delta_mult", "modulated_gate",
          "delta_down", "mlp_out", "layer_out")
DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
)
LOSS_SCALES = (1.0, 1e2, 1e4)
FACTOR_SWEEP = (-20.0, 20.0, 4001)  # m from, to, points


def tanh_factor(m: torch.Tensor) -> torch.Tensor:
    """The old multiplicative factor: reaches 0 at tanh(m) = -1, which zeroed activations (the NaNs)."""
    return 1 + torch.tanh(m)


# ----------------------------------------------------------------------------- statistics
def tensor_stats(x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """min / max / mean |x| over the finite entries, NaN and Inf counts; real tokens only when masked."""
    x = x.detach()
    if mask is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]  # (n_real, ...)
    x = x.float()
    finite = torch.isfinite(x)
    vals = x[finite]
    some = vals.numel() > 0
    return {
        "min": vals.min().item() if some else None,
        "max": vals.max().item() if some else None,
        "mean_abs": vals.abs().mean().item() if some else None,
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
        "numel": x.numel(),
    }


def _nonfinite(stats: dict | None) -> bool:
    return stats is not None and stats["nan"] + stats["inf"] > 0


# ----------------------------------------------------------------------------- NaN injection
def parse_injection(spec: str) -> tuple[int, str]:
    """'LAYER:STAGE' -> (layer, stage); a user error when malformed."""
    layer, sep, stage = spec.partition(":")
    if not sep or not layer.strip().isdigit() or stage.strip() not in STAGES:
        fail(f"--inject_nan {spec!r} is not LAYER:STAGE with LAYER a layer number and STAGE one of "
             f"{', '.join(STAGES)} (e.g. 3:attn_out)")
    return int(layer), stage.strip()


def check_injection(model, layer_idx: int, stage: str) -> None:
    """The layer must be an NPT layer and the stage's branch must be on."""
    layers = {layer.layer_idx: layer for layer in npt.npt_layers(model)}
    if layer_idx not in layers:
        fail(f"--inject_nan: layer {layer_idx} is not an NPT layer of this model "
             f"(NPT layers: {_ranges(sorted(layers))})")
    check_stage_on(layers[layer_idx].config, stage)


def check_stage_on(config: npt.NPTConfig, stage: str) -> None:
    """A delta_* stage exists only where its adapter branch is on."""
    branch_on = {"delta_add": config.additive, "delta_mult": config.multiplicative, "delta_down": config.down,
                 "a_hat": config.exact, "norm_scale": config.exact}
    if not branch_on.get(stage, True):
        fail(f"--inject_nan: stage {stage} is off in this model (modulation={config.modulation}, "
             f"modulation_target={config.modulation_target})")
    if stage == "norm_scale":
        fail("--inject_nan: norm_scale is derived for the report, never computed by the layer: plant the NaN in "
             "a_hat, which it comes from")


def _plant(x: torch.Tensor, token: int) -> torch.Tensor:
    """A copy of x with one NaN at (sequence 0, token, feature 0)."""
    x = x.clone()
    x[(0, token) + (0,) * (x.dim() - 2)] = float("nan")
    return x


PLANTED_IN = {"delta_add": "B_add", "delta_mult": "B_mult", "delta_down": "B_down", "a_hat": "B"}  # stage -> module


@contextlib.contextmanager
def _nan_in_weight(weight: torch.Tensor):
    """One NaN in weight[0, 0] for the duration (restored after): a, m and v are never materialized by
    the fused kernel, so a NaN in delta_add / delta_mult / delta_down is planted in its B_ weight instead."""
    with torch.no_grad():
        saved = weight[0, 0].clone()
        weight[0, 0] = float("nan")
    try:
        yield
    finally:
        with torch.no_grad():
            weight[0, 0] = saved


# ----------------------------------------------------------------------------- inspection
# capture point (npt.capture) -> the stage it shows; delta_add / delta_mult / modulated_gate are derived
# from the captured z and gate, which the fused kernel never materializes
STAGE_OF = {"input": None, "input_norm": "input_norm", "attn": "attn_out", "z": "low_rank", "gate": "modulated_gate",
            "mlp_out": "mlp_out", "output": "layer_out"}


def derived_stages(layer, z: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> dict:
    """delta_add / delta_mult / modulated_gate stats from one forward's z and gate, with the adapter's
    own modules and the kernels' reference math; for the exact target a_hat, norm_scale (from the layer input h)
    and modulated_gate (the captured gate: W_gate LN2(h + a_hat) is the patched gate itself)."""
    adapter = layer.adapter
    if layer.config.exact:
        with torch.no_grad():
            a_hat = adapter.attention_estimate(z)
            norm = layer.layer.post_attention_layernorm
            return {"a_hat": tensor_stats(a_hat, mask),
                    "norm_scale": tensor_stats(npt.norm_rms(norm, h) / npt.norm_rms(norm, h.float() + a_hat), mask),
                    "modulated_gate": tensor_stats(gate, mask)}
    with torch.no_grad():
        g = npt.modulated_gate(gate, z, *adapter.weights(), layer.config.add_scale)[0]
        return {"delta_add": None if adapter.B_add is None else tensor_stats(adapter.B_add(z), mask),
                "delta_mult": (None if adapter.B_mult is None else
                               tensor_stats(npt.modulation_factor(adapter.B_mult(z)), mask)),
                "delta_down": None if adapter.B_down is None else tensor_stats(adapter.down_vectors(z), mask),
                "modulated_gate": tensor_stats(g, mask)}


@contextlib.contextmanager
def instrument(model, mask: torch.Tensor, inject: tuple[int, str] | None = None):
    """Record every stage's stats of the forwards run inside into {layer_idx: {stage: stats | None}}.

    `inject` = (layer, stage) plants one NaN there (first real token of sequence 0)."""
    token = int(mask[0].nonzero()[0]) if inject else 0
    layers = {layer.layer_idx: layer for layer in npt.npt_layers(model)}
    records = {i: dict.fromkeys(STAGES) for i in layers}
    held = {}  # the current layer's z and gate, until its mlp_out

    def observe(layer_idx, name, tensor):
        stage = STAGE_OF[name]
        planted = _plant(tensor, token) if stage is not None and inject == (layer_idx, stage) else None
        tensor = tensor if planted is None else planted
        if name in ("input", "z", "gate"):
            held[name] = tensor
        if name == "mlp_out":
            records[layer_idx].update(derived_stages(layers[layer_idx], held.pop("z"), held.pop("gate"),
                                                     held.pop("input"), mask))
        if name not in ("input", "gate"):
            records[layer_idx][stage] = tensor_stats(tensor, mask)
        return planted

    with contextlib.ExitStack() as stack:
        if inject is not None and inject[1] in PLANTED_IN:
            stack.enter_context(_nan_in_weight(getattr(layers[inject[0]].adapter, PLANTED_IN[inject[1]]).weight))
        stack.enter_context(npt.capture(model, tuple(STAGE_OF), edit=observe, keep=False))
        yield records


def first_nonfinite(layers: list[dict]) -> dict | None:
    """{'layer', 'stage'} of the first non-finite stage in forward order, or None."""
    for entry in layers:
        for stage in STAGES:
            if _nonfinite(entry["stages"][stage]):
                return {"layer": entry["layer"], "stage": stage}
    return None


def inspect_model(model, tokenizer, texts=DEFAULT_TEXTS, inject: tuple[int, str] | None = None,
                  max_length: int = 256) -> dict:
    """One forward pass over `texts`; the report (the --json schema in the module doc, less `model`)."""
    if not npt.npt_layers(model):
        raise ValueError("model has no NPT layers: convert_to_npt or load adapters first")
    if inject is not None:
        check_injection(model, *inject)
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    device = model.get_input_embeddings().weight.device
    enc = {k: v.to(device) for k, v in enc.items()}
    mask = enc["attention_mask"].bool()
    if not mask.any(-1).all():
        fail("every --text must contain at least one token")
    model.eval()
    with instrument(model, mask, inject) as records, torch.no_grad():
        logits = model(**enc, use_cache=False).logits
    layers = [{"layer": i, "stages": records[i]} for i in sorted(records)]
    first = first_nonfinite(layers)
    logit_stats = tensor_stats(logits, mask)
    if first is None and _nonfinite(logit_stats):  # only the final norm / lm_head went wrong
        first = {"layer": None, "stage": "logits"}
    return {"texts": list(texts), "num_tokens": int(mask.sum()), "inject_nan": _injection_json(inject),
            "stages": list(STAGES), "layers": layers, "logits": logit_stats, "first_nonfinite": first,
            "loss_check": loss_check(npt.npt_layers(model)[0].d_model), "factor_ranges": factor_ranges()}


def _injection_json(inject):
    if inject is None:
        return None
    layer, stage = inject
    where = {**{k: f"{v}.weight[0, 0]" for k, v in PLANTED_IN.items()},
             "modulated_gate": "gate_proj output, sequence 0, first real token, feature 0"}.get(
        stage, f"{stage} output, sequence 0, first real token, feature 0")
    return {"layer": layer, "stage": stage, "where": where}


# ----------------------------------------------------------------------------- the seed's two checks
def loss_check(d_model: int = 576, scales=LOSS_SCALES, seed: int = 0) -> dict:
    """Standard vs normalized MSE between teacher and student hidden states scaled by 1 .. 1e4."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 8, d_model, generator=gen)  # (B, T, D)
    student = teacher + torch.randn(2, 8, d_model, generator=gen)
    rows = [{"scale": s, "standard_mse": F.mse_loss(student * s, teacher * s).item(),
             "normalized_mse": normalized_mse(student * s, teacher * s).item()} for s in scales]
    return {"rows": rows, "normalized_bounded": all(math.isfinite(r["normalized_mse"]) and
                                                    r["normalized_mse"] <= 4 for r in rows)}


def factor_ranges(sweep=FACTOR_SWEEP) -> dict:
    """Range of the old (1 + tanh(m)) and new (npt.modulation_factor) factors over a sweep of m."""
    m = torch.linspace(*sweep)
    out = {"m": {"min": sweep[0], "max": sweep[1], "points": sweep[2]}}
    for name, formula, fn in (("old", "1 + tanh(m)", tanh_factor), ("new", "0.5 + sigmoid(m)", npt.modulation_factor)):
        f = fn(m)
        out[name] = {"formula": formula, "min": f.min().item(), "max": f.max().item(),
                     "at_zero": fn(torch.zeros(1)).item(), "zeros": int((f == 0).sum())}
    return out


# ----------------------------------------------------------------------------- report
def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for k, i in enumerate(indices):
        start = i if start is None else start
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3e}"


def render(report: dict) -> str:
    lines = []
    info = report.get("model")
    if info:
        lines.append(f"model: {info['name']}  precision: {info['precision']}  checkpoint: {info['checkpoint'] or '-'}")
        cfg = info["npt_config"]
        lines.append(f"NPT layers: {_ranges(info['npt_layers'])}  rank: {cfg['rank']}  "
                     f"modulation: {cfg['modulation']}  add_scale: {cfg['add_scale']}")
    lines.append(f"texts: {len(report['texts'])}  tokens: {report['num_tokens']}")
    if report["inject_nan"]:
        inj = report["inject_nan"]
        lines.append(f"injected: one NaN at layer {inj['layer']} stage {inj['stage']} ({inj['where']})")
    lines.append("")
    header = f"{'layer':>5}  {'stage':<14} {'min':>11} {'max':>11} {'mean|x|':>11} {'nan':>8} {'inf':>8}"
    lines += [header, "-" * len(header)]
    for entry in report["layers"]:
        for stage in STAGES:
            s = entry["stages"][stage]
            if s is None:
                lines.append(f"{entry['layer']:>5}  {stage:<14} {'off':>11}")
                continue
            flag = "  <-- non-finite" if _nonfinite(s) else ""
            lines.append(f"{entry['layer']:>5}  {stage:<14} {_fmt(s['min']):>11} {_fmt(s['max']):>11} "
                         f"{_fmt(s['mean_abs']):>11} {s['nan']:>8} {s['inf']:>8}{flag}")
    lg = report["logits"]
    lines.append(f"{'':>5}  {'logits':<14} {_fmt(lg['min']):>11} {_fmt(lg['max']):>11} "
                 f"{_fmt(lg['mean_abs']):>11} {lg['nan']:>8} {lg['inf']:>8}")
    lines.append("")
    first = report["first_nonfinite"]
    if first is None:
        lines.append("first non-finite: none found (every stage of every NPT layer and the logits are finite)")
    elif first["layer"] is None:
        lines.append("first non-finite: the logits (final norm / lm_head); every NPT layer stage is finite")
    else:
        lines.append(f"first non-finite: layer {first['layer']} stage {first['stage']}")
    lines.append("")
    loss = report["loss_check"]
    lines.append("loss check (teacher vs student hidden states, both scaled):")
    lines.append(f"  {'scale':>8} {'standard MSE':>14} {'normalized MSE':>15}")
    for r in loss["rows"]:
        lines.append(f"  {r['scale']:>8.0e} {r['standard_mse']:>14.4e} {r['normalized_mse']:>15.4e}")
    lines.append(f"  normalized MSE {'stays bounded (<= 4)' if loss['normalized_bounded'] else 'is NOT bounded'}; "
                 "standard MSE grows with the square of the scale")
    fr = report["factor_ranges"]
    lines.append(f"multiplicative factor over m in [{fr['m']['min']:g}, {fr['m']['max']:g}]:")
    for name in ("old", "new"):
        f = fr[name]
        lines.append(f"  {name}: {f['formula']:<17} range [{f['min']:.6g}, {f['max']:.6g}]  at m=0: {f['at_zero']:g}  "
                     f"zeros: {f['zeros']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
@dataclasses.dataclass
class InspectArgs(ModelArgs):
    """debug_nan.py's arguments, one field per flag after the model flags."""
    checkpoint: str | None = flag(None, "Directory with trained adapters (adapter_model.safetensors + npt_config.json), "
                                        "e.g. a checkpoint-<step> of pretrain_npt_safe.py.", metavar="DIR")
    npt_layers: str | None = flag(None, "Layers to convert when no --checkpoint: all, upper_half, lower_half, 8-15, "
                                        "1,3,5.  [default: all]")
    adapter_rank: int | None = flag(None, "Adapter rank when no --checkpoint.  [default: 16]", type=int)
    safe_mode: bool = flag(False, "Additive modulation only, when no --checkpoint.")
    modulation_target: str | None = flag(None, "gate, down, gate+down or exact, when no --checkpoint.  [default: "
                                               "gate]", type=click.Choice(npt.TARGETS))
    down_rank: int | None = flag(None, "K of the down target, when no --checkpoint.  [default: 4]",
                                 type=click.IntRange(min=1))
    text: tuple = flag((), "Text to run (repeatable).  [default: three built-in samples]", multiple=True)
    max_length: int | None = flag(None, "Tokens per text (longer ones are truncated); at most the model's positions.  "
                                        "[default: 256, or the model's positions if fewer]", type=click.IntRange(min=1))
    inject_nan: str | None = flag(None, f"Plant one NaN at that NPT layer and stage to show detection works; STAGE is "
                                        f"one of {', '.join(STAGES)} (delta_add / delta_mult / delta_down: in B_add / "
                                        "B_mult / B_down.weight[0, 0], restored after).", metavar="LAYER:STAGE")
    json: str | None = flag(None, "Also write the report as JSON to this file.", type=click.Path(dir_okay=False))
    seed: int = flag(0, "Seed of the fresh adapters' init.", type=int)


@command()
@options(InspectArgs)
def main(**flags):
    """Inspect one forward pass of an NPT model and name where the first NaN / Inf appears.

    Exit code 1 when a non-finite value was found, 0 otherwise."""
    args = InspectArgs(**flags)
    inject = parse_injection(args.inject_nan) if args.inject_nan is not None else None
    config = config_from_flags(args.checkpoint, args.npt_layers, args.adapter_rank, args.safe_mode,
                               args.modulation_target, args.down_rank)
    if args.json is not None:
        check_json_file_or_fail(args.json)
    model_config = load_model_config_or_fail(args.model_name, args.trust_remote_code)
    check_against_model(config, model_config, inject, args.checkpoint)
    max_length = check_length_or_fail(args.max_length, model_config)  # texts are cut there: within the positions

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model_or_fail(args.model_name, args.use_quantization, args.use_fp16,
                                          trust_remote_code=args.trust_remote_code)
    torch.manual_seed(args.seed)
    try:
        if args.checkpoint is not None:
            npt.load_adapters(model, args.checkpoint)
        else:
            npt.convert_to_npt(model, config)
    except (OSError, ValueError) as e:
        fail(f"{'--checkpoint' if args.checkpoint else 'conversion'}: {e}")

    report = {"model": {"name": args.model_name, "precision": precision_name(args.use_quantization, args.use_fp16),
                        "checkpoint": args.checkpoint, "npt_config": model.npt_config.to_dict(),
                        "npt_layers": [layer.layer_idx for layer in npt.npt_layers(model)]}}
    report.update(inspect_model(model, tokenizer, args.text or DEFAULT_TEXTS, inject, max_length))
    click.echo(render(report))
    if args.json is not None:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            fail(f"--json: cannot write {args.json!r}: {e.strerror or e}")
    sys.exit(1 if report["first_nonfinite"] is not None else 0)


def check_json_file_or_fail(json_file: str) -> None:
    """--json must be writable before the model loads: exit 1 means "NaN found", never "cannot write"."""
    path = Path(json_file).expanduser().resolve()
    if not path.parent.is_dir():
        fail(f"--json: directory {Path(json_file).parent} does not exist")
    if path.is_dir() or not can_create_in(path.parent) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"--json: cannot write {json_file!r}")


def config_from_flags(checkpoint, npt_layers, adapter_rank, safe_mode, modulation_target=None,
                      down_rank=None) -> npt.NPTConfig:
    """The checkpoint's NPT config, or the one the flags ask for (not both)."""
    if checkpoint is not None:
        given = [f for f, v in (("--npt_layers", npt_layers), ("--adapter_rank", adapter_rank),
                                ("--safe_mode", safe_mode or None), ("--modulation_target", modulation_target),
                                ("--down_rank", down_rank)) if v is not None]
        if given:
            fail(f"{', '.join(given)} cannot be combined with --checkpoint: the checkpoint's npt_config.json sets them")
        try:
            return npt.NPTConfig.from_dict(npt.read_adapter_config(checkpoint))
        except (OSError, ValueError, TypeError) as e:
            fail(f"--checkpoint: {e}")
    try:
        return npt.NPTConfig(rank=16 if adapter_rank is None else adapter_rank,
                             modulation="additive" if safe_mode else "both", layers=npt_layers or "all",
                             modulation_target=modulation_target or "gate", down_rank=down_rank or 4)
    except ValueError as e:
        fail(f"{e}")


def check_against_model(config: npt.NPTConfig, model_config, inject, checkpoint) -> None:
    """Layers and the injection point checked against the model's config before its weights load."""
    num_layers = getattr(model_config, "num_hidden_layers", None)
    if num_layers is not None:
        try:
            indices = config.layer_indices(num_layers)
        except ValueError as e:
            fail(f"{'--checkpoint' if checkpoint else '--npt_layers'}: {e}")
        if inject is not None and inject[0] not in indices:
            fail(f"--inject_nan: layer {inject[0]} is not an NPT layer of this model (NPT layers: {_ranges(indices)})")
    if inject is not None:
        check_stage_on(config, inject[1])


if __name__ == "__main__":
    main()
