"""The CUDA source on the CPU: what the shared kernel suite does not vary (Note [the CUDA source
on the CPU] in csrc/cuda_on_cpu.h). The grid, by the SM count of the emulated GPU: one block,
many blocks, and fewer threads than quads, so the grid-stride loop wraps; and buffers whose
pointer is not aligned to a vector access (Note [guarded buffers] in
tests/cuda_on_cpu_backend.py), one at a time, by one and by two elements. Each case against the
reference, as the shared suite checks its rows.

Run by tests/test_cuda_on_cpu.py in its sanitized subprocess, after the shared suite; the file
name has no test_ prefix, so that a plain pytest run does not collect it.
"""
import pytest
import torch

import cuda_on_cpu_backend as emulated
import kernel_cases as kc
from kernel_backends import BY_NAME

BACKEND = BY_NAME["cuda_on_cpu"]
pytestmark = [pytest.mark.cpp,
              pytest.mark.skipif(BACKEND.unavailable_reason() is not None,
                                 reason=str(BACKEND.unavailable_reason())),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

# kernel_cases rows that read every input of the op (update: the pending grad folded into two
# earlier samples, both priors, every device scalar and the device draws)
_EVERY_INPUT = {
    "sample": dict(prior_precision=True, device_draws=True, draw="train", block="default"),
    "accumulate": dict(hess_approx="price", count=3, prior_precision=True, device_draws=True,
                       draw="train", block="default"),
    "update": dict(hess_approx="price", grad=True, count=3, next=True, scaled=True, scale=3.0,
                   prior_precision=True, prior_mean=True, found="zero", draw="train",
                   device_lr=True, device_debias=True, device_draws=True, clip="inf",
                   avgs="given", block="default"),
}
# the buffers of each op (its argument names), each misaligned in turn
BUFFERS = {
    "sample": ("param", "mean", "hess", "prior_precision"),
    "accumulate": ("grad", "hess", "avg_grad", "avg_hess_term", "prior_precision"),
    "update": ("param", "grad", "mean", "momentum", "hess", "avg_grad", "avg_hess_term",
               "prior_mean", "prior_precision"),
}


def row_of(op, ptype, state, segment):
    return dict(_EVERY_INPUT[op], ptype=ptype, state=state, segment=segment)


def quads(segment):
    n, offset = kc.segment({"segment": segment})
    return ((offset + n - 1) >> 2) - (offset >> 2) + 1


# (SM count, segment, the grid it must give): 256 threads a block, at most 8 blocks per SM
GRIDS = [
    (1, "1021@3", "one block"),         # 256 quads: every thread of the block has one
    (1, "1025@4099", "many blocks"),    # 257 quads: a second block for one quad
    (132, "8193@4096", "many blocks"),  # an H100's SMs: 9 blocks for 2049 quads
    (1, "8197@4096", "wraps"),          # 2049 whole quads on 8 blocks: one thread takes two
    (2, "20001@1", "wraps"),            # 5001 quads on 4096 threads, from mid-quad
]


@pytest.mark.parametrize("sm_count,segment,shape", GRIDS,
                         ids=[f"sm{sm}-{seg}" for sm, seg, _ in GRIDS])
def test_cuda_on_cpu_grids(sm_count, segment, shape):
    """Each op on grids of one block, many blocks, and fewer threads than quads (the
    grid-stride loop wraps, with a partial last turn), with fp32 and bf16 state, as the
    reference; the launch had that grid."""
    assert (quads(segment) <= 256) == (shape == "one block")
    for op, ptype, state in (("update", "float32", "bfloat16"), ("update", "float16", "float32"),
                             ("sample", "bfloat16", "bfloat16"),
                             ("accumulate", "float32", "float32")):
        with emulated.sm_count(sm_count):
            kc.run_rows(BACKEND, op, [row_of(op, ptype, state, segment)])
        launched = emulated.last_launch()
        assert launched[0].startswith(f"{op}_kernel<") and launched[-1] == shape, launched


MISALIGNED = [(op, name, shift) for op, names in BUFFERS.items() for name in names
              for shift in (1, 2)]


@pytest.mark.parametrize("op,name,shift", MISALIGNED,
                         ids=[f"{op}-{name}-{shift}" for op, name, shift in MISALIGNED])
def test_cuda_on_cpu_misaligned_buffers(op, name, shift):
    """A buffer whose pointer is one or two elements past a vector boundary (on a segment that
    starts on a quad, whose aligned buffers take the vector path) sends the launch to the
    scalar accesses: UBSan would stop a misaligned vector access. As the reference, for every
    param dtype, both state dtypes, and a long segment's many quads."""
    for ptype, state, segment in (("float32", "float32", "64@4096"),
                                  ("bfloat16", "bfloat16", "64@4096"),
                                  ("float16", "bfloat16", "4097@4")):
        row = row_of(op, ptype, state, segment)
        with emulated.misaligned(**{name: shift}):
            kc.run_rows(BACKEND, op, [row])
        assert emulated.last_launch()[1] == "scalar", (row, emulated.last_launch())
        kc.run_rows(BACKEND, op, [row])
        assert emulated.last_launch()[1] == "vector", (row, emulated.last_launch())


# segments that start mid-quad (offset % 4 != 0), short and long, one from a quad's last element
LINED_UP = ["37@4099", "1025@4097", "20001@1", "6@3"]


@pytest.mark.parametrize("segment", LINED_UP)
def test_cuda_on_cpu_lined_up_buffers(segment):
    """Every buffer starting offset % 4 elements past a vector boundary, as the optimizer's
    buckets lay a mid-quad segment out (Note [quads in the buffers] in ivon_fast/_bucket.py),
    lines the quads up with the vector words: the launch takes the vector path, its partial
    first quad the bounds-checked loop, and reads nothing before the segment (the guards). As
    the reference, for every op, param dtype and state dtype."""
    lead = kc.segment({"segment": segment})[1] % 4
    for op, ptype, state in (("update", "float32", "float32"), ("update", "bfloat16", "bfloat16"),
                             ("update", "float16", "float32"), ("sample", "float32", "bfloat16"),
                             ("accumulate", "bfloat16", "float32")):
        row = row_of(op, ptype, state, segment)
        with emulated.misaligned(**{name: lead for name in BUFFERS[op]}):
            kc.run_rows(BACKEND, op, [row])
        whole_quads = kc.segment(row)[0] - (4 - lead) >= 4
        assert emulated.last_launch()[1] == ("vector" if whole_quads else "scalar"), (
            row, emulated.last_launch())


@pytest.mark.parametrize("where", ["before", "after"])
def test_cuda_on_cpu_guards_see_a_write_outside_a_buffer(where):
    """A byte written into a guard (past ASan's poisoning, which whole 8-byte granules limit) is
    reported when the buffer is released."""
    buffer = emulated.Guarded(torch.zeros(5, dtype=torch.bfloat16), "hess", shift=1)
    # torch's own code is not instrumented, so this write passes ASan unseen, as a write into a
    # granule the poisoning could not cover would
    buffer.raw[buffer.start - 1 if where == "before" else buffer.stop] = 0
    with pytest.raises(AssertionError, match=f"wrote 1 byte\\(s\\) {where} hess"):
        buffer.release()
