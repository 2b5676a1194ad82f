"""The checks of the NaN fixes of docs/NPT_FIX_SUMMARY.md on the embedded smollm2-135m (or --model_name), on the
seed's gate form and on the default exact target (its closed-form start, a kl step, a NaN batch), and `main`, the
click command of test_fixed_npt.py / npt-verify-fixes.

Each `check_*` takes the Subject (the models under test, loaded once on first use) and, as keyword
parameters, the thing under test (defaulting to the project's own); it raises AssertionError when that
is wrong, so tests/test_fixed_checks.py can show that every check fails on the reverted fix.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
import time
import warnings

import click
import torch
import torch.nn.functional as F

import npt
from npt_tools.arguments import EXACT_RANK
from npt_tools.cli import command, first_line, flag, options
from npt_tools.closed_form import init_exact
from npt_tools.data import builtin_texts
from npt_tools.models import EMBEDDED_MODEL, ModelArgs, load_model_config_or_fail, load_model_or_fail, resolve_dtype
from npt_tools.objective import equivalence_loss, normalized_mse
from npt_tools.step import nan_embeddings, optimizer_step

SAMPLE_TEXTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def add(a, b):\n    return",
)
EXTREME_SCALES = (1.0, 1e2, 1e4, 1e6)
FULL_RANK_TOLERANCE = 1e-5  # max |logit difference| / max |logit| at rank d_model: fp32 rounding measures ~2e-6
AGREEMENT_MIN = 0.75  # the default rank's held-out top-1 agreement after its start: measured 0.88-0.90 (0.64 at r=64)


# ----------------------------------------------------------------------------- the models under test
class Subject:
    """The models the checks run on, each loaded once on first use: the base model (never modified:
    checks work on copies), fresh NPT copies of it, and a 4-bit load asked for fp16 too."""

    def __init__(self, model_name: str = EMBEDDED_MODEL, use_quantization: bool = False, use_fp16: bool = False,
                 loaded: tuple | None = None, trust_remote_code: bool = False):
        self.model_name, self.use_quantization, self.use_fp16 = model_name, use_quantization, use_fp16
        self.trust_remote_code = trust_remote_code
        if loaded is not None:  # (model, tokenizer) already in memory, e.g. the tests' `embedded` fixture
            self.base = loaded

    @functools.cached_property
    def base(self) -> tuple:
        """(base model, tokenizer) as the flags load it."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return load_model_or_fail(self.model_name, self.use_quantization, self.use_fp16,
                                  trust_remote_code=self.trust_remote_code)

    @property
    def tokenizer(self):
        return self.base[1]

    def npt_model(self, seed: int = 0, **config):
        """A fresh NPT copy of the base model (adapters at their init): the seed's gate form unless `config` names
        another target."""
        torch.manual_seed(seed)
        return npt.convert_to_npt(copy.deepcopy(self.base[0]), npt.NPTConfig(**{"modulation_target": "gate", **config}))

    def exact_model(self, rank: int | None = None, seed: int = 0):
        """A fresh exact-target NPT copy at `rank` (default: the trainer's, EXACT_RANK or d_model if smaller), its
        adapters not yet started."""
        d_model = self.base[0].config.hidden_size
        return self.npt_model(seed, modulation_target="exact", rank=rank or min(EXACT_RANK, d_model)).eval()

    def sample_batches(self) -> list[dict]:
        """The sample texts as two batches: what the exact checks start from."""
        return [self.batch(SAMPLE_TEXTS[:2]), self.batch(SAMPLE_TEXTS[2:])]

    @functools.cached_property
    def corpus_batches(self) -> tuple[list[dict], list[dict]]:
        """(start, held out): batches of two 128-token windows of the builtin corpus, the first eight documents
        and the last four: held-out positions the start never saw."""
        docs = builtin_texts()

        def batches(texts):
            return [dict(self.tokenizer(list(texts[i:i + 2]), return_tensors="pt", padding=True, truncation=True,
                                        max_length=128)) for i in range(0, len(texts), 2)]
        return batches(docs[:8]), batches(docs[-4:])

    @functools.cached_property
    def reference_npt_model(self):
        """A fresh NPT model shared by the read-only checks."""
        return self.npt_model().eval()

    @functools.cached_property
    def quantized(self):
        """The model loaded the way `--use_quantization --use_fp16` loads it (the conflicting pair)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model_or_fail(self.model_name, use_quantization=True, use_fp16=True,
                                      trust_remote_code=self.trust_remote_code)[0]

    def batch(self, texts=SAMPLE_TEXTS) -> dict:
        return dict(self.tokenizer(list(texts), return_tensors="pt", padding=True))


def adapter_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}


# ----------------------------------------------------------------------------- fix 1: the multiplicative factor
def check_factor_range(subject: Subject, factor_fn=npt.modulation_factor) -> str:
    """Open range (0.5, 1.5) over a sweep of m, and the whole of it is reached (the seed text's [0.5, 1.5])."""
    m = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    f = factor_fn(m)
    lo, hi = f.min().item(), f.max().item()
    assert lo > 0.5 and hi < 1.5, f"factor over m in [-30, 30] spans [{lo:.6g}, {hi:.6g}], not inside (0.5, 1.5)"
    assert lo < 0.51 and hi > 1.49, f"factor spans only [{lo:.6g}, {hi:.6g}]: it should reach (0.5, 1.5)"
    assert bool((f[1:] >= f[:-1]).all()), "factor is not monotone in m"
    return f"m in [-30, 30] -> factor in [{lo:.6g}, {hi:.6g}]"


def check_factor_never_zero(subject: Subject, factor_fn=npt.modulation_factor) -> str:
    """Positive and finite even at extreme m, in fp32 and fp16, with a finite gradient."""
    for dtype in (torch.float32, torch.float16):
        m = torch.tensor([-1e4, -100.0, -20.0, -5.0, 0.0, 5.0, 20.0, 100.0, 1e4, -math.inf, math.inf], dtype=dtype)
        f = factor_fn(m)
        assert bool(torch.isfinite(f).all()), f"factor is not finite at extreme m ({dtype}): {f.tolist()}"
        assert f.min().item() >= 0.5, f"factor reaches {f.min().item():g} at extreme m ({dtype}): it must stay >= 0.5"
    m = torch.linspace(-50, 50, 1001, requires_grad=True)
    factor_fn(m).sum().backward()
    assert bool(torch.isfinite(m.grad).all()), "factor's gradient is not finite"
    return "min factor at m=-1e4 / -inf (fp32, fp16) >= 0.5; gradient finite"


def check_identity_at_init(subject: Subject, factor_fn=npt.modulation_factor,
                           adapter: npt.NPTAdapter | None = None) -> str:
    """factor(0) == 1 exactly, and a fresh adapter's multiplicative branch leaves the gate unchanged exactly."""
    adapter = adapter or npt.npt_layers(subject.reference_npt_model)[0].adapter
    one = factor_fn(torch.zeros(4)).tolist()
    assert one == [1.0] * 4, f"factor(0) = {one[0]!r}, not exactly 1: the initial model is not unmodulated"
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, adapter.A_proj.out_features, generator=gen) * 10  # (B, T, r)
    gate = torch.randn(3, 5, adapter.B_mult.out_features, generator=gen)  # (B, T, F)
    with torch.no_grad():
        f = factor_fn(adapter.B_mult(z))
        g = npt.modulated_gate(gate, z, None, adapter.B_mult.weight)[0]
    assert torch.equal(f, torch.ones_like(f)), \
        f"fresh B_mult gives factors in [{f.min().item():g}, {f.max().item():g}], not exactly 1"
    assert torch.equal(g, gate), "a fresh multiplicative branch changes the gate"
    return "factor(0) == 1 and fresh B_mult leaves the gate bitwise unchanged"


# ----------------------------------------------------------------------------- fix 3: initialization
def check_init_scales(subject: Subject, adapter: npt.NPTAdapter | None = None) -> str:
    """A_proj ~ N(0, 0.02), B_add ~ N(0, 0.001), B_mult == 0, no biases, fp32."""
    adapter = adapter or npt.npt_layers(subject.reference_npt_model)[0].adapter
    a, b = adapter.A_proj.weight.detach(), adapter.B_add.weight.detach()
    for name, w, std in (("A_proj", a, 0.02), ("B_add", b, 0.001)):
        assert abs(w.std().item() - std) < 0.1 * std, f"{name} std {w.std().item():.4g}, expected {std} (+-10%)"
        assert abs(w.mean().item()) < 0.1 * std, f"{name} mean {w.mean().item():.3g}, expected 0"
    assert not adapter.B_mult.weight.detach().any(), \
        f"B_mult is not zero at init (max |w| {adapter.B_mult.weight.abs().max().item():.3g})"
    for name in ("A_proj", "B_add", "B_mult"):
        lin = getattr(adapter, name)
        assert lin.bias is None, f"{name} has a bias"
        assert lin.weight.dtype == torch.float32, f"{name} is {lin.weight.dtype}, adapters hold fp32 weights"
    return f"A_proj std {a.std().item():.4f}, B_add std {b.std().item():.5f}, B_mult == 0"


# ----------------------------------------------------------------------------- fix 4: the loss
def check_loss_bounded(subject: Subject, loss_fn=normalized_mse) -> str:
    """Under hidden states scaled up to 1e6 the loss stays finite, <= 4, scale-free, with a small gradient,
    while the standard MSE of the same tensors explodes."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 576, generator=gen)  # (B, T, D)
    student = teacher + torch.randn(2, 8, 576, generator=gen)
    base = loss_fn(student, teacher).item()
    assert base > 0, "loss is 0 for different hidden states"
    for s in EXTREME_SCALES:
        x = (student * s).requires_grad_()
        loss = loss_fn(x, teacher * s)
        loss.backward()
        value, grad = loss.item(), x.grad.norm().item()
        assert math.isfinite(value) and value <= 4, f"loss {value:.4g} at scale {s:g}: not bounded by 4"
        assert abs(value - base) <= 1e-3 * base, f"loss {value:.4g} at scale {s:g} vs {base:.4g} at scale 1"
        assert math.isfinite(grad) and grad <= 1, f"gradient norm {grad:.4g} at scale {s:g}"
    standard = F.mse_loss(student * 1e4, teacher * 1e4).item()
    assert standard > 1e6, "the test inputs are not extreme"
    return f"loss {base:.3e} at every scale 1..1e6 (standard MSE at 1e4: {standard:.2e})"


# ----------------------------------------------------------------------------- fix 2: precision
def check_precision(subject: Subject, resolve_fn=resolve_dtype) -> str:
    """--use_quantization with --use_fp16 computes in FP32 and warns once; the other combinations as asked."""
    expected = {(True, True): torch.float32, (True, False): torch.float32,
                (False, True): torch.float16, (False, False): torch.float32}
    for (quant, fp16), dtype in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = resolve_fn(quant, fp16)
        assert got == dtype, f"use_quantization={quant} use_fp16={fp16} resolves to {got}, expected {dtype}"
        conflict = quant and fp16
        assert len(caught) == int(conflict), \
            f"use_quantization={quant} use_fp16={fp16}: {len(caught)} warnings, expected {int(conflict)}"
        if conflict:
            text = str(caught[0].message).lower()
            assert "fp16" in text and "fp32" in text, f"the warning does not say what happens: {text!r}"
    return "quantization + fp16 -> float32 with a warning; fp16 alone -> float16"


def check_quantized_compute(subject: Subject, model=None) -> str:
    """A 4-bit load (asked for fp16 too) computes in FP32: every Linear4bit's compute dtype, every float
    parameter, and finite fp32 logits."""
    model = model if model is not None else subject.quantized
    quantized = [(n, m) for n, m in model.named_modules() if npt.is_4bit(m)]
    assert quantized, "no 4-bit layers: the model is not quantized"
    bad = [(n, m.compute_dtype) for n, m in quantized if m.compute_dtype != torch.float32]
    assert not bad, f"{len(bad)} 4-bit layers compute in {bad[0][1]}, not float32 (e.g. {bad[0][0]})"
    half = [n for n, p in model.named_parameters() if p.dtype in (torch.float16, torch.bfloat16)]
    assert not half, f"{len(half)} parameters are half precision (e.g. {half[0]})"
    with torch.no_grad():
        logits = model(**subject.batch(SAMPLE_TEXTS[:1]), use_cache=False).logits
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all()), "4-bit logits not finite fp32"
    return f"{len(quantized)} Linear4bit layers compute in float32; logits finite"


# ----------------------------------------------------------------------------- the NPT model works
def check_finite_logits(subject: Subject, model=None) -> str:
    """Finite logits on every real token of the sample texts, and a next token for each."""
    model = model if model is not None else subject.reference_npt_model
    tokenizer = subject.tokenizer
    enc = subject.batch(SAMPLE_TEXTS)
    with torch.no_grad():
        logits = model(**enc, use_cache=False).logits  # (B, T, V)
    real = enc["attention_mask"].bool()
    bad = (~torch.isfinite(logits[real])).sum().item()
    assert bad == 0, f"{bad} non-finite logits on the sample texts"
    last = real.sum(-1) - 1  # right padding: last real position per text
    next_ids = logits[torch.arange(len(SAMPLE_TEXTS)), last].argmax(-1)  # (B,)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert bool(((next_ids >= 0) & (next_ids < vocab)).all())
    with torch.no_grad(), npt.npt_disabled(model):  # the base model's choice, for comparison
        base_ids = model(**enc, use_cache=False).logits[torch.arange(len(SAMPLE_TEXTS)), last].argmax(-1)
    words = [f"{tokenizer.decode([int(i)])!r} (base {tokenizer.decode([int(j)])!r})" for i, j in zip(next_ids, base_ids)]
    return "next tokens " + ", ".join(words)


# ----------------------------------------------------------------------------- fixes in the trainer
def _optimizer(model):
    optimizer = torch.optim.AdamW(npt.get_adapter_params(model), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def check_training_step(subject: Subject, step_fn=optimizer_step, loss_fn=equivalence_loss, model=None) -> str:
    """One safe step (gate target, layerwise objective): finite loss, finite gradients on every adapter parameter
    and on nothing else; the adapters move, the base model does not."""
    model = model if model is not None else subject.npt_model(seed=1).train()
    return safe_step(subject, model, step_fn, loss_fn, "layerwise")


def safe_step(subject: Subject, model, step_fn, loss_fn, objective: str) -> str:
    """check_training_step's assertions on `model` under `objective`."""
    micro = subject.batch(SAMPLE_TEXTS[:2])
    out = loss_fn(model, micro, objective=objective)
    assert math.isfinite(out.loss.item()), f"loss {out.loss.item()} is not finite"
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    adapter = {n for n, _ in model.named_parameters() if ".adapter." in n}
    assert set(grads) <= adapter, f"gradients reach base parameters (e.g. {sorted(set(grads) - adapter)[0]})"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter, f"trainable parameters besides the adapters (e.g. {sorted(trainable - adapter)[0]})"
    assert set(grads) == adapter, f"{len(adapter - set(grads))} adapter parameters get no gradient"
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()), "non-finite adapter gradients"
    for p in model.parameters():
        p.grad = None

    before = adapter_snapshot(model)
    optimizer, scheduler = _optimizer(model)
    result = step_fn(model, optimizer, scheduler, [micro], objective=objective)
    assert result.skipped == 0, f"a finite batch was skipped ({result})"
    for key in ("loss", "grad_norm"):
        assert math.isfinite(float(getattr(result, key))), f"{key} {getattr(result, key)} is not finite"
    after = adapter_snapshot(model)
    moved = sum(not torch.equal(before[n], after[n]) for n in before)
    assert moved > 0, "the step changed no adapter parameter"
    assert all(bool(torch.isfinite(v).all()) for v in after.values()), "adapters not finite after the step"
    base = dict(subject.base[0].named_parameters())  # NPT names add ".layer." after the decoder index
    changed = [n for n, p in model.named_parameters()
               if ".adapter." not in n and not torch.equal(p, base[n.replace(".layer.", ".", 1)])]
    assert not changed, f"the step changed base parameters (e.g. {changed[0]})"
    return (f"loss {float(result.loss):.4f}, grad norm {float(result.grad_norm):.3g}, "
            f"{moved}/{len(before)} adapter tensors moved, base unchanged")


POISON_TOKEN = 0  # a micro-batch made only of this id gets a NaN embedding (the planted NaN batch)


def check_nan_batch_skipped(subject: Subject, step_fn=optimizer_step, model=None) -> str:
    """A micro-batch with a NaN loss is skipped: adapters, optimizer and scheduler unchanged, skipped == 1;
    the next good step still trains."""
    model = model if model is not None else subject.npt_model(seed=2).train()
    return nan_skipped(subject, model, step_fn, "layerwise")


def nan_skipped(subject: Subject, model, step_fn, objective: str) -> str:
    """check_nan_batch_skipped's assertions on `model` under `objective`."""
    optimizer, scheduler = _optimizer(model)
    bad = {"input_ids": torch.full((1, 8), POISON_TOKEN), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    before = adapter_snapshot(model)
    lr, sched_epoch = [g["lr"] for g in optimizer.param_groups], scheduler.last_epoch
    with nan_embeddings(model, lambda ids: bool((ids == POISON_TOKEN).all())):
        result = step_fn(model, optimizer, scheduler, [bad], objective=objective)
        assert result.skipped == 1, f"skipped = {result.skipped}, expected 1 for the NaN batch"
        after = adapter_snapshot(model)
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert not changed, f"the NaN batch changed {len(changed)} adapter tensors (e.g. {changed[0]})"
        assert not optimizer.state, "the NaN batch changed the optimizer state"
        assert scheduler.last_epoch == sched_epoch and [g["lr"] for g in optimizer.param_groups] == lr, \
            "the NaN batch advanced the scheduler"
        assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in npt.get_adapter_params(model)), \
            "NaN gradients left behind"
        good = step_fn(model, optimizer, scheduler, [subject.batch(SAMPLE_TEXTS[:1])], objective=objective)
    assert good.skipped == 0 and math.isfinite(float(good.loss)), f"the next good step failed ({good})"
    assert all(bool(torch.isfinite(v).all()) for v in adapter_snapshot(model).values())
    return "NaN batch skipped with no state change; the next step trains"


# ----------------------------------------------------------------------------- the default target: exact
def student_and_teacher_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits on the batch's real tokens, (N, V) each: the teacher is the same model
    under npt_disabled."""
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        student = model(**batch, use_cache=False).logits[real]
        with npt.npt_disabled(model):
            teacher = model(**batch, use_cache=False).logits[real]
    return student, teacher


def check_exact_full_rank(subject: Subject, init_fn=init_exact, model=None) -> str:
    """At rank d_model the exact target after its closed-form start (from the sample texts) is the base model: its
    logits on the sample texts and on held-out text equal the base model's to fp32 precision."""
    model = model if model is not None else subject.exact_model(rank=subject.base[0].config.hidden_size)
    init_fn(model, subject.sample_batches())
    worst = 0.0
    for batch in (subject.batch(SAMPLE_TEXTS), subject.corpus_batches[1][0]):
        student, teacher = student_and_teacher_logits(model, batch)
        bad = (~torch.isfinite(student)).sum().item()
        assert bad == 0, f"{bad} non-finite logits at full rank"
        worst = max(worst, ((student - teacher).abs().max() / teacher.abs().max()).item())
    assert worst <= FULL_RANK_TOLERANCE, (f"at full rank the logits differ from the base model's by {worst:.2e} of "
                                          f"their largest (tolerance {FULL_RANK_TOLERANCE:g})")
    return f"rank {model.npt_config.rank}: logits within {worst:.1e} of the base model's (relative to the largest)"


def check_exact_default_rank(subject: Subject, init_fn=init_exact, model=None) -> str:
    """At the trainer's default rank, the closed-form start (from eight corpus documents) keeps the teacher's next
    token on most held-out positions, with finite logits. Held out: the sample texts are fewer tokens than the
    rank, so a start from them reproduces them exactly whatever the rank."""
    model = model if model is not None else subject.exact_model()
    start, held_out = subject.corpus_batches
    init_fn(model, start)
    agree = total = 0
    for batch in held_out:
        student, teacher = student_and_teacher_logits(model, batch)
        bad = (~torch.isfinite(student)).sum().item()
        assert bad == 0, f"{bad} non-finite logits at rank {model.npt_config.rank}"
        agree += (student.argmax(-1) == teacher.argmax(-1)).sum().item()
        total += len(teacher)
    share = agree / total
    assert share >= AGREEMENT_MIN, (f"the rank-{model.npt_config.rank} start keeps the teacher's next token on "
                                    f"{share:.1%} of {total} held-out positions, below {AGREEMENT_MIN:.0%}")
    return f"rank {model.npt_config.rank}: the teacher's next token on {share:.1%} of {total} held-out positions"


def started_exact_model(subject: Subject, seed: int):
    """A default-rank exact model in train mode after its closed-form start from the last sample text: the steps
    run on the others, which a start from them would reproduce exactly (fewer tokens than the rank: nothing to fit)."""
    model = subject.exact_model(seed=seed)
    init_exact(model, [subject.batch(SAMPLE_TEXTS[2:])])
    return model.train()


def check_exact_training_step(subject: Subject, step_fn=optimizer_step, loss_fn=equivalence_loss, model=None) -> str:
    """One safe step on the exact target (kl objective) after its start: check_training_step's assertions."""
    model = model if model is not None else started_exact_model(subject, seed=1)
    return safe_step(subject, model, step_fn, loss_fn, "kl")


def check_exact_nan_batch_skipped(subject: Subject, step_fn=optimizer_step, model=None) -> str:
    """A NaN micro-batch on the exact target (kl objective) is skipped: check_nan_batch_skipped's assertions."""
    model = model if model is not None else started_exact_model(subject, seed=2)
    return nan_skipped(subject, model, step_fn, "kl")


CHECKS = {  # name (for --check) -> (what it verifies, the check)
    "factor_range": ("factor range (0.5, 1.5)", check_factor_range),
    "factor_never_zero": ("factor never zero", check_factor_never_zero),
    "identity_at_init": ("identity at init", check_identity_at_init),
    "init_scales": ("init scales", check_init_scales),
    "loss_bounded": ("normalized MSE bounded", check_loss_bounded),
    "precision": ("quantization + fp16 -> FP32", check_precision),
    "quantized_compute": ("4-bit compute dtype", check_quantized_compute),
    "finite_logits": ("finite logits, next token", check_finite_logits),
    "training_step": ("safe training step", check_training_step),
    "nan_batch_skipped": ("NaN batch skipped", check_nan_batch_skipped),
    "exact_full_rank": ("exact target at full rank = the base model", check_exact_full_rank),
    "exact_default_rank": ("exact target at the default rank keeps the next token", check_exact_default_rank),
    "exact_training_step": ("exact target: safe training step (kl)", check_exact_training_step),
    "exact_nan_batch_skipped": ("exact target: NaN batch skipped (kl)", check_exact_nan_batch_skipped),
}


def run_check(subject: Subject, name: str) -> tuple[str, str]:
    """(PASS | FAIL, detail): a crash is a failure of that check, not of the whole run."""
    try:
        return "PASS", CHECKS[name][1](subject)
    except AssertionError as e:
        return "FAIL", str(e) or "assertion failed"
    except Exception as e:
        return "FAIL", f"{type(e).__name__}: {first_line(e)}"


# ----------------------------------------------------------------------------- CLI
@dataclasses.dataclass
class VerifyArgs(ModelArgs):
    """test_fixed_npt.py's arguments, one field per flag after the model flags."""
    check: tuple = flag((), f"Run only this check (repeatable): {', '.join(CHECKS)}.  [default: all]", multiple=True,
                        type=click.Choice(list(CHECKS)), metavar="NAME")


@command()
@options(VerifyArgs)
def main(**flags):
    """Run each NaN fix's check on the model; PASS/FAIL per check. Exit 0 only if all pass."""
    args = VerifyArgs(**flags)
    load_model_config_or_fail(args.model_name, args.trust_remote_code)  # a bad --model_name: one line, not ten FAILs
    subject = Subject(args.model_name, args.use_quantization, args.use_fp16, trust_remote_code=args.trust_remote_code)
    names = args.check or tuple(CHECKS)
    width = max(len(name) for name in names)
    failed = 0
    for name in names:
        start = time.perf_counter()
        status, detail = run_check(subject, name)
        failed += status == "FAIL"
        click.echo(f"{status}  {name:<{width}}  {CHECKS[name][0]}: {detail}  ({time.perf_counter() - start:.1f}s)")
    click.echo(f"\n{len(names) - failed}/{len(names)} checks passed" + (f", {failed} FAILED" if failed else ""))
    sys.exit(1 if failed else 0)
