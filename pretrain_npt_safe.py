#!/usr/bin/env python
"""Safe NPT equivalence pre-training: the recipe (setup, train, save, cleanup) over npt and npt_tools.

The student is the NPT model, the teacher the same model under `npt.npt_disabled` (one copy in memory). The loss is
`equivalence_loss` (+ lambda * regularization); `npt_tools.step.optimizer_step` skips a micro-batch whose loss or
gradients are not finite without touching weights, optimizer or scheduler. The contract: docs/CONTRACT.md section 4.

    python pretrain_npt_safe.py                       # smollm2-135m on the builtin corpus
    torchrun --nproc_per_node 2 pretrain_npt_safe.py  # DDP (gloo on CPU, nccl on GPU)

`train(TrainArgs(...))` runs a whole run; `Trainer(args, make_plan(args))` runs it step by step (setup,
closed_form_start, train, cleanup). Exit codes: 0 done, 2 bad input, 3 too many non-finite micro-batches in a row,
4 a full disk. Test hook: the hidden --inject_nan_steps 3,5-7 plants NaN input embeddings in those micro-batch
groups (1-based count of groups drawn, resumed runs included).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch

import npt
from npt_tools.arguments import EXACT_LR_SCALE, TrainArgs, exact_learning_rate
from npt_tools.checkpoints import (CKPT_RE, EXIT_DISK_FULL, DiskFull, TrainerState, checkpoint_run, is_disk_full,
                                   prune_checkpoints, remove_checkpoint, restore_checkpoint, resume_hint,
                                   save_checkpoint, tidy_output_dir)
from npt_tools.cli import command, fail, first_line, options, progress, say
from npt_tools.closed_form import STARTS, init_exact, teacher_moments
from npt_tools.data import collate, load_data
from npt_tools.metrics import Metrics, trackers
from npt_tools.models import load_model_or_fail
from npt_tools.objective import equivalence_loss
from npt_tools.plan import Plan, hold_output_dir, make_plan
from npt_tools.processes import start_processes
from npt_tools.report import describe_target, evaluate, write_equivalence
from npt_tools.step import nan_embeddings, optimizer_step, sum_over_processes, undo_step


def count_steps(args: TrainArgs, windows_per_epoch: int | None, world: int) -> int:
    """Optimizer steps of the run: --max_steps, or --num_epochs over the data."""
    per_step = args.batch_size * world * args.gradient_accumulation_steps
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_epochs * windows_per_epoch / per_step))
    if args.warmup_steps > total:  # warned, not refused: a short trial run with the default warmup is legitimate
        warnings.warn(f"--warmup_steps {args.warmup_steps} is longer than the run ({total} steps): the learning rate "
                      f"peaks at {total / args.warmup_steps:.0%} of --learning_rate", stacklevel=1)
    return total


def build_model(args: TrainArgs, plan: Plan, device: torch.device, world: int, total_steps: int):
    """(model, optimizer, scheduler): the only copy of the model (the teacher is npt_disabled), converted."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, _ = load_model_or_fail(args.model_name, args.use_quantization, args.use_fp16,
                                  trust_remote_code=args.trust_remote_code,
                                  **({"device": device} if device.type == "cuda" else {}))
    torch.manual_seed(args.seed)  # the same adapter init on every rank and every run
    try:
        npt.convert_to_npt(model, plan.npt_config)
    except ValueError as e:  # not Llama-shaped: found only once the modules exist
        fail(f"model {args.model_name!r} cannot be converted to NPT: {first_line(e)}")
    if args.init_adapters is not None:
        try:
            npt.load_adapters(model, Path(args.init_adapters).expanduser())
        except (OSError, ValueError) as e:
            fail(f"--init_adapters: {first_line(e)}")
    npt.set_kernel(model, args.kernel)
    model.eval()  # no dropout: teacher and student must be deterministic
    params = npt.get_adapter_params(model)
    if world > 1:  # every rank starts from rank 0's adapters (DDP's broadcast)
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
    return (model, *build_optimizer(args, params, total_steps))


def build_optimizer(args: TrainArgs, params: list, total_steps: int) -> tuple:
    """(optimizer, scheduler) at --learning_rate, warmup then --scheduler_type per optimizer step."""
    from transformers import get_scheduler

    opt_cls = torch.optim.AdamW if args.optimizer_type == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[args.scheduler_type]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


class Trainer:
    """One run: `setup` (data, processes, model, resumed state, metrics), `closed_form_start`, `train` (the loop),
    `cleanup`. The loop's state (progress bar, losses since the last save, the last step taken) lives here."""

    def __init__(self, args: TrainArgs, plan: Plan):
        self.args, self.plan = args, plan
        self.metrics = self.bar = self.last_eval = self.last_step = None
        self.window_losses: list[float] = []  # train losses since the last save
        self.t0, self.tokens_since = 0.0, 0  # the current tokens/s window

    def setup(self) -> "Trainer":
        """Data (checked before the model loads), processes, the model, the state to resume, the output dir."""
        args, plan = self.args, self.plan
        self.data = load_data(args)
        run_name = args.run_name or plan.output_dir.name
        self.procs = procs = start_processes(args, trackers(plan.output_dir, run_name, args.use_tensorboard,
                                                            args.use_wandb, args.saved()))
        self.total_steps = count_steps(args, self.data.windows_per_epoch, procs.world)
        self.model, self.optimizer, self.scheduler = build_model(args, plan, procs.device, procs.world,
                                                                 self.total_steps)
        self.state = self._restore()
        if procs.main:
            plan.output_dir.mkdir(parents=True, exist_ok=True)
            tidy_output_dir(plan.output_dir, self.state.run_id)
        procs.accelerator.wait_for_everyone()
        self.metrics = Metrics(plan.output_dir, procs.accelerator, args.log_file,
                               self.state.step if plan.resume is not None else None, plan.layer_indices)
        per_step = args.batch_size * procs.world * args.gradient_accumulation_steps
        self.metrics.message(
            f"NPT pre-training: {args.model_name}, {len(plan.layer_indices)} NPT layers, rank {plan.npt_config.rank}, "
            f"{describe_target(plan.npt_config)}, {args.objective} objective"
            f"{'' if args.idle('loss') else f', {args.loss} loss'}, {self.total_steps} "
            f"steps of {per_step} x {args.max_length} tokens, {procs.world} process(es)"
            + (f", resumed at step {self.state.step} from {plan.resume.path}" if plan.resume is not None else ""))
        windows = self.data.eval_windows
        self.eval_batches = [self._micro_batch(windows[i:i + args.batch_size])
                             for i in range(0, len(windows), args.batch_size)]
        return self

    def _restore(self) -> TrainerState:
        """A fresh state, or the checkpoint's (its adapters, optimizer, scheduler and RNG loaded)."""
        resume = self.plan.resume
        if resume is None:
            return TrainerState(run_id=self.plan.run_id)
        try:
            restore_checkpoint(resume, self.model, self.optimizer, self.scheduler)
        except (ValueError, TypeError, KeyError) as e:
            fail(f"cannot resume from {str(resume.path)!r}: {e}")
        resume.state.run_id = self.plan.run_id  # a checkpoint written before run ids: this run adopts it
        return resume.state

    def closed_form_start(self) -> str | None:
        """The exact target's start (init_exact) from the first --init_batches x --batch_size x processes training
        windows, for a new run not started from saved adapters; a line saying what it did. Each process gathers the
        attention moments of its share; their sums are reduced over processes, so every process sets the same
        adapters, whatever the number of processes."""
        args, procs, model, state = self.args, self.procs, self.model, self.state
        if not model.npt_config.exact or state.step or state.closed_form_start or args.init_adapters is not None:
            return None
        per = args.batch_size
        windows = [w for w, _ in itertools.islice(self.data.stream.windows((0, 0, 0)),
                                                  args.init_batches * per * procs.world)]
        mine = windows[procs.rank::procs.world]
        batches = [self._micro_batch(mine[i:i + per]) for i in range(0, len(mine), per)]
        t0 = time.time()
        with procs.autocast():
            stats = teacher_moments(model, progress(batches, procs.main, desc="closed-form start", leave=False),
                                    args.exact_start, args.seed, args.init_gradient_batches)
        if procs.reduce is not None:
            order = sorted(stats)
            sums = iter(sum_over_processes(procs.reduce, [t for i in order for t in stats[i]], torch.float64))
            stats = {i: tuple(next(sums) for _ in stats[i]) for i in order}
        kept = init_exact(model, moments=stats, start=args.exact_start)
        share = sum(kept.values()) / len(kept)
        first = next(iter(stats.values()))
        tokens = int(first[0])
        gradient_tokens = int(first[3]) if args.exact_start == "fisher" else 0  # fewer: --init_gradient_batches
        gradients = f"; gradients at {gradient_tokens} of them" if 0 < gradient_tokens < tokens else ""
        method, weighed = STARTS[args.exact_start]
        state.closed_form_start = {"method": method, "windows": len(windows), "tokens": tokens,
                                   "gradient_tokens": gradient_tokens, "kept": share}
        rate = ""
        if not args.was_given("learning_rate"):  # steps as large as the start leaves to learn (saved with the run)
            args.learning_rate = exact_learning_rate(share)
            self.optimizer, self.scheduler = build_optimizer(args, npt.get_adapter_params(model), self.total_steps)
            rate = (f"; learning rate {args.learning_rate:.3g} (--learning_rate not given: {EXACT_LR_SCALE:g} x the "
                    "share missed)")
        return (f"closed-form start: {method} of each NPT layer's attention output over {tokens} tokens "
                f"({len(windows)} windows{gradients}, {time.time() - t0:.1f} s); the rank-{model.npt_config.rank} code "
                f"keeps {100 * share:.1f}% of its {weighed} (mean over layers, lowest "
                f"{100 * min(kept.values()):.1f}%){rate}")

    def train(self) -> int:
        """Optimizer steps until the last one or the end of the data: 0, or 3 after --max_consecutive_nan
        non-finite micro-batches in a row (with the last good adapters saved)."""
        args, st = self.args, self.state
        windows = self.data.stream.windows(tuple(st.position))
        self.bar = progress(None, self.procs.main, total=self.total_steps, initial=st.step, desc="npt")
        if args.eval_steps and st.step == 0:
            self.evaluate()
            self._save_if_best()  # the start is a candidate too: a run never hands back worse than it began
        exhausted, self.t0 = False, time.time()
        while st.step < self.total_steps and not exhausted:
            group, exhausted = self._next_group(windows)
            if not group:
                break
            out = self._step(group)
            self._record(out, len(group))
            if st.consecutive_nan >= args.max_consecutive_nan:
                undone = self._undo_poisoned_step(group)
                path = self.save_checkpoint("checkpoint-final")
                why = (f"step {undone} left finite adapters whose forward is non-finite and was undone" if undone
                       else "a step that made them non-finite was undone")
                self.metrics.message(f"error: {st.consecutive_nan} non-finite micro-batches in a row "
                                     f"(--max_consecutive_nan {args.max_consecutive_nan}): stopped; {path} holds the "
                                     f"adapters of step {st.step}, the last step whose weights stayed finite ({why})")
                return 3
            if out.stepped:
                self._after_step()
        return 0

    def _next_group(self, windows) -> tuple[list[dict], bool]:
        """This process's next gradient_accumulation_steps micro-batches (fewer where the data ends), and
        whether it ended."""
        args, group, exhausted = self.args, [], False
        while len(group) < args.gradient_accumulation_steps and not exhausted:
            seqs = []
            while len(seqs) < args.batch_size * self.procs.world:
                nxt = next(windows, None)
                if nxt is None:
                    exhausted = True
                    break
                seqs.append(nxt[0])
                self.state.position = list(nxt[1])
            if seqs:
                rank = self.procs.rank
                group.append(self._micro_batch(seqs[rank * args.batch_size:(rank + 1) * args.batch_size]))
        return group, exhausted

    def _micro_batch(self, windows) -> dict:
        device = self.procs.device
        if not windows:  # an empty shard (the tail of a stream under DDP)
            return {k: torch.zeros((0, 1), dtype=torch.long, device=device) for k in ("input_ids", "attention_mask")}
        return {k: v.to(device) for k, v in collate(windows, self.data.pad_id).items()}

    def _step(self, group: list[dict]):
        """One optimizer step over the group (NaN embeddings in the groups --inject_nan_steps names)."""
        self.state.micro_groups += 1
        args, procs = self.args, self.procs
        poisoned = self.state.micro_groups in self.plan.inject
        with nan_embeddings(self.model) if poisoned else contextlib.nullcontext():
            return optimizer_step(self.model, self.optimizer, self.scheduler, group, args.max_grad_norm,
                                  args.objective, args.regularization_lambda, procs.autocast, procs.reduce, args.loss)

    def _record(self, out, micro_batches: int) -> None:
        """Count tokens and skips, advance the step and the bar, log the row."""
        st = self.state
        self.tokens_since += out.tokens
        st.tokens += out.tokens
        st.skipped_total += out.skipped
        for i in out.bad:
            self.metrics.message(f"skipped micro-batch {i + 1}/{micro_batches} of group {st.micro_groups} at step "
                                 f"{st.step}: {out.reasons.get(i, 'non-finite loss or gradient')}")
        for i in range(micro_batches):  # consecutive non-finite micro-batches, in order
            st.consecutive_nan = st.consecutive_nan + 1 if i in out.bad else 0
        if out.stepped:
            st.step += 1
            self.last_step = out
            self.bar.update(1)
            self.window_losses.append(out.loss)
        rate = self.tokens_since / max(time.time() - self.t0, 1e-9)
        if self.procs.main:
            self.bar.set_postfix(loss=f"{out.loss:.4g}", fit=f"{out.fit:.3g}", reg=f"{out.reg:.3g}",
                                 gnorm=f"{out.grad_norm:.3g}", tok_s=f"{rate:.0f}", refresh=False)
        if out.skipped or (out.stepped and (st.step % self.args.log_steps == 0 or st.step in (1, self.total_steps))):
            self.metrics.row({"step": st.step, "loss": out.loss, "fit": out.fit, "reg": out.reg,
                              "grad_norm": out.grad_norm, "lr": self.scheduler.get_last_lr()[0],
                              "skipped": out.skipped, "skipped_total": st.skipped_total, "tokens": st.tokens,
                              "tokens_per_s": rate, "micro_batches": micro_batches})
            self.t0, self.tokens_since = time.time(), 0

    def evaluate(self) -> None:
        m = evaluate(self.model, self.eval_batches, self.args.objective, self.args.regularization_lambda,
                     self.procs.autocast, self.args.loss)
        self.metrics.row({"step": self.state.step, **m})
        self.metrics.message(f"eval @ step {self.state.step}: update error {m['eval_update_error']:.4g}, teacher "
                             f"ppl {m['eval_teacher_ppl']:.3g}, student ppl {m['eval_student_ppl']:.3g}, "
                             f"agreement {m['eval_agreement']:.3f}")
        self.last_eval = m

    def _after_step(self) -> None:
        """Evaluate and save on their schedules."""
        args, step = self.args, self.state.step
        if args.eval_steps and step % args.eval_steps == 0 and step != self.total_steps:
            self.evaluate()
        if args.save_steps and step % args.save_steps == 0:
            self._save_if_best()
            self.save_checkpoint(f"checkpoint-{step}")

    def _save_if_best(self) -> None:
        """checkpoint-best when the last eval loss (or the mean train loss since the last save) is the best yet."""
        losses, self.window_losses = self.window_losses, []
        score = self.last_eval["eval_loss"] if self.last_eval else (sum(losses) / len(losses) if losses else None)
        if score is not None and (self.state.best is None or score < self.state.best):
            self.state.best = score
            self.save_checkpoint("checkpoint-best")

    def _undo_poisoned_step(self, group: list[dict]) -> int | None:
        """At an abort. A step can leave finite adapters whose every forward is non-finite (the weights check
        passes, then each micro-batch fails): if a held-out batch is non-finite under the last step's adapters,
        that step is undone, and checkpoints saved of it are removed. The adapters before it are the last
        that gave a finite loss (that step's own). Returns the undone step, or None."""
        last, st = self.last_step, self.state
        probe = next((b for b in [*self.eval_batches, *group] if b["attention_mask"].sum() > 0), None)
        if last is None or last.previous is None or probe is None:
            return None
        with torch.no_grad(), self.procs.autocast():
            value = equivalence_loss(self.model, probe, self.args.objective, self.args.regularization_lambda,
                                         self.args.loss).loss
        bad = torch.tensor([0.0 if bool(torch.isfinite(value)) else 1.0])
        if self.procs.reduce is not None:  # every rank undoes, or none
            bad = self.procs.reduce(bad)
        if not bad.item():
            return None
        undo_step(self.model, self.optimizer, self.scheduler, last)
        self.last_step, undone = None, st.step
        st.step -= 1
        if self.procs.main:
            for d in (self.plan.output_dir / f"checkpoint-{undone}", self.plan.output_dir / "checkpoint-best"):
                if d.is_dir() and checkpoint_run(d) == (st.run_id, undone):
                    remove_checkpoint(d, st.run_id)
        return undone

    def save_checkpoint(self, name: str) -> Path:
        """OUTPUT_DIR/name (the main process writes it), pruned to --save_total_limit, and the plot."""
        output_dir = self.plan.output_dir
        if self.procs.main:
            meta = {"args": self.args.saved(), "world_size": self.procs.world}
            path = save_checkpoint(output_dir, name, self.model, self.optimizer, self.scheduler, self.state, meta)
            if CKPT_RE.match(name):
                prune_checkpoints(output_dir, self.args.save_total_limit, self.state.run_id)
            self.metrics.plot()
            return path
        return output_dir / name

    def cleanup(self, code: int) -> None:
        """After a complete run: the last eval, checkpoint-best/-final, the final row, the equivalence report.
        Always: close the bar and the trackers, and end the processes."""
        self.bar.close()
        if code == 0:
            if self.args.eval_steps:
                self.evaluate()
            self._save_if_best()
            path = self.save_checkpoint("checkpoint-final")
            final = {"step": self.state.step, "event": "final", "world_size": self.procs.world,
                     "skipped_total": self.state.skipped_total}
            if self.procs.world > 1:  # all ranks must hold the same adapters
                flat = torch.cat([p.detach().flatten().float() for p in npt.get_adapter_params(self.model)])
                gathered = self.procs.accelerator.gather(flat.to(self.procs.device)[None])
                final["ranks_identical"] = bool(all(torch.equal(gathered[0], g) for g in gathered))
            self.metrics.row(final)
            if self.procs.main:  # the table, when the run evaluated
                best = checkpoint_run(self.plan.output_dir / "checkpoint-best")
                table = write_equivalence(self.metrics.metrics, self.plan.output_dir, self.plan.layer_indices,
                                          best[1] if best and best[0] == self.state.run_id else None)
                if table:
                    self.metrics.message(table)
            self.metrics.message(f"done: {self.state.step} steps, {self.state.skipped_total} skipped micro-batches; "
                                 f"adapters in {path}")
        self.metrics.plot()
        self.metrics.close()
        self.procs.accelerator.wait_for_everyone()
        self.procs.accelerator.end_training()

    def run(self) -> int:
        """setup, the closed-form start, train, cleanup; a full disk stops the run with one line and exit code 4."""
        try:
            self.setup()
            start = self.closed_form_start()  # exact target: before step 0's eval
            if start:
                self.metrics.message(start)
            code = self.train()
            self.cleanup(code)
            return code
        except (OSError, DiskFull) as e:
            if isinstance(e, OSError) and not is_disk_full(e):
                raise
            line = (f"error: {e}" if isinstance(e, DiskFull) else f"error: no space left on the device writing "
                    f"{e.filename or self.plan.output_dir}: {resume_hint(self.plan.output_dir, self.plan.run_id)}")
        say(line)
        if self.metrics is not None:
            with contextlib.suppress(OSError):  # the log file may be on the full disk too
                self.metrics.log(line)
            with contextlib.suppress(OSError):
                self.metrics.close()
        return EXIT_DISK_FULL


def train(args: TrainArgs) -> int:
    """A whole run; its exit code (0; 3 after too many non-finite micro-batches; 4 on a full disk)."""
    plan = make_plan(args)  # every bad flag refused here, before any work
    with hold_output_dir(args, plan):  # one run per --output_dir, for the run's whole life
        return Trainer(args, plan).run()


@command(max_content_width=100)
@options(TrainArgs)
def main(**flags):
    """Safe NPT equivalence pre-training: the NPT student learns to reproduce the base model's layers."""
    sys.exit(train(TrainArgs(**flags)))


if __name__ == "__main__":
    main()
