import os
import re

import torch

# The Triton interpreter must be switched on before any kernel is defined (docs/DESIGN.md section 7).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--nightly", action="store_true", default=False,
                     help="also collect the kernel suite's long grids (marked nightly; the same "
                          "as IVON_FAST_NIGHTLY=1 or -m nightly)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "triton: tests the Triton backend")
    config.addinivalue_line("markers", "cpp: tests the compiled C++/CUDA extension")
    config.addinivalue_line("markers", "nightly: the kernel suite's long grids; collected only "
                                       "with --nightly, -m nightly or IVON_FAST_NIGHTLY=1")
    # the kernel suite builds its grids when its modules are imported (tests/covering.py)
    if config.getoption("--nightly") or re.search(r"(?<!not )\bnightly\b",
                                                  config.option.markexpr or ""):
        os.environ["IVON_FAST_NIGHTLY"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rounding_probe():
    """fp32 values (CPU) that tell round-to-nearest-even from other roundings in bf16 and fp16:
    exact halfway cases (above an even and above an odd neighbour), halfway cases between fp16
    subnormals, the overflow edges of both types, inf, NaNs (payloads too), and random values
    over twelve orders of magnitude; each with both signs."""
    k = torch.arange(64, dtype=torch.float64)
    halfway = torch.cat([1 + (2 * k + 1) * 2.0 ** -8,     # between bf16 neighbours in [1, 2)
                         1 + (2 * k + 1) * 2.0 ** -11,    # between fp16 neighbours in [1, 2)
                         (2 * k + 1) * 2.0 ** -25]).float()  # between fp16 subnormals
    # 65519 / 65520: last value that rounds to fp16's max / first that overflows; 0x7F7F8000:
    # halfway between bf16's max and inf
    # NaNs with payloads other than the canonical one: the largest (whose rounding carry would
    # wrap into the sign bit), a signalling one (whose kept bits alone read as inf) and one
    # whose carry reaches the exponent
    nans = torch.tensor([0x7FFFFFFF, 0x7F800001, 0x7FBFFFFF, 0x7FC0FFFF],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    edges = torch.cat([torch.tensor([65519.0, 65520.0, float("inf"), float("nan")]), nans,
                       torch.tensor([0x7F7F8000], dtype=torch.int32).view(torch.float32)])
    generator = torch.Generator().manual_seed(11)
    spread = torch.randn(4000, generator=generator) * 10.0 ** (
        12 * torch.rand(4000, generator=generator) - 6)
    values = torch.cat([halfway, edges, spread])
    return torch.cat([values, -values])
