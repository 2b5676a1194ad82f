"""The verdict on a run: held-out evaluation (each NPT layer's update error, the student's perplexity and top-1
agreement against the teacher's) and the equivalence report, start against end."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

import npt
from npt_tools.metrics import json_safe, read_rows
from npt_tools.objective import DEFAULT_OBJECTIVE, equivalence_loss, layerwise_fit, run_captured


@torch.no_grad()
def evaluate(model, batches, objective: str | None = None, regularization_lambda: float = 0.01,
             autocast=contextlib.nullcontext, loss: str = "update") -> dict:
    """Held-out metrics (token-weighted over batches): the training loss (objective None: the model's target's, as
    equivalence_loss); the update error of each NPT layer on the teacher's input (update_error: 1 = the layer's
    update not reproduced, 0 = exact) and its mean over layers; teacher and student perplexity; top-1 next-token
    agreement. The per-layer captures and the logits are computed here, not by the training step."""
    objective = objective or DEFAULT_OBJECTIVE[model.npt_config.modulation_target]
    tot = {"tokens": 0, "loss": 0.0, "t_nll": 0.0, "s_nll": 0.0, "agree": 0.0, "pred": 0}
    layer_sum = None
    for b in batches:
        with autocast():
            out = equivalence_loss(model, b, objective, regularization_lambda, loss, report=True)
            per_layer = (out.layer_fit if (objective, loss) == ("layerwise", "update")  # else from its teacher pass
                         else layerwise_fit(model, out.teacher, b["attention_mask"]))
            t_logits, s_logits = out.logits or (run_captured(model, b, (), teacher=True, logits=True)[1],
                                                run_captured(model, b, (), logits=True)[1])
        mask = b["attention_mask"]
        n = int(mask.sum())
        tot["tokens"] += n
        tot["loss"] += n * out.loss.item()
        layer_sum = per_layer * n if layer_sum is None else layer_sum + per_layer * n
        pm = (mask[:, 1:] * mask[:, :-1]).bool()  # positions whose next token is real
        targets = b["input_ids"][:, 1:][pm]
        t_lp, s_lp = t_logits[:, :-1][pm].float(), s_logits[:, :-1][pm].float()
        tot["t_nll"] += torch.nn.functional.cross_entropy(t_lp, targets, reduction="sum").item()
        tot["s_nll"] += torch.nn.functional.cross_entropy(s_lp, targets, reduction="sum").item()
        tot["agree"] += (t_lp.argmax(-1) == s_lp.argmax(-1)).sum().item()
        tot["pred"] += int(pm.sum())
    n, p = max(tot["tokens"], 1), max(tot["pred"], 1)
    per_layer = [float(v) for v in (layer_sum / n)] if layer_sum is not None else []
    return {"eval_loss": tot["loss"] / n, "eval_teacher_ppl": math.exp(min(tot["t_nll"] / p, 700)),
            "eval_student_ppl": math.exp(min(tot["s_nll"] / p, 700)), "eval_agreement": tot["agree"] / p,
            "eval_update_error": sum(per_layer) / len(per_layer) if per_layer else math.nan,  # the table's mean
            "eval_layer_update_error": per_layer}


def describe_target(c: npt.NPTConfig) -> str:
    """What the attention code modulates, in words for the start line."""
    if c.exact:
        return "exact target (per-token patches from a rank-r code of the attention)"
    parts = [f"{c.modulation_target} target"]
    if c.additive or c.multiplicative:
        parts.append(f"{c.modulation} gate modulation")
    if c.down:
        parts.append(f"down_rank {c.down_rank}")
    return ", ".join(parts)


def equivalence_report(metrics: Path, layers: list[int], best_step: int | None = None) -> dict | None:
    """Start and end of the run's held-out evaluation (the first and last eval rows of metrics.jsonl, so a
    resumed run still reports from step 0) and which checkpoint is the run's result (checkpoint-best, of step
    `best_step`: the lowest held-out loss, the start included); None when nothing was evaluated."""
    rows = read_rows(metrics)
    evals = [r for r in rows if r.get("eval_layer_update_error")]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    return {"layers": layers, "step_start": first["step"], "step_final": last["step"],
            "update_error_start": first["eval_layer_update_error"], "update_error_final": last["eval_layer_update_error"],
            "teacher_ppl": last["eval_teacher_ppl"], "student_ppl_start": first["eval_student_ppl"],
            "student_ppl_final": last["eval_student_ppl"], "agreement_start": first["eval_agreement"],
            "agreement_final": last["eval_agreement"], "eval_loss_start": first["eval_loss"],
            "eval_loss_final": last["eval_loss"], "best_step": best_step}


def render_equivalence(r: dict) -> str:
    """The report as a table: per layer update error start -> end (1 = the layer's update not reproduced,
    0 = exact), then perplexity and top-1 agreement against the teacher, and whether training helped."""
    head = f"step {r['step_start']} -> {r['step_final']}"
    lines = ["equivalence (held-out): update error per NPT layer, 1 = update not reproduced, 0 = exact",
             f"  {'layer':>5}  {head:>22}"]
    start, final = r["update_error_start"], r["update_error_final"]
    lines += [f"  {i:>5}  {a:>10.4f} -> {b:<10.4f}" for i, a, b in zip(r["layers"], start, final)]
    lines.append(f"  {'mean':>5}  {sum(start) / len(start):>10.4f} -> {sum(final) / len(final):<10.4f}")
    lines.append(f"  perplexity: teacher {r['teacher_ppl']:.4g}, student {r['student_ppl_start']:.4g} -> "
                 f"{r['student_ppl_final']:.4g};  top-1 agreement {r['agreement_start']:.3f} -> {r['agreement_final']:.3f}")
    worse = r["eval_loss_final"] > r["eval_loss_start"]
    verdict = "the end is WORSE than the start" if worse else "falls" if r["eval_loss_final"] < r["eval_loss_start"] \
        else "unchanged"
    result = ("" if r.get("best_step") is None else f"; the run's result: checkpoint-best (step {r['best_step']}"
              f"{', = checkpoint-final' if r['best_step'] == r['step_final'] else ''})")
    lines.append(f"  held-out loss {r['eval_loss_start']:.4g} -> {r['eval_loss_final']:.4g}: {verdict}{result}")
    return "\n".join(lines)


def write_equivalence(metrics: Path, output_dir: Path, layers: list[int], best_step: int | None = None) -> str | None:
    """OUTPUT_DIR/equivalence.json (written whole, then renamed) and the table to print, at the end of a run that
    evaluated; None when nothing was evaluated."""
    report = equivalence_report(metrics, layers, best_step)
    if report is None:
        return None
    tmp = output_dir / ".equivalence.json.tmp"
    tmp.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    os.replace(tmp, output_dir / "equivalence.json")
    return render_equivalence(report)
