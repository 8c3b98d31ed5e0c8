"""The microbenchmarks of `python -m bench` as a pytest-benchmark suite.

Not part of the default test run (`python -m pytest tests` collects tests/ only), and skipped
unless this file or bench/ is named on the command line, so a bare `pytest` stays quick:

    python -m pytest bench/test_bench.py --benchmark-only                # the table, per group
    python -m pytest bench/test_bench.py --benchmark-only --benchmark-json out.json
    python -m pytest bench/test_bench.py --benchmark-disable -q          # smoke: each call once

Two groups per parameter layout, each compared like for like in pytest-benchmark's table:
  * "step":      torch AdamW(fused=True).step(), AdamW(foreach=True).step(), and the ivon_fast
                 drop-in step (IVON(resample_on_step=True).step(): the update fused with drawing the
                 next sample), per available backend, with the on-device finite check of the
                 gradients (skip_nonfinite=True, docs/DESIGN.md section 11) and without it, and
                 with the check and bf16 momentum and Hessian (state_dtype=torch.bfloat16,
                 docs/DESIGN.md section 16: "-bf16state") per backend;
  * "iteration": the official loop's iteration (sampled_params(train=True) entered and left, then
                 step(); skip_nonfinite=True) per available backend, against ivon-opt's (where it
                 is installed and the size is at most IVON_BENCH_SLOW_MAX), with
                 AdamW(fused=True).step() as the anchor.
And one group for the host cost, "host": one step() over IVON_BENCH_HOST_TENSORS one-element
tensors, AdamW(fused=True) against the ivon_fast drop-in step (checked and unchecked) per backend
(on CPU the kernels run inside the call: one element each leaves the per-tensor work; on CUDA
the timed call includes the synchronize after it, so the tiny kernels' latency too: the host time
proper is in python -m bench's host-cost section).
skip_nonfinite is always passed explicitly, whatever the optimizer's default.
Layouts: "flat" (IVON_BENCH_NUMEL params in IVON_BENCH_TENSORS equal tensors) and "gpt" (the
parameter shapes of a bench/gpt.py config: a transformer's many tensors of mixed sizes).

Environment (defaults: CPU / GPU):
    IVON_BENCH_DEVICE     cpu / cuda
    IVON_BENCH_DTYPE      float32 (or bfloat16, float16)
    IVON_BENCH_NUMEL      1M / 64M      (K, M, G are powers of 10; 0 skips the flat layout)
    IVON_BENCH_TENSORS    4
    IVON_BENCH_GPT        tiny / gpt2-125m  (a bench/gpt.py config; "none" skips the gpt layout)
    IVON_BENCH_BACKENDS   the available ones (Triton only on a GPU), comma-separated
    IVON_BENCH_SLOW_MAX   4M / 128M     (largest size for ivon-opt)
    IVON_BENCH_REFERENCE_MAX  0         (largest size for the reference backend, the pure-torch
                          spec: its Philox in torch ops takes seconds per call at 1M on a CPU)
    IVON_BENCH_HOST_TENSORS   300       (tensors of the host group; 0 skips it)
Each timed call synchronizes the device. extra_info holds the size, the byte model's bytes per
element (docs/DESIGN.md section 6; fp32 only: with bf16 state the checked drop-in step moves 28,
AdamW's 28) and, when timed, GB/s at the median.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import ivon_fast  # noqa: E402
from ivon_fast import backends  # noqa: E402

from bench.gpt import CONFIGS, param_shapes  # noqa: E402
from bench.measure import drop_in_step_call  # noqa: E402


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("kKmMgG")) * scale)


def _env(name: str, cpu: str, gpu: str) -> str:
    return os.environ.get(name, gpu if DEVICE.type == "cuda" else cpu)


DEVICE = torch.device(os.environ.get("IVON_BENCH_DEVICE",
                                     "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = getattr(torch, os.environ.get("IVON_BENCH_DTYPE", "float32"))
NUMEL = parse_size(_env("IVON_BENCH_NUMEL", "1M", "64M"))
TENSORS = int(os.environ.get("IVON_BENCH_TENSORS", "4"))
GPT_CONFIG = _env("IVON_BENCH_GPT", "tiny", "gpt2-125m")
SLOW_MAX = parse_size(_env("IVON_BENCH_SLOW_MAX", "4M", "128M"))
REFERENCE_MAX = parse_size(os.environ.get("IVON_BENCH_REFERENCE_MAX", "0"))
HOST_TENSORS = int(os.environ.get("IVON_BENCH_HOST_TENSORS", "300"))

# bytes moved per element by the byte model of docs/DESIGN.md sections 6 and 11 (fp32 params and
# state): the finite check (skip_nonfinite=True) reads the grads once more, 4 B per element; bf16
# momentum and hess (section 16) move 8 B less
BYTES_PER_ELEMENT = {"adamw": 28, "drop_in_step": 36, "drop_in_step_unchecked": 32,
                     "drop_in_step_bf16_state": 28, "official_iteration": 56}
# mode -> (resample_on_step, skip_nonfinite, state_dtype)
MODES = {"drop_in_step": (True, True, torch.float32),
         "drop_in_step_unchecked": (True, False, torch.float32),
         "drop_in_step_bf16_state": (True, True, torch.bfloat16),
         "official_iteration": (False, True, torch.float32)}
# contender suffix -> mode of the step group
SUFFIXES = {"": "drop_in_step", "-unchecked": "drop_in_step_unchecked",
            "-bf16state": "drop_in_step_bf16_state"}


def _backends() -> list:
    if "IVON_BENCH_BACKENDS" in os.environ:
        return [b for b in os.environ["IVON_BENCH_BACKENDS"].split(",") if b]
    return [b for b in ("cuda", "triton", "cpu", "reference")
            if backends.unavailable_reason(b, DEVICE, DTYPE) is None
            and not (b == "triton" and DEVICE.type != "cuda")]  # the interpreter is no perf path


BACKENDS = _backends()
# every backend implements bf16 state
BF16_BACKENDS = [b for b in BACKENDS if b in backends.BACKENDS]


class Layout:
    def __init__(self, name: str, shapes: list):
        self.shapes = shapes
        self.numel = sum(math.prod(shape) for shape in shapes)
        self.label = f"{name} {self.numel / 1e6:.4g}M in {len(shapes)} tensors"
        self.id = name

    def __repr__(self) -> str:
        return self.label


def _layouts() -> list:
    layouts = []
    if NUMEL > 0:
        sizes = [NUMEL // TENSORS + (1 if i < NUMEL % TENSORS else 0) for i in range(TENSORS)]
        layouts.append(Layout("flat", [(size,) for size in sizes]))
    if GPT_CONFIG != "none":
        layouts.append(Layout(f"gpt:{GPT_CONFIG}", param_shapes(CONFIGS[GPT_CONFIG])))
    return layouts


LAYOUTS = _layouts()


@pytest.fixture(autouse=True)
def _only_when_named(request):
    """Skip unless this file or its folder was named on the command line (or IVON_BENCH=1)."""
    here = Path(__file__).resolve()
    named = {Path(arg.split("::")[0]).resolve() for arg in request.config.args}
    if os.environ.get("IVON_BENCH") != "1" and not named & {here, here.parent}:
        pytest.skip("benchmarks run when named: python -m pytest bench/test_bench.py")


def make_params(layout: Layout, seed: int = 0) -> list:
    """Params of the layout's shapes with random values and random grads."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for shape in layout.shapes:
        param = torch.nn.Parameter(
            torch.randn(shape, generator=generator, device=DEVICE).to(DTYPE))
        param.grad = (torch.randn(shape, generator=generator, device=DEVICE) * 1e-2).to(DTYPE)
        params.append(param)
    return params


def adamw(layout: Layout, **kind):
    return torch.optim.AdamW(make_params(layout), lr=1e-3, **kind).step


def ivon_fast_call(layout: Layout, backend: str, mode: str):
    params = make_params(layout)
    grads = [p.grad.clone() for p in params]
    resample, skip_nonfinite, state_dtype = MODES[mode]
    options = {} if state_dtype == torch.float32 else {"state_dtype": state_dtype}
    optimizer = ivon_fast.IVON(params, lr=1e-3, ess=1e6, backend=backend,
                               resample_on_step=resample, skip_nonfinite=skip_nonfinite,
                               **options)
    with torch.no_grad():
        for param, grad in zip(params, grads):  # the grads are views into the flat buffer now
            param.grad.copy_(grad)
    if resample:
        return drop_in_step_call(optimizer, params)

    def iteration():
        with optimizer.sampled_params(train=True):
            pass  # the grads are already in place
        optimizer.step()
    return iteration


def ivon_opt_call(layout: Layout):
    ivon = pytest.importorskip("ivon")
    optimizer = ivon.IVON(make_params(layout), lr=1e-3, ess=1e6)

    def iteration():
        with optimizer.sampled_params(train=True):
            pass
        optimizer.step()
    return iteration


def measure(benchmark, layout: Layout, group: str, call, kind: str | None, **info) -> None:
    """Benchmark ``call`` (device-synchronized) in the layout's ``group``."""
    benchmark.group = f"{group} | {layout.label} | {str(DTYPE).replace('torch.', '')} | {DEVICE}"
    element_bytes = BYTES_PER_ELEMENT.get(kind) if DTYPE == torch.float32 else None
    benchmark.extra_info.update(numel=layout.numel, tensors=len(layout.shapes),
                                device=str(DEVICE), dtype=str(DTYPE),
                                bytes_per_element=element_bytes, **info)

    def synchronized():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
    if benchmark.enabled:
        for _ in range(2):  # warm up: Triton compiles, allocators settle
            synchronized()
    benchmark(synchronized)
    if benchmark.stats is not None and element_bytes:
        median = benchmark.stats.stats.median
        benchmark.extra_info["gbs_median"] = element_bytes * layout.numel / median / 1e9


def _skip_slow(layout: Layout, backend: str | None = None) -> None:
    if backend == "reference" and layout.numel > REFERENCE_MAX:
        pytest.skip(f"the reference backend: {layout.numel} params > IVON_BENCH_REFERENCE_MAX "
                    f"({REFERENCE_MAX})")
    if backend is None and layout.numel > SLOW_MAX:
        pytest.skip(f"ivon-opt: {layout.numel} params > IVON_BENCH_SLOW_MAX ({SLOW_MAX})")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.id)
@pytest.mark.parametrize("contender", ["adamw_fused", "adamw_foreach"]
                         + [f"ivon_fast[{b}]" for b in BACKENDS]
                         + [f"ivon_fast[{b}]-unchecked" for b in BACKENDS]
                         + [f"ivon_fast[{b}]-bf16state" for b in BF16_BACKENDS])
def test_step(benchmark, layout, contender):
    """One optimizer step: AdamW, or the ivon_fast drop-in step (update fused with resampling),
    with the finite check, without it (``-unchecked``), or with it and bf16 momentum and Hessian
    (``-bf16state``)."""
    if contender.startswith("adamw"):
        kind = contender.split("_")[1]
        measure(benchmark, layout, "step", adamw(layout, **{kind: True}), "adamw")
        return
    backend, suffix = contender[len("ivon_fast["):].split("]")
    mode = SUFFIXES[suffix]
    _skip_slow(layout, backend)
    measure(benchmark, layout, "step", ivon_fast_call(layout, backend, mode), mode,
            backend=backend)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.id)
@pytest.mark.parametrize("contender", ["adamw_fused"] + [f"ivon_fast[{b}]" for b in BACKENDS]
                         + ["ivon-opt"])
def test_official_iteration(benchmark, layout, contender):
    """One iteration of the official loop (sample, restore, step), against ivon-opt's."""
    if contender == "adamw_fused":
        measure(benchmark, layout, "iteration", adamw(layout, fused=True), "adamw")
    elif contender == "ivon-opt":
        _skip_slow(layout)
        measure(benchmark, layout, "iteration", ivon_opt_call(layout), None)
    else:
        backend = contender[len("ivon_fast["):-1]
        _skip_slow(layout, backend)
        measure(benchmark, layout, "iteration",
                ivon_fast_call(layout, backend, "official_iteration"), "official_iteration",
                backend=backend)


HOST_LAYOUT = Layout(f"host:{HOST_TENSORS}", [(1,)] * max(1, HOST_TENSORS))


@pytest.mark.parametrize("contender", ["adamw_fused"]
                         + [f"ivon_fast[{b}]" for b in BACKENDS]
                         + [f"ivon_fast[{b}]-unchecked" for b in BACKENDS])
def test_host(benchmark, contender):
    """The host cost of one step() over many one-element tensors (python -m bench's host-cost
    section as a pytest-benchmark group)."""
    if HOST_TENSORS <= 0:
        pytest.skip("IVON_BENCH_HOST_TENSORS=0")
    if contender == "adamw_fused":
        measure(benchmark, HOST_LAYOUT, "host", adamw(HOST_LAYOUT, fused=True), None)
        return
    mode = "drop_in_step_unchecked" if contender.endswith("-unchecked") else "drop_in_step"
    backend = contender.removesuffix("-unchecked")[len("ivon_fast["):-1]
    measure(benchmark, HOST_LAYOUT, "host", ivon_fast_call(HOST_LAYOUT, backend, mode), None,
            backend=backend)
