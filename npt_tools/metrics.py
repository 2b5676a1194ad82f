"""What a run records: metrics.jsonl (one JSON row per log or eval step: the equivalence report's source, kept
by hand because a resumed run must drop the rows it will write again), the --log_file, TensorBoard / W&B
through accelerate's trackers, and the loss-curve plot. Only the main process writes."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from npt_tools.cli import say


def json_safe(x):
    """x with non-finite floats as None (JSON has no NaN) and tensors as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, torch.Tensor):
        return json_safe(x.tolist())
    return x


def read_rows(metrics: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut off by a crash mid-write (the last one) is dropped, not fatal."""
    rows = []
    for line in metrics.read_text(errors="replace").splitlines() if metrics.exists() else ():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def trackers(output_dir: Path, run_name: str, tensorboard: bool, wandb: bool, config: dict) -> list:
    """accelerate's trackers for --use_tensorboard (OUTPUT_DIR/tensorboard/RUN_NAME) and --use_wandb (project
    $WANDB_PROJECT or npt, this run's name and arguments), for the Accelerator's `log_with`."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    out = [TensorBoardTracker(run_name, output_dir / "tensorboard")] if tensorboard else []
    if wandb:
        out.append(WandBTracker(os.environ.get("WANDB_PROJECT", "npt"), name=run_name, config=config,
                                dir=str(output_dir)))
    return out


class Metrics:
    """metrics.jsonl, the log file, the accelerator's trackers, the loss-curve PNG; only the main process writes."""

    def __init__(self, output_dir: Path, accelerator, log_file, resume_step: int | None, layers: list[int]):
        self.dir, self.accelerator, self.layers = output_dir, accelerator, layers
        self.main = accelerator.is_main_process
        self.metrics = output_dir / "metrics.jsonl"
        self.log_file = Path(log_file) if log_file else None
        if self.main and resume_step is not None and self.metrics.exists():  # drop rows the resumed run writes again
            keep = [r for r in read_rows(self.metrics) if r.get("step", 0) <= resume_step]
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif self.main and self.metrics.exists():
            self.metrics.unlink()
        accelerator.init_trackers("npt")  # the trackers were built with their names (see `trackers`)

    def message(self, text: str):
        if not self.main:
            return
        say(text)
        self.log(text)

    def log(self, text: str):
        """A line in --log_file only."""
        if self.main and self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def row(self, row: dict):
        """One row: metrics.jsonl, the log file, and the trackers (train/ and eval/ scalars, each layer's
        held-out update error as eval/layer_update_error/<layer>)."""
        if not self.main:
            return
        row = json_safe(row)
        line = json.dumps(row)
        with open(self.metrics, "a") as f:
            f.write(line + "\n")
        self.log(line)
        scalars = {("eval/" if k.startswith("eval_") else "train/") + k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and k != "step"}
        scalars.update({f"eval/layer_update_error/{i}": v
                        for i, v in zip(self.layers, row.get("eval_layer_update_error") or [])})
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=row["step"])

    def plot(self):
        if not self.main or not self.metrics.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = read_rows(self.metrics)
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "eval_loss" not in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        layer_evals = [r for r in rows if r.get("eval_layer_update_error")]
        fig, axes = plt.subplots(1, 2 if layer_evals else 1, figsize=(12 if layer_evals else 7, 4), squeeze=False)
        ax = axes[0, 0]
        if train:  # each step's loss is on that step's own batch: noisy, so drawn light
            ax.plot(*zip(*train), color="tab:blue", alpha=0.4, lw=1, label="train loss (each step's own batch)")
        if evals:
            ax.plot(*zip(*evals), "o-", color="tab:orange", lw=2, label="held-out loss (the same windows each time)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (the objective's fit + lambda * reg)")
        _log_scale_if_positive(ax, [v for _, v in train + evals])
        ax.legend()
        ax.set_title("NPT equivalence pre-training")
        if layer_evals:  # the equivalence report: each layer's held-out update error at start and end
            ax = axes[0, 1]
            for row in {id(r): r for r in (layer_evals[0], layer_evals[-1])}.values():
                ax.plot(self.layers, row["eval_layer_update_error"],
                        "o-", ms=3, label=f"step {row['step']}: student ppl {row['eval_student_ppl']:.3g} (teacher "
                        f"{row['eval_teacher_ppl']:.3g}), agreement {row['eval_agreement']:.2f}")
            ax.axhline(1.0, color="grey", lw=0.5)
            _log_scale_if_positive(ax, [v for r in layer_evals for v in r["eval_layer_update_error"]])
            ax.set_xlabel("NPT layer")
            ax.set_ylabel("held-out update error (1 = not reproduced)")
            ax.legend(fontsize=8)
            ax.set_title("equivalence per layer (eval)")
        fig.tight_layout()
        tmp = self.dir / ".loss_curve.png.tmp"
        try:
            fig.savefig(tmp, format="png")
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: no half-written file left
            raise
        finally:
            plt.close(fig)
        os.replace(tmp, self.dir / "loss_curve.png")

    def close(self):
        """Finish the trackers (also after a full disk, before the run's end)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def _log_scale_if_positive(ax, values: list[float]) -> None:
    """A log y axis where every value is positive and finite (losses that span decades); linear otherwise."""
    if values and all(math.isfinite(v) and v > 0 for v in values):
        ax.set_yscale("log")
