"""npt-consolidate: write a context into the base weights (npt_tools.plasticity), save the edit artifact
(npt_tools.edit), and show what changed: the top next tokens of each --query bare, in context and edited, and with
--facts CounterFact's metrics before and after. Bad input is one line and exit code 2, with nothing written."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import click
import torch

import npt
from npt_tools import counterfact, edit, plasticity
from npt_tools.cli import check_output_dir_or_fail, command, fail, first_line, flag, options
from npt_tools.models import ModelArgs, load_model_config_or_fail, load_model_or_fail, precision_name


FINITE_CHECKS = 16  # contexts the edited model is run on to check its output stays finite


@dataclasses.dataclass
class ConsolidateArgs(ModelArgs):
    """npt-consolidate's arguments, one field per flag after the model flags."""
    checkpoint: str | None = flag(None, "NPT adapters (a checkpoint-<step> of pretrain_npt_safe.py): consolidate on "
                                        "that NPT model. Without it: on the plain model (the NPT model at full "
                                        "rank).", metavar="DIR")
    context: tuple = flag((), "A context to write into the weights (repeatable; several are written in order).",
                          multiple=True, metavar="TEXT")
    contexts_file: str | None = flag(None, "A text file of contexts, one per line (blank lines skipped), written "
                                           "in order: sequential edits.", metavar="FILE")
    facts: str | None = flag(None, "CounterFact-format records (a JSON list): each record's rewrite, stated as a "
                                   "sentence, is a context; prints ES / PS / NS / S before and after.",
                             metavar="FILE")
    method: str = flag(plasticity.DEFAULT_METHOD, f"Consolidation method: {', '.join(plasticity.METHODS)}.",
                       type=click.Choice(list(plasticity.METHODS)))
    edit_option: tuple = flag((), "A knob of the method, NAME=VALUE (repeatable): a field of "
                                  "npt_tools.plasticity.EditOptions, e.g. direction=gradient (the value's steps "
                                  "along the exact gradient: higher efficacy, one backward pass a step), "
                                  "max_change=0 (no trust region), layers=4,5,6.", multiple=True,
                             metavar="NAME=VALUE")
    output_dir: str | None = flag(None, "Write the edit artifact here (edit.safetensors + edit.json).",
                                  metavar="DIR")
    merge_into: str | None = flag(None, "Also write the edited base model here as a Hugging Face folder "
                                        "(from_pretrained loads it; with --checkpoint, load the same adapters onto "
                                        "it).", metavar="DIR")
    overwrite_output_dir: bool = flag(False, "Replace an earlier edit in --output_dir and an earlier merge in "
                                             "--merge_into (nothing else is ever replaced).")
    query: tuple = flag((), "Print this prompt's top next tokens bare, in context and edited (repeatable).",
                        multiple=True, metavar="TEXT")
    top_k: int = flag(5, "Next tokens printed per --query row.", type=click.IntRange(min=1, max=50))


# ----------------------------------------------------------------------------- inputs
def read_contexts_or_fail(args: ConsolidateArgs) -> tuple[list[str], list | None]:
    """(contexts, records): from exactly one of --context, --contexts_file, --facts."""
    given = [f for f, v in (("--context", args.context), ("--contexts_file", args.contexts_file),
                            ("--facts", args.facts)) if v]
    if not given:
        fail("nothing to write: give --context TEXT, --contexts_file FILE or --facts FILE")
    if len(given) > 1:
        fail(f"{' and '.join(given)} cannot be combined: give the contexts one way")
    if args.facts:
        try:
            records = counterfact.load_records(args.facts)
        except ValueError as e:
            fail(f"--facts: {first_line(e)}")
        return [r.context for r in records], records
    if args.contexts_file:
        try:
            lines = Path(args.contexts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--contexts_file: cannot read {args.contexts_file!r}: {getattr(e, 'strerror', None) or e}")
        contexts = [line.strip() for line in lines if line.strip()]
        if not contexts:
            fail(f"--contexts_file {args.contexts_file!r} holds no context (one per line)")
        return contexts, None
    if not all(c.strip() for c in args.context):
        fail("--context is empty: give the text to write into the weights")
    return [c.strip() for c in args.context], None


def check_outputs_or_fail(args: ConsolidateArgs) -> None:
    """--output_dir and --merge_into can be written (before any work)."""
    if not (args.output_dir or args.merge_into or args.query or args.facts):
        fail("nothing to do: give --output_dir DIR (the artifact), --merge_into DIR, --query TEXT or --facts FILE")
    targets = [(opt, d, files, what) for opt, d, files, what in (
        ("--output_dir", args.output_dir, edit.EDIT_FILES, "an edit"),
        ("--merge_into", args.merge_into, (edit.META_FILE, "config.json"), "a merged model")) if d]
    if len(targets) == 2 and Path(args.output_dir).resolve() == Path(args.merge_into).resolve():
        fail("--output_dir and --merge_into name one folder: give two")
    for opt, d, files, what in targets:
        path = check_output_dir_or_fail(d, opt)
        try:
            edit.check_target(path, args.overwrite_output_dir, files, what, "--overwrite_output_dir")
        except ValueError as e:
            fail(f"{opt}: {e}")


def load_or_fail(args: ConsolidateArgs):
    """The model (with the checkpoint's adapters) and its tokenizer; every flag checked before the weights load."""
    if args.use_quantization:
        fail("--use_quantization: an edit changes the base weights, which must be full precision; run without it "
             "(the artifact applies to the model loaded in fp32)")
    load_model_config_or_fail(args.model_name, args.trust_remote_code)
    if args.checkpoint is not None:
        try:
            npt.read_adapter_config(args.checkpoint)
        except (OSError, ValueError, TypeError) as e:
            fail(f"--checkpoint: {first_line(e)}")
    model, tokenizer = load_model_or_fail(args.model_name, use_fp16=args.use_fp16,
                                          trust_remote_code=args.trust_remote_code)
    if args.checkpoint is not None:
        try:
            npt.load_adapters(model, args.checkpoint)
        except (OSError, ValueError) as e:
            fail(f"--checkpoint: {first_line(e)}")
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- what the edit changed
@torch.no_grad()
def top_next_tokens(model, tokenizer, text: str, k: int) -> list[tuple[str, float]]:
    """The k most probable next tokens after `text` and their probabilities."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.get_input_embeddings().weight.device)
    probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
    top = probs.topk(k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def format_tokens(row: list[tuple[str, float]]) -> str:
    return "  ".join(f"{tok!r} {p:.3g}" for tok, p in row)


def in_context(contexts: list[str], query: str) -> str:
    """The query with every context stated before it (IKE-style, as counterfact.in_context does for a record)."""
    return " ".join(contexts) + " " + query


def query_rows(model, tokenizer, contexts, queries, k) -> dict[str, dict[str, list]]:
    """{query: {"bare": top tokens, "in context": top tokens}} on the unedited model."""
    return {q: {"bare": top_next_tokens(model, tokenizer, q, k),
                "in context": top_next_tokens(model, tokenizer, in_context(contexts, q), k)} for q in queries}


def fact_rows(model, tokenizer, records) -> dict[str, dict]:
    """CounterFact metrics of the unedited model bare and in context (each record's rewrite stated first)."""
    return {"bare": counterfact.evaluate_records(model, tokenizer, records),
            "in context": counterfact.evaluate_records(model, tokenizer, records, prefix=counterfact.in_context)}


def render_facts(rows: dict[str, dict]) -> str:
    keys = ("es", "ps", "ns", "s", "es_top1", "ps_top1", "ns_top1", "s_top1")
    lines = [f"{'':<12}" + "".join(f"{k.upper():>9}" for k in keys)]
    lines += [f"{name:<12}" + "".join(f"{m[k]:>9.3f}" for k in keys) for name, m in rows.items()]
    return "\n".join(lines)


def echo_unedited_ns(model, tokenizer, records) -> None:
    """Where some neighbourhood prompts name a subject that this edit rewrites (their answer is meant to change), NS
    once more without them."""
    m = counterfact.unedited_ns(model, tokenizer, records, records)
    if m["neighbours_unedited"] < m["neighbours"]:
        click.echo(f"NS without the {m['neighbours'] - m['neighbours_unedited']} of {m['neighbours']} neighbourhood "
                   f"prompts that name a subject written here: {m['ns_unedited']:.3f} (top-1 "
                   f"{m['ns_unedited_top1']:.3f})")


def check_finite_or_fail(model, tokenizer, texts: list[str], handle: edit.EditHandle) -> None:
    """The edited model's logits on the contexts and queries must be finite; otherwise the edit is undone and
    refused (finite weights can still overflow a forward pass)."""
    bad = [t for t in texts if not all(math.isfinite(p) for _, p in top_next_tokens(model, tokenizer, t, 1))]
    if bad:
        edit.undo_edit(model, handle)
        fail(f"the edit makes the model's output non-finite (on {bad[0][:60]!r}): refused, nothing written")


# ----------------------------------------------------------------------------- the command
@command()
@options(ConsolidateArgs)
def main(**flags):
    """Write contexts into the base weights of a model; save the edit artifact and show what changed."""
    args = ConsolidateArgs(**flags)
    contexts, records = read_contexts_or_fail(args)
    try:
        knobs = plasticity.parse_options(args.edit_option)
    except ValueError as e:
        fail(f"--edit_option {e}")
    check_outputs_or_fail(args)
    model, tokenizer = load_or_fail(args)
    before = query_rows(model, tokenizer, contexts, args.query, args.top_k)
    facts = fact_rows(model, tokenizer, records) if records else {}
    drift = counterfact.HeldOutDrift(model, tokenizer)
    start = time.perf_counter()
    try:
        deltas = plasticity.compute_edit(model, tokenizer, contexts, records, method=args.method, **knobs)
        seconds = time.perf_counter() - start
        handle = edit.apply_edit(model, deltas)
    except ValueError as e:
        fail(first_line(e))
    check_finite_or_fail(model, tokenizer, contexts[:FINITE_CHECKS] + list(args.query), handle)
    for q, rows in before.items():
        click.echo(f"query: {q!r}")
        for name, row in [*rows.items(), ("edited", top_next_tokens(model, tokenizer, q, args.top_k))]:
            click.echo(f"  {name:<11} {format_tokens(row)}")
    if records:
        facts["edited"] = counterfact.evaluate_records(model, tokenizer, records)
        click.echo(render_facts(facts))
        echo_unedited_ns(model, tokenizer, records)
    held_out = drift.measure(model)
    click.echo(f"edit ({args.method}): {len(contexts)} context(s), {len(deltas)} parameter(s) in layers "
               f"{edit.edited_layers(deltas)}, norm {edit.delta_norm(deltas):.4g}, {seconds:.2f} s; held-out "
               f"next-token KL {held_out['kl']:.3g}, perplexity x{held_out['ppl_ratio']:.4f}")
    meta = {"method": args.method, "options": knobs, "contexts": contexts, "model_name": args.model_name,
            "checkpoint": args.checkpoint, "model_dtype": precision_name(False, args.use_fp16),
            "seconds": seconds, "held_out": held_out}
    write_or_fail(args, deltas, meta)


def write_or_fail(args: ConsolidateArgs, deltas: dict, meta: dict) -> None:
    """The artifact to --output_dir and the merged model to --merge_into (each written whole or not at all)."""
    for opt, folder in (("--output_dir", args.output_dir), ("--merge_into", args.merge_into)):
        if not folder:
            continue
        try:
            if opt == "--output_dir":
                out = edit.save_edit(folder, deltas, meta, args.overwrite_output_dir)
            else:
                out = edit.write_merged(args.model_name, deltas, meta, folder,
                                        torch.float16 if args.use_fp16 else torch.float32, args.overwrite_output_dir,
                                        args.trust_remote_code)
        except OSError as e:
            fail(f"{opt}: cannot write {folder!r}: {e.strerror or e} (nothing was left there)")
        click.echo(f"{'edit' if opt == '--output_dir' else 'edited model'} written to {out}")


if __name__ == "__main__":
    main()
