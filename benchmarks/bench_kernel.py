"""Benchmark of the modulated SwiGLU (kernels/modulated_swiglu.py, imported as npt_kernels) on a CUDA GPU.

Times (median of triton.testing.do_bench) the forward, the full backward, and the backward
without input gradients (gate / up not requiring grad: only z and the adapter weights get
gradients), for the `gate` modulation target and for `down` (down_u given: the kernels also
produce down_s = h @ down_u^T and take its gradient), for

  eager     the PyTorch reference (npt_kernels.modulated_swiglu.modulated_swiglu_reference)
  compile   torch.compile of the reference
  liger     Liger-Kernel's SiLU*mul (LigerSiLUMulFunction) with the adapter matmuls and the
            modulation in PyTorch (only when liger-kernel is importable)
  triton    ours (backend="triton")

and prints a markdown table with ms, achieved GB/s (bytes: forward 3 N F elements, full
backward 5 N F, backward without input grads 3 N F) as a fraction of the device-to-device
copy bandwidth measured in the same run, and the bytes saved for backward per layer
(tensors packed by autograd, via torch.autograd.graph.saved_tensors_hooks).

    python -m benchmarks.bench_kernel [--dtype bf16] [--shapes 8192x14336x16,8192x1536x16] [--targets gate,down]

Needs a CUDA GPU: on a machine without one it prints a one-line message and exits 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


DEFAULT_SHAPES = "8192x14336x16,8192x14336x64,8192x1536x16"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of gate / up / h (default bf16)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES,
                   help=f"comma-separated NxFxr triples (default {DEFAULT_SHAPES})")
    p.add_argument("--add-scale", type=float, default=0.1)
    p.add_argument("--targets", default="gate,down", help="comma-separated subset of gate,down (default both)")
    p.add_argument("--down-rank", type=int, default=4, help="K of down_u for the down target (default 4)")
    p.add_argument("--impls", default="eager,compile,liger,triton",
                   help="comma-separated subset of eager,compile,liger,triton")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    args = p.parse_args(argv)
    text = args.shapes
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
        assert args.shapes and all(len(s) == 3 and min(s) >= 1 for s in args.shapes)
    except (ValueError, AssertionError):
        p.error(f"--shapes: expected comma-separated NxFxr triples, got {text!r}")
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = set(args.impls) - {"eager", "compile", "liger", "triton"}
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}")
    args.targets = [s.strip() for s in args.targets.split(",") if s.strip()]
    if not args.targets or set(args.targets) - {"gate", "down"}:
        p.error(f"--targets: expected a subset of gate,down, got {args.targets}")
    if args.down_rank < 1:
        p.error("--down-rank must be >= 1")
    return args


# ------------------------------------------------------------------------------ implementations
def make_impls(names, add_scale):
    import npt  # noqa: F401  (registers our kernels/ folder as npt_kernels)
    from npt_kernels.modulated_swiglu import modulated_swiglu, modulated_swiglu_reference, modulation_factor

    impls = {}  # name -> fn(gate, up, z, w_add, w_mult, down_u or None)
    if "eager" in names:
        impls["eager"] = lambda g, u, z, wa, wm, du: modulated_swiglu_reference(g, u, z, wa, wm, add_scale, du)
    if "compile" in names:
        compiled = torch.compile(modulated_swiglu_reference)
        impls["compile"] = lambda g, u, z, wa, wm, du: compiled(g, u, z, wa, wm, add_scale, du)
    if "liger" in names:
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            print(f"liger-kernel not importable ({type(exc).__name__}: {exc}); skipping it", file=sys.stderr)
        else:
            def liger(g, u, z, wa, wm, du):
                zf = z.float()
                m = zf @ wm.float().t()
                a = zf @ wa.float().t()
                gm = (g.float() * modulation_factor(m) + add_scale * a).to(g.dtype)
                h = LigerSiLUMulFunction.apply(gm, u)
                out = (h, a.square().sum(-1), m.square().sum(-1))
                return out if du is None else out + (h.float() @ du.t(),)  # (N, K); from h in g's dtype
            impls["liger"] = liger
    if "triton" in names:
        impls["triton"] = lambda g, u, z, wa, wm, du: modulated_swiglu(g, u, z, wa, wm, add_scale, backend="triton",
                                                                        down_u=du)
    return impls


# ------------------------------------------------------------------------------ measurements
def saved_bytes(fn, inputs):
    """Bytes autograd saves for backward in one call (each distinct tensor counted once)."""
    seen = {}

    def pack(t):
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


def bench_one(fn, inputs, grads_out, do_bench, warmup, rep):
    """(forward ms, backward ms) for one set of leaves (requires_grad already set)."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    fwd_ms = do_bench(lambda: fn(*inputs), warmup=warmup, rep=rep)
    outs = fn(*inputs)
    pairs = [(o, g) for o, g in zip(outs, grads_out) if o is not None]

    def backward():
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=True)

    bwd_ms = do_bench(backward, warmup=warmup, rep=rep, grad_to_none=leaves)
    return fwd_ms, bwd_ms


def copy_bandwidth(do_bench, warmup, rep):
    """Device-to-device copy bandwidth in GB/s (read + write of a 1 GiB tensor)."""
    n = 1 << 29  # bf16 elements = 1 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep)
    del src, dst
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def bench_shape(impls, N, F, r, target, args, dtype, do_bench, copy_gbs):
    """Prints one table row per implementation for one shape and modulation target."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(N, F, device="cuda", dtype=dtype, generator=gen)
    up = torch.randn(N, F, device="cuda", dtype=dtype, generator=gen)
    z = torch.randn(N, r, device="cuda", generator=gen)
    w_add = 0.5 * torch.randn(F, r, device="cuda", generator=gen)
    w_mult = 0.5 * torch.randn(F, r, device="cuda", generator=gen)
    down_u = torch.randn(args.down_rank, F, device="cuda", generator=gen) / F ** 0.5 if target == "down" else None
    grads_out = (torch.randn(N, F, device="cuda", dtype=dtype, generator=gen),
                 torch.randn(N, device="cuda", generator=gen), torch.randn(N, device="cuda", generator=gen),
                 torch.randn(N, args.down_rank, device="cuda", generator=gen))
    nf_bytes = N * F * torch.empty((), dtype=dtype).element_size()
    grad = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731

    def cell(ms, nbytes):
        if ms is None:
            return "n/a", "n/a"
        gbs = nbytes / (ms * 1e-3) / 1e9
        return f"{ms:.3f}", f"{gbs:.0f} ({100 * gbs / copy_gbs:.0f}%)"

    for name, fn in impls.items():
        def attempt(what, thunk):
            try:
                return thunk()
            except Exception as exc:  # noqa: BLE001 - report it and go on with the rest
                print(f"{name} {target} {N}x{F}x{r} {what}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                return None
            finally:
                torch.cuda.empty_cache()

        full = [grad(t) for t in (gate, up, z, w_add, w_mult, down_u)]
        part = [gate, up] + [grad(t) for t in (z, w_add, w_mult, down_u)]
        fwd_ms, bwd_ms = attempt("fwd/bwd", lambda: bench_one(fn, full, grads_out, do_bench,
                                                              args.warmup, args.rep)) or (None, None)
        bwd_ni = attempt("bwd without input grads", lambda: bench_one(fn, part, grads_out, do_bench,
                                                                      args.warmup, args.rep))
        saved = attempt("saved bytes", lambda: saved_bytes(fn, full))
        f_ms, f_bw = cell(fwd_ms, 3 * nf_bytes)
        b_ms, b_bw = cell(bwd_ms, 5 * nf_bytes)
        n_ms, n_bw = cell(bwd_ni[1] if bwd_ni else None, 3 * nf_bytes)
        saved_txt = "n/a" if saved is None else f"{saved / 2**20:.1f}"
        print(f"| {target} | {N} | {F} | {r} | {name} | {f_ms} | {f_bw} | {b_ms} | {b_bw} | {n_ms} | {n_bw} "
              f"| {saved_txt} |", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernel.py: no CUDA GPU available; this benchmark only runs on a GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernel.py: unset TRITON_INTERPRET (the interpreter is not what should be timed)",
              file=sys.stderr)
        return 2
    from triton.testing import do_bench

    impls = make_impls(args.impls, args.add_scale)
    copy_gbs = copy_bandwidth(do_bench, args.warmup, args.rep)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; dtype {args.dtype}; "
          f"add_scale {args.add_scale}; down_rank {args.down_rank}; "
          f"copy bandwidth {copy_gbs:.0f} GB/s (torch copy_ of 1 GiB, do_bench median)\n")
    print("| target | N | F | r | impl | fwd ms | fwd GB/s (% copy) | bwd ms | bwd GB/s (% copy) "
          "| bwd no-input-grad ms | GB/s (% copy) | saved for bwd MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        for N, F, r in args.shapes:
            bench_shape(impls, N, F, r, target, args, DTYPES[args.dtype], do_bench, copy_gbs)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
