"""The Triton kernels build for the GPUs users train on, checked on this CPU machine (no GPU needed).

For sm_80 (A100) and sm_90 (H100), every distinct launch the kernels make over ranks, F, N, the add /
mult / down branches, every gradient-need combination the autograd Function can pass and the gate
dtypes is compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` and the ptxas that
ships in the triton wheel.  Each must fit the target's shared memory per block and, for ranks <= 64,
compile without register spills (ptxas' own ``-v`` report).  The launches are recorded from the real
launch code (``_launch_forward`` / ``_launch_backward`` on meta tensors, with ``_launch`` recording
instead of launching), so what is compiled here is what a GPU would compile at first use.
"""
import contextlib
import functools
import importlib
import io
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the build check needs the triton package")

pytestmark = pytest.mark.integration  # Triton GPU builds (ptxas), minutes
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # workers import npt (which registers npt_kernels) too
# Triton 3.9's default (FP fusion on), said explicitly: unset, every build warns that 3.10 changes it
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import npt  # noqa: E402,F401  (registers our kernels/ folder as npt_kernels)

ms = importlib.import_module("npt_kernels.modulated_swiglu")

# target -> (_block_config's capability, multiprocessors of the reference GPU, shared memory per block)
TARGETS = {80: ((8, 0), 108, 163 * 1024), 90: ((9, 0), 132, 227 * 1024)}  # A100, H100
RANKS = (1, 16, 17, 64, 65, 256)
FS = (1536, 14336)
NS = (1, 8192)
DOWN_RANK = 4  # NPTConfig's default down_rank
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WORKERS = 2


# ------------------------------------------------------------------------------ the launch matrix
@functools.lru_cache(maxsize=None)
def gradient_cases(add, mult, down):
    """One (grads_in, needs) per distinct set of backward flags the autograd Function can produce:
    grads_in = which of (h, add_sq, mult_sq, down_s) receive a gradient (outputs that are None never
    do), needs = needs_input_grad of (gate, up, z, w_add, w_mult, down_u) (a None input never does)."""
    cases = {}
    for grads_in in itertools.product((False, True), (False, add), (False, mult), (False, down)):
        for needs in itertools.product((False, True), (False, True), (False, True), (False, add), (False, mult),
                                       (False, down)):
            flags = ms._backward_flags((add, mult, down), grads_in, needs)
            if any(grads_in) and any(v for k, v in flags.items() if k.startswith("need_")):
                cases.setdefault(tuple(sorted(flags.items())), (grads_in, needs))
    return tuple(cases.values())


def shape_classes(capability, sm_count):
    """One (R, F, N) per distinct (_block_config, F divisibility by 16, down on / off) over the matrix: the
    launch code uses R, F, N only through _block_config and as runtime integers (R, N unspecialized)."""
    reps = {}
    for R, F, N, down in itertools.product(RANKS, FS, NS, (False, True)):
        cfg = ms._block_config(N, F, R, DOWN_RANK if down else 0, capability=capability, sm_count=sm_count)
        reps.setdefault((tuple(sorted(cfg.items())), F % 16 == 0, down), (R, F, N, down, set()))[4].add(R)
    return list(reps.values())


@contextlib.contextmanager
def recording(capability, sm_count):
    """_launch records (kernel, grid, kwargs) instead of launching; the device is the given target."""
    calls = []
    saved = ms._launch, ms._device_target
    ms._launch = lambda name, grid, kwargs: calls.append((name, kwargs))
    ms._device_target = lambda device: dict(capability=capability, sm_count=sm_count)
    try:
        yield calls
    finally:
        ms._launch, ms._device_target = saved


def launches_for_target(cap):
    """Every launch the matrix makes on one target: [(kernel name, kwargs, ranks it stands for), ...]."""
    capability, sm_count, _ = TARGETS[cap]
    meta = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    out = []
    with recording(capability, sm_count) as calls:
        for (R, F, N, down, ranks), add, mult, dtype in itertools.product(
                shape_classes(capability, sm_count), (False, True), (False, True), DTYPES):
            K = DOWN_RANK if down else 0
            saved = (meta(N, F, dtype=dtype), meta(N, F, dtype=dtype), meta(N, R),
                     meta(F, R) if add else None, meta(F, R) if mult else None, meta(K, F) if down else None)
            ms._launch_forward(*saved, 0.1)
            for grads_in, needs in gradient_cases(add, mult, down):
                grads = (meta(N, F, dtype=dtype), meta(N), meta(N), meta(N, K))
                ms._launch_backward(saved, 0.1, [g if on else None for g, on in zip(grads, grads_in)], needs)
            out += [(name, kwargs, ranks) for name, kwargs in calls]
            calls.clear()
    return out


def launch_signature(name, kwargs):
    """Launches equal here compile alike: tensors by dtype, unspecialized arguments (ms._RUNTIME_ARGS) by
    type; the survivors are then keyed exactly as triton's launcher keys them (compile_job)."""
    def proj(k, v):
        if isinstance(v, torch.Tensor):
            return str(v.dtype)
        return type(v).__name__ + ("64" if isinstance(v, int) and abs(v) >= 2 ** 31 else "") \
            if k in ms._RUNTIME_ARGS else v
    return name, tuple((k, proj(k, v)) for k, v in sorted(kwargs.items()))


def compile_job(kernel_name, kwargs, cap):
    """What triton's launcher would compile for these kwargs: (key, job) with a picklable job."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(ms._triton_fns(interpret=False), kernel_name)
    backend = make_backend(GPUTarget("cuda", cap, 32))
    kwargs = dict(kwargs, debug=False)  # as JITFunction.run fills it in
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(**kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    opts = {k: kwargs[k] for k in ("num_warps", "debug")}
    constexprs = sorted((fn.arg_names[path[0]], value) for path, value in constexprs.items())
    job = (kernel_name, cap, signature, constexprs, sorted(attrs.items()), opts)
    # the source hash covers the kernel, its helpers and triton's version: a cached report stays valid
    source_hash = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs}, attrs).hash()
    return json.dumps([source_hash, triton.__version__, cap, opts], sort_keys=True), job


# ------------------------------------------------------------------------------ building (in workers)
def build(job):
    """Compile one job; returns (seconds, shared bytes, spill store bytes, spill load bytes, registers, error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    kernel_name, cap, signature, constexprs, attrs, opts = job
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by triton
    importlib.import_module("npt")  # registers npt_kernels in this worker
    fn = getattr(importlib.import_module("npt_kernels.modulated_swiglu")._triton_fns(interpret=False), kernel_name)
    src = ASTSource(fn, signature, dict(constexprs), {tuple(k): v for k, v in attrs})
    log, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    except Exception as exc:  # noqa: BLE001 - reported by the test, with the compiler's message
        return time.perf_counter() - start, None, None, None, None, f"{type(exc).__name__}: {str(exc)[-3000:]}"
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    if spills is None or regs is None:
        return time.perf_counter() - start, compiled.metadata.shared, None, None, None, \
            f"no ptxas report in: {log.getvalue()[-1000:]!r}"
    return (time.perf_counter() - start, compiled.metadata.shared, int(spills[1]), int(spills[2]), int(regs[1]),
            None)


def _quiet_worker():
    import warnings

    warnings.filterwarnings("ignore")  # triton's FP-fusion default notice, once per worker


def cached_builds(jobs: dict) -> dict:
    """{key: build(job)}: reports of earlier successful builds come from a file in triton's cache
    directory (NPT_KERNEL_BUILD_CACHE=0 ignores it); the rest are compiled by a pool of WORKERS processes."""
    import triton

    path = Path(triton.knobs.cache.dir) / "npt_kernel_build_reports.json"
    use_cache = os.environ.get("NPT_KERNEL_BUILD_CACHE", "1") != "0"
    cache = json.loads(path.read_text()) if use_cache and path.exists() else {}
    todo = sorted((k for k in jobs if k not in cache), key=lambda k: jobs[k][0])  # backward first: better packing
    with ProcessPoolExecutor(WORKERS, mp_context=get_context("spawn"), initializer=_quiet_worker) as pool:
        cache.update(zip(todo, pool.map(build, [jobs[k] for k in todo])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: r for k, r in cache.items() if r[5] is None}))  # failures are rebuilt
    tmp.replace(path)
    print(f"\n{len(todo)} of {len(jobs)} builds compiled now, the rest cached in {path}")
    return {k: cache[k] for k in jobs}


@pytest.fixture(scope="module")
def builds():
    """{cap: [(description, build report), ...]} over every distinct compile key of the matrix."""
    start = time.perf_counter()
    jobs, ranks, n_launches = {}, {}, 0
    for cap in TARGETS:
        signatures = {}
        for name, kwargs, R in launches_for_target(cap):
            n_launches += 1
            signatures.setdefault(launch_signature(name, kwargs), (name, kwargs, set()))[2].update(R)
        for name, kwargs, R in signatures.values():
            key, job = compile_job(name, kwargs, cap)
            jobs[key] = job
            ranks.setdefault(key, set()).update(R)
    enumerated = time.perf_counter() - start
    results = cached_builds(jobs)
    out = {cap: [] for cap in TARGETS}
    for key, res in results.items():
        kernel_name, cap, signature, constexprs, _, opts = jobs[key]
        desc = dict(kernel=kernel_name, ranks=sorted(ranks[key]), gate=signature["gate_ptr"], **dict(constexprs), **opts)
        out[cap].append((desc, res))
    print(f"{n_launches} launches, {len(results)} distinct builds; enumeration {enumerated:.1f} s, "
          f"total {time.perf_counter() - start:.1f} s")
    for cap, rows in out.items():
        ok = [(d, r) for d, r in rows if r[5] is None]
        worst = lambda sel: max((r[2] + r[3] for d, r in ok if sel(max(d["ranks"]))), default=0)  # noqa: E731
        print(f"sm_{cap}: {len(rows)} builds, max shared {max(r[1] for _, r in ok)} B, max registers "
              f"{max(r[4] for _, r in ok)}, max spill bytes (stores + loads): ranks <= 64: {worst(lambda r: r <= 64)}, "
              f"ranks > 64: {worst(lambda r: r > 64)}")
    return out


# ------------------------------------------------------------------------------ the checks
@pytest.mark.parametrize("cap", sorted(TARGETS))
def test_every_configuration_builds(builds, cap):
    failed = [(d, r[5]) for d, r in builds[cap] if r[5] is not None]
    assert not failed, f"sm_{cap}: {len(failed)} builds failed, first: {failed[0]}"


@pytest.mark.parametrize("cap", sorted(TARGETS))
def test_shared_memory_fits(builds, cap):
    limit = TARGETS[cap][2]
    over = [(d, r[1]) for d, r in builds[cap] if r[1] is not None and r[1] > limit]
    assert not over, f"sm_{cap}: shared memory above {limit} bytes per block: {over}"


@pytest.mark.parametrize("cap", sorted(TARGETS))
def test_no_register_spills_up_to_rank_64(builds, cap):
    spilling = [(d, f"{r[2]} B spill stores, {r[3]} B spill loads")
                for d, r in builds[cap] if max(d["ranks"]) <= 64 and r[5] is None and (r[2] or r[3])]
    assert not spilling, f"sm_{cap}: register spills: {spilling}"


def test_matrix_reaches_every_kernel_variant(builds):
    """The dedupe keeps every compile-time variant: both kernels, down on / off, each dtype, each rank tiling."""
    for cap, rows in builds.items():
        seen = {(d["kernel"], d["HAS_DOWN"], d["gate"], d["RANK_LOOP"], d["BLOCK_R"]) for d, _ in rows}
        assert len(seen) == 2 * 2 * len(DTYPES) * 4, (cap, sorted(seen))  # block_r 16 / 32 / 64 / looped
