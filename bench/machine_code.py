"""Machine-code gates (issue 19, item 2): what the GPU would execute, read without a GPU.

    python -m bench.machine_code                 # table + markdown report in bench/out/
    python -m bench.machine_code --record --tag before-diet   # ... in bench/results/
    python -m bench.machine_code --no-triton --no-torch       # the CUDA extension only

For every kernel instance of the built extension (ivon_fast/_C*.so; CI builds it with
IVON_FAST_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX', so it holds sm_80 and sm_90
SASS), for the Triton kernels compiled for sm_90 here (no GPU needed) and for torch's fused
AdamW kernel taken from the installed libtorch_cuda.so: registers, stack, spills (LDL / STL),
the widths of the global loads and stores on the aligned path, and the instructions per element
of that path; then the issue model of issue 19 (issue time against memory time on an H100 and
an H200). tests/test_machine_code.py turns the same measurements into CI's gate.

Instances are discovered, never listed: the kernels' demangled names give their template
arguments, whose names come from the ``template <...> __global__`` declarations in csrc/ and
the enum values from csrc/*.h. A flag that is not a template parameter (a run-time flag) is
"either value" for the loops' use and absent from the access model (below), so the counting
follows the source as it is reshaped.

Counting "SASS instructions per element on the aligned, non-skipped path" (bench/sass.py):
  1. parse the function's SASS into basic blocks (calls are not followed: the slow paths of
     division, square root and sincos are subroutines, off the path);
  2. find the loops by their back-edges; the hot loop is the one holding the aligned path below
     (a Triton program handles its tile once and has no such loop: its region is the whole
     function, entry to exit, so the per-program prologue is counted, as it runs per tile);
  3. the access model says which arrays the instance reads and writes per quad (4 elements) and
     at which width when aligned: 128 bits for fp32 arrays, 64 for bf16 / fp16 params and grads
     and for bf16 state. Within the loop's body (back-edges removed), a dynamic programme over
     the DAG keeps, for every number of vector (>= 64-bit) global accesses, the path from the
     loop head to a latch with the most vector bytes, then the fewest calls, then the fewest
     instructions. The path taken has the model's number of vector accesses times the
     unrolling (the largest such count found): that excludes the skipped step (fewer accesses),
     the scalar fallback (no vector accesses), and the optional arrays of a run-time flag
     (more); the most bytes pick fp32 state over bf16 state; the fewest calls and instructions
     the fast path of division / sqrt / sincos (whose call setup can be as short as the fast
     path itself), and the shorter side of any other uniform branch (a launch scalar's test).
     The bf16-state figure is the same walk with the fewest vector bytes.
  4. elements per iteration = the path's vector load bytes / the model's load bytes per
     element (4 per quad times any unrolling; torch's AdamW: 4 per thread and iteration);
     instructions per element = the path's instructions / elements. Predicated instructions
     count (they issue whether or not their predicate holds).
  The same walk over the PTX of a Triton kernel gives PTX instructions per element.
Why this and not simpler: a count of the whole function (or of the loop's body) adds the
scalar fallback, the bf16-state branch and the slow paths, which never run together with the
aligned path; the longest or shortest path alone picks the fallback or the skip. A profiler's
executed-instruction count needs a GPU; this static count is exact for the path it names, and
counts one issue slot per instruction (no stall, no dual issue).

Tools (no GPU, no CUDA toolkit binaries needed): cuobjdump and nvdisasm from triton's bundle
(backends/nvidia/bin), c++filt and readelf from binutils. The extension's cubins are extracted
with ``cuobjdump -xelf all`` and disassembled with ``nvdisasm -c -fun <symbol indices>``
(indices from readelf): ``cuobjdump -sass -fun NAME,...`` searches the whole binary per name
and takes about a second per instance.

A path with the model's count but other widths (a narrower access), or with no such path (an
array read by scalar accesses), fails the gate; so does any LDL / STL on the path, and any
stack or local frame, CUDA's or Triton's (the kernels have no local arrays: every byte of stack
is a spill; Triton's libdevice sincos kept a 32-byte buffer until the noise got its own
functions, Note [the noise's own functions in Triton]).

The issue model (issue 19): issue time = elements x instructions per element / 32 (a warp
issues for 32 threads) / (SMs x 4 schedulers x clock), against memory time = elements x bytes
per element / bandwidth, at 64M = 2^26 params, for the drop-in step (update with the grad,
count 1, the next sample drawn, fp32 params and state, no finite check: reads g, mean,
momentum, hess, writes mean, momentum, hess, theta = 32 B per element) and fused AdamW (28 B).

Triton without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
works; the signature, constexprs and divisibility attributes come from the JIT's own binder
(``create_function_from_signature`` with a backend made for that target, then
``JITFunction._pack_args``), called with the exact arguments the backend's ``_launch`` passes
(captured by a stub ``run``) on 16-byte aligned CPU tensors. Under TRITON_INTERPRET=1 the
kernels are interpreter functions, so that part runs in a child process without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    from . import sass
except ImportError:  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import sass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_DIR = os.path.join(HERE, "out")          # ignored by git
RESULTS_DIR = os.path.join(HERE, "results")  # tracked: --record writes here
ARCHS = ("sm_80", "sm_90")

# issue 19's model: SMs, clock (Hz), memory bandwidth (B/s)
GPUS = {"H100": (132, 1.755e9, 3.35e12), "H200": (132, 1.98e9, 4.8e12)}
SCHEDULERS_PER_SM, WARP = 4, 32
MODEL_ELEMENTS = 64 * 2**20
DROP_IN_BYTES, ADAMW_BYTES = 32, 28
# issue 19's targets: CUDA and Triton update <= 190 SASS per element; the drop-in step's issue
# time at least 10% below its memory time on an H200
TARGET_PER_ELEMENT, TARGET_SLACK = 190, 0.9

PARAM_BYTES = {"float": 4, "BF16": 2, "F16": 2, "__nv_bfloat16": 2, "__half": 2,
               "BFloat16": 2, "Half": 2}
KINDS = ("sample", "accumulate", "update")


# =============================================================================================
# tools
# =============================================================================================
def tool(name: str) -> str:
    """cuobjdump / nvdisasm ship with triton, not in the CUDA toolkit's folder here; c++filt
    comes with binutils."""
    spec = importlib.util.find_spec("triton")
    folders = ([os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")]
               if spec else [])
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    folders.append(os.path.join(cuda_home, "bin"))
    for folder in folders:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (looked in {folders} and PATH)")
    return found


def run_tool(name: str, *args: str, stdin: str = None) -> str:
    """The tool's stdout (cuobjdump warns on stderr for every cubin without a -fun name)."""
    result = subprocess.run([tool(name), *args], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)[:200]} failed: {result.stderr[-2000:]}")
    return result.stdout


def extension_path() -> str | None:
    """ivon_fast/_C*.so, found without importing ivon_fast (and torch)."""
    spec = importlib.util.find_spec("ivon_fast")
    folders = list(spec.submodule_search_locations) if spec else []
    folders.append(os.path.join(REPO, "ivon_fast"))
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, "_C*.so")))
        if found:
            return found[0]
    return None


def cuda_archs(lib: str) -> list:
    """The SASS architectures embedded in ``lib`` (empty: no CUDA part)."""
    try:
        listing = run_tool("cuobjdump", "-lelf", lib) if os.path.exists(lib) else ""
    except RuntimeError as error:  # a library without device code is an error to cuobjdump
        if "does not contain device code" not in str(error):
            raise
        listing = ""
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)))


def measured_archs(lib: str) -> list:
    """The architectures of ARCHS whose SASS ``lib`` holds (a build for the visible GPU only
    holds one)."""
    archs = cuda_archs(lib)
    return [arch for arch in ARCHS if arch in archs]


def why_no_cuda(lib: str | None) -> str | None:
    """None when ``lib`` holds sm_80 or sm_90 SASS, else why the CUDA gate cannot run."""
    if lib is None:
        return "the extension ivon_fast/_C*.so is not built"
    try:
        archs = cuda_archs(lib)
    except (FileNotFoundError, RuntimeError) as error:
        return f"cannot read the extension's machine code: {error}"
    if not archs:
        return (f"{os.path.basename(lib)} has no CUDA kernels (built without a GPU and without "
                "IVON_FAST_FORCE_CUDA=1)")
    if not any(arch in archs for arch in ARCHS):
        return f"{os.path.basename(lib)} has SASS for {archs}, none of {list(ARCHS)}"
    return None


def resource_usage(binary: str, arch: str) -> dict:
    """{mangled name: (registers, stack bytes, local bytes)} from ``cuobjdump -res-usage``."""
    text = run_tool("cuobjdump", "-res-usage", "-arch", arch, binary)
    usage, name = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            name = match.group(1)
        elif name and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[name] = tuple(int(fields.get(k, 0)) for k in ("REG", "STACK", "LOCAL"))
            name = None
    return usage


def demangle(names: list) -> list:
    if not names:
        return []
    out = run_tool("c++filt", stdin="\n".join(names) + "\n").splitlines()
    return out if len(out) == len(names) else list(names)


# =============================================================================================
# what the source says: template parameters, enum values
# =============================================================================================
_KERNEL_DECL = re.compile(r"template\s*<([^<>]*)>\s*__global__\s+void\s+"
                          r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
_ENUM = re.compile(r"enum\s+class\s+(\w+)[^{;]*\{([^}]*)\}")


def _csrc_text(csrc: str) -> str:
    paths = [p for ext in ("cu", "cuh", "h") for p in glob.glob(os.path.join(csrc, f"*.{ext}"))]
    text = "\n".join(open(p, encoding="utf-8").read() for p in sorted(paths))
    return re.sub(r"//[^\n]*", "", text)


def kernel_parameters(csrc: str = os.path.join(REPO, "csrc")) -> dict:
    """{kernel name: [template parameter names]} of the ``__global__`` templates in csrc/."""
    params = {}
    for plist, name in _KERNEL_DECL.findall(_csrc_text(csrc)):
        params[name] = [p.split("=")[0].split()[-1] for p in plist.split(",") if p.strip()]
    return params


def enum_names(csrc: str = os.path.join(REPO, "csrc")) -> dict:
    """{enum type: {value: enumerator}} of the ``enum class`` declarations in csrc/."""
    enums = {}
    for name, body in _ENUM.findall(_csrc_text(csrc)):
        values, nxt = {}, 0
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, _, value = (part.strip() for part in item.partition("="))
            nxt = int(value, 0) if value else nxt
            values[nxt], nxt = key, nxt + 1
        enums[name] = values
    return enums


def _split_args(text: str) -> list:
    """Top-level comma-separated template arguments."""
    args, depth, start = [], 0, 0
    for k, char in enumerate(text):
        depth += 1 if char in "<(" else -1 if char in ">)" else 0
        if char == "," and depth == 0:
            args.append(text[start:k].strip())
            start = k + 1
    return args + [text[start:].strip()]


def _arg_value(arg: str, enums: dict):
    """A template argument as a Python value: bool, enumerator name, int, or a type's name."""
    if arg in ("true", "false"):
        return arg == "true"
    cast = re.match(r"\(([\w:]+)\)(-?\d+)$", arg)
    if cast:
        enum = cast.group(1).split("::")[-1]
        return enums.get(enum, {}).get(int(cast.group(2)), int(cast.group(2)))
    if re.fullmatch(r"-?\d+", arg):
        return int(arg)
    return arg.split("::")[-1]


def parse_instance(demangled: str, params: dict, enums: dict) -> tuple:
    """(kernel name, {template parameter: value}) of a demangled kernel name."""
    head, _, rest = demangled.partition("<")
    kernel = head.split()[-1].split("::")[-1]
    depth = 1
    for k, char in enumerate(rest):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if depth == 0:
            break
    values = [_arg_value(a, enums) for a in _split_args(rest[:k])] if rest else []
    names = params.get(kernel) or [f"T{i}" for i in range(len(values))]
    return kernel, dict(zip(names, values))


def kind_of(kernel: str) -> str | None:
    return next((kind for kind in KINDS if kind in kernel), None)


def label(kernel: str, flags: dict) -> str:
    def text(value):
        return str(int(value)) if isinstance(value, bool) else str(value)
    return f"{kernel}<{','.join(f'{k}={text(v)}' for k, v in flags.items())}>"


# =============================================================================================
# the access model: which arrays an instance reads and writes, at which aligned width
# =============================================================================================
@dataclasses.dataclass
class Model:
    """Per quad (4 elements): the widths in bits of the aligned loads and stores, with fp32
    state, and with bf16 state (None: the kernel reads no state)."""
    loads: list
    stores: list
    bf16_loads: list = None
    bf16_stores: list = None


def _io(kind: str, f: dict, state_bytes: int) -> tuple:
    """(load element sizes, store element sizes) of one IVON op (docs/DESIGN.md section 6's
    byte model, per array); ``f``: param_bytes, price, first, mode, prec, pmean."""
    p, s = f["param_bytes"], state_bytes
    prior = [4] if f["prec"] else []
    if kind == "sample":
        return [4, s] + prior, [p]
    if kind == "accumulate":
        noise = [s] + prior if f["price"] else []
        return [p] + noise + ([] if f["first"] else [4, 4]), [4, 4]
    grad = [p] if f["mode"] != "kAvgOnly" else []
    averages = [4, 4] if f["mode"] != "kGradOnly" else []
    return ([4, s] + prior + [s] + ([4] if f["pmean"] else []) + grad + averages,
            [4, s, s, p])


def ivon_model(kind: str, f: dict) -> Model:
    def bits(sizes):
        return [4 * 8 * size for size in sizes]
    loads, stores = _io(kind, f, 4)
    reads_state = kind != "accumulate" or f["price"]
    bf16 = _io(kind, f, 2) if reads_state else (None, None)
    return Model(bits(loads), bits(stores), *(bits(x) if x else None for x in bf16))


def cuda_flags(flags: dict) -> dict:
    """The model's view of a CUDA instance's template flags; a flag that is not a template
    parameter (a run-time flag) is absent, so off in the model."""
    return dict(param_bytes=PARAM_BYTES.get(str(flags.get("PT", "float")), 4),
                price=flags.get("PRICE", True), first=flags.get("FIRST", True),
                mode=flags.get("MODE", "kGradOnly"), prec=flags.get("PREC", False),
                pmean=flags.get("PMEAN", False))


def loop_roles(kind: str | None, flags: dict) -> list:
    """Which of the two training loops (with hess_approx='price', the default, and no prior
    arrays) launch this instance: 'drop-in' (update with the next sample; the resting sample),
    'official' (sample, accumulate, update without a next sample). A flag that is not a
    template parameter covers both of its values."""
    if kind is None or flags.get("PREC") is True or flags.get("PMEAN") is True:
        return []
    if kind == "sample":
        return ["drop-in", "official"]
    if flags.get("PRICE") is False:
        return []
    if kind == "accumulate":  # the drop-in loop folds too: step(closure), changed scalars
        return ["drop-in", "official"]
    nxt = flags.get("NEXT")
    return [role for role, used in (("drop-in", nxt is not False), ("official", nxt is not True))
            if used]


# =============================================================================================
# measuring one function
# =============================================================================================
@dataclasses.dataclass
class Row:
    source: str                 # "cuda", "triton", "torch"
    arch: str
    name: str                   # label(kernel, flags) or a short description
    kernel: str = ""
    flags: dict = dataclasses.field(default_factory=dict)
    roles: list = dataclasses.field(default_factory=list)
    regs: int = 0
    stack: int = 0
    local: int = 0
    local_accesses: int = 0     # LDL / STL anywhere in the function
    path_local: int = 0         # ... on the aligned path
    loads: list = dataclasses.field(default_factory=list)   # vector widths on the path
    stores: list = dataclasses.field(default_factory=list)
    narrow: int = 0             # narrower (< 64-bit) global accesses on the path
    elements: float = 0.0       # elements per iteration (per thread)
    per_element: float = None   # SASS instructions per element
    bf16_per_element: float = None
    ptx_per_element: float = None
    problems: list = dataclasses.field(default_factory=list)
    mangled: str = ""           # the function's symbol (CUDA)


def hot_path(blocks: list, expected: int | None, fewest_bytes: bool = False) -> tuple:
    """(Path, instructions, vector count, whether the count is the model's) of the aligned path
    (module docstring, step 3); ``expected``: the model's vector accesses per quad (None: the
    path with the most)."""
    best = None
    for head, ends, nodes in sass.regions(blocks):
        paths = sass.best_paths(blocks, nodes, head, ends, fewest_bytes)
        fits = [c for c in paths if expected and c > 0 and c % expected == 0]
        count = max(fits) if fits else max(paths, default=None)
        if count is None:
            continue
        path, ninstr, nbytes = paths[count]
        rank = (bool(fits), count, -nbytes if fewest_bytes else nbytes, -ninstr)
        if best is None or rank > best[0]:
            best = (rank, path, ninstr, count, bool(fits))
    return best[1:] if best else (None, 0, 0, False)


def _widths(instrs: list, kind: str) -> list:
    return sorted((i.access[1] for i in instrs
                   if i.access and i.access[0] == kind and i.access[1] >= 64), reverse=True)


def _check_widths(found: list, model: list, times: int, what: str) -> list:
    expected = sorted(model * times, reverse=True)
    return [] if found == expected else [f"{what} {found} where the model says {expected}"]


def walk(blocks: list, loads: list, stores: list, fewest_bytes: bool = False) -> dict:
    """The aligned path's figures for one access model (per quad: ``loads``, ``stores``)."""
    known = loads is not None and stores is not None
    expected = len(loads) + len(stores) if known else None  # None: the most vector accesses
    path, ninstr, count, fits = hot_path(blocks, expected, fewest_bytes)
    if path is None:
        return dict(problems=["no loop and no path with vector accesses"])
    instrs = path.instrs(blocks)
    found_loads, found_stores = _widths(instrs, "load"), _widths(instrs, "store")
    load_bytes_per_element = sum(loads) / 8 / 4 if loads else 0
    elements = sum(found_loads) / 8 / load_bytes_per_element if load_bytes_per_element else 0
    figures = dict(instrs=ninstr, loads=found_loads, stores=found_stores, elements=elements,
                   per_element=ninstr / elements if elements else None,
                   path_local=sum(i.local for i in instrs),
                   narrow=sum(1 for i in instrs if i.access and i.access[1] < 64), problems=[])
    if expected and not fits:
        figures["problems"].append(f"no path with the model's {expected} vector accesses per "
                                   f"quad (found {count}): an array is read or written narrower")
    elif expected:
        times = count // expected
        figures["problems"] += (_check_widths(found_loads, loads, times, "loads")
                                + _check_widths(found_stores, stores, times, "stores"))
    return figures


def measure_sass(row: Row, instrs: list, model: Model | None) -> Row:
    """Fill ``row`` from one function's SASS: the aligned path with fp32 state, and with bf16
    state when the kernel reads state."""
    blocks = sass.basic_blocks(instrs)
    row.local_accesses = sum(i.local for i in instrs)
    main = walk(blocks, model.loads if model else None, model.stores if model else None)
    for key in ("loads", "stores", "elements", "per_element", "path_local", "narrow"):
        setattr(row, key, main.get(key, getattr(row, key)))
    row.problems += main["problems"]
    if model and model.bf16_loads:
        bf16 = walk(blocks, model.bf16_loads, model.bf16_stores, fewest_bytes=True)
        row.bf16_per_element = bf16.get("per_element")
        row.problems += [f"bf16 state: {p}" for p in bf16["problems"]]
    if row.path_local:
        row.problems.append(f"spill: {row.path_local} LDL/STL on the aligned path")
    return row


def measure_ptx(ptx: str, model: Model) -> float | None:
    blocks = sass.basic_blocks(sass.parse_ptx(ptx), dialect="ptx")
    return walk(blocks, model.loads, model.stores).get("per_element")


# =============================================================================================
# the CUDA extension
# =============================================================================================
def cuda_instances(lib: str, arch: str) -> list:
    """[Row] of every kernel instance in ``lib`` for ``arch``, with its resources and loop
    roles (no SASS read yet)."""
    usage = resource_usage(lib, arch)
    params, enums = kernel_parameters(), enum_names()
    rows = []
    for mangled, demangled in zip(usage, demangle(list(usage))):
        kernel, flags = parse_instance(demangled, params, enums)
        regs, stack, local = usage[mangled]
        rows.append(Row("cuda", arch, label(kernel, flags), kernel, flags,
                        loop_roles(kind_of(kernel), flags), regs, stack, local,
                        mangled=mangled))
    return rows


def gated(rows: list) -> list:
    """The instances the two training loops use (the CI gate's)."""
    return [row for row in rows if row.roles]


def extract_cubins(lib: str, folder: str) -> dict:
    """{arch: [paths]} of the cubins ``cuobjdump -xelf all`` writes into ``folder`` (one per
    architecture and CUDA translation unit)."""
    subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(lib)], cwd=folder,
                   capture_output=True, check=True)
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.cubin"))):
        match = re.search(r"\.(sm_\d+a?)\.cubin$", path)
        if match:
            found.setdefault(match.group(1), []).append(path)
    return found


def disassemble(cubin: str, names: list = None) -> dict:
    """{mangled name: [Instr]} of ``names`` (None: every function) in ``cubin``. nvdisasm takes
    symbol indices (from readelf) and reads only those functions: much faster than
    ``cuobjdump -sass -fun``, which searches the whole binary for each name."""
    select = []
    if names is not None:
        wanted, indices = set(names), []
        for line in run_tool("readelf", "-sW", cubin).splitlines():
            fields = line.split()
            if len(fields) >= 8 and fields[3] == "FUNC" and fields[-1] in wanted:
                indices.append(fields[0].rstrip(":"))
        if not indices:  # another translation unit's cubin
            return {}
        select = ["-fun", ",".join(indices)]
    return sass.parse_sass(run_tool("nvdisasm", "-c", *select, cubin))


def measure_cuda(cubins: list, rows: list, every: bool = False) -> list:
    """Read the SASS of ``rows`` (one architecture's, from its ``cubins``) and measure each."""
    functions = {}
    for cubin in cubins:
        functions.update(disassemble(cubin, None if every else [row.mangled for row in rows]))
    for row in rows:
        kind = kind_of(row.kernel)
        model = ivon_model(kind, cuda_flags(row.flags)) if kind else None
        measure_sass(row, functions.get(row.mangled, []), model)
        check_frame(row)
    return rows


def check_frame(row: Row) -> None:
    """A stack or local frame is a spill: the kernels have no local arrays."""
    if row.stack or row.local or row.local_accesses:
        row.problems.append(f"spill: {row.stack} B stack, {row.local} B local, "
                            f"{row.local_accesses} LDL/STL in the function")


def measure_rows(lib: str, rows: list, every: bool = False) -> list:
    """Measure ``rows`` (Rows of ``cuda_instances``, any architectures) from ``lib``'s SASS;
    ``every``: disassemble every function at once (faster when most are wanted)."""
    with tempfile.TemporaryDirectory(prefix="ivon_sass_") as folder:
        cubins = extract_cubins(lib, folder)
        for arch in sorted({row.arch for row in rows}):
            measure_cuda(cubins[arch], [row for row in rows if row.arch == arch], every)
    return rows


def cuda_rows(lib: str, only_gated: bool = False) -> list:
    """[Row] of the extension's instances for sm_80 and sm_90 (``only_gated``: the ones the
    two training loops use)."""
    rows = [row for arch in measured_archs(lib) for row in cuda_instances(lib, arch)]
    return measure_rows(lib, gated(rows) if only_gated else rows, every=not only_gated)


# =============================================================================================
# the Triton kernels, compiled for sm_90 without a GPU
# =============================================================================================
# (name, op, param dtype, state dtype, op arguments): the launches of the two loops with the
# optimizer's defaults (hess_approx='price', skip_nonfinite=True: the update gets found_inf;
# "no finite check": skip_nonfinite=False)
TRITON_CASES = (
    ("update, drop-in", "update", "float32", "float32", dict(count=1, next_draw=5)),
    ("update, drop-in, bf16 params", "update", "bfloat16", "float32", dict(count=1, next_draw=5)),
    ("update, drop-in, bf16 state", "update", "float32", "bfloat16", dict(count=1, next_draw=5)),
    ("update, drop-in, no finite check", "update", "float32", "float32",
     dict(count=1, next_draw=5, found_inf=None)),
    ("update, official mc=1", "update", "float32", "float32", dict(count=1)),
    ("update, official mc>1", "update", "float32", "float32", dict(count=2)),
    ("update, averages only", "update", "float32", "float32", dict(count=2, grad=None)),
    ("sample", "sample", "float32", "float32", {}),
    ("accumulate, first", "accumulate", "float32", "float32", dict(count=1)),
    ("accumulate, later", "accumulate", "float32", "float32", dict(count=2)),
)
TRITON_ELEMENTS = (1 << 20) + 3   # n not a multiple of 16: no divisibility specialisation of n


def _call_op(tb, op: str, param_dtype, state_dtype, extra: dict) -> None:
    """One call of the backend's op on 16-byte aligned CPU tensors (torch's CPU allocations are
    64-byte aligned), at offset 0: the aligned launch."""
    import torch
    from ivon_fast.scalars import StepScalars

    def make(dtype):
        return torch.ones(TRITON_ELEMENTS, dtype=getattr(torch, dtype))
    param, grad, mean = make(param_dtype), make(param_dtype), make("float32")
    momentum, hess = make(state_dtype), make(state_dtype)
    avg_grad, avg_term = make("float32"), make("float32")
    common = dict(seed=0x9E3779B97F4A7C15, draw=3, offset=0)
    if op == "sample":
        return tb.sample(param, mean, hess, ess=1e6, weight_decay=1e-4, **common)
    if op == "accumulate":
        return tb.accumulate(grad, hess, avg_grad, avg_term, ess=1e6, weight_decay=1e-4,
                             hess_approx="price", **common, **extra)
    scalars = StepScalars.of(lr=0.1, ess=1e6, weight_decay=1e-4, beta1=0.9, beta2=0.99999,
                             debias=0.1)
    args = dict(grad=grad, found_inf=torch.zeros(1), hess_approx="price", scalars=scalars,
                round_draw=7, **common)
    args.update(extra)
    return tb.update(param, args.pop("grad"), mean, momentum, hess, avg_grad, avg_term, **args)


def triton_launch(op: str, param_dtype: str, state_dtype: str, extra: dict) -> tuple:
    """(kernel, args, kwargs) the backend launches for one op call, with the GPU's tile
    (IVON_TRITON_BLOCK: on a CPU the backend picks the interpreter's) and launch options."""
    from ivon_fast import triton_backend as tb
    kernel = getattr(tb, f"_{op}_kernel")
    captured = []
    saved, block = kernel.run, os.environ.get("IVON_TRITON_BLOCK")
    kernel.run = lambda *args, grid, warmup, **kwargs: captured.append((args, kwargs))
    os.environ["IVON_TRITON_BLOCK"] = str(tb.BLOCK)
    try:
        _call_op(tb, op, param_dtype, state_dtype, extra)
    finally:
        kernel.run = saved
        if block is None:
            os.environ.pop("IVON_TRITON_BLOCK")
        else:
            os.environ["IVON_TRITON_BLOCK"] = block
    (args, kwargs), = captured
    return kernel, args, kwargs


def compile_for_sm90(kernel, args: tuple, kwargs: dict):
    """The kernel compiled for sm_90 with the specialisation the JIT would pick for these
    arguments (its own binder: 16-byte aligned pointers get tt.divisibility=16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound,
                                                              specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def triton_flags(values: dict, op: str) -> dict:
    """The access model's view of a Triton launch's arguments."""
    import torch
    has_grad = values.get("HAS_GRAD", True)
    mode = ("kAvgOnly" if not has_grad else "kGradOnly" if values.get("FIRST", True)
            else "kGradAvg")
    param = values.get("param_ptr", values.get("grad_ptr"))  # grads have the params' dtype
    param_bytes = 2 if param.dtype != torch.float32 else 4
    return dict(param_bytes=param_bytes, price=values.get("PRICE", True),
                first=values.get("FIRST", True), mode=mode,
                prec=values.get("HAS_PRIOR_PRECISION", False),
                pmean=values.get("HAS_PRIOR_MEAN", False))


def triton_row(name: str, op: str, param_dtype: str, state_dtype: str, extra: dict) -> Row:
    """One Triton case: resources, SASS and PTX per element of the full-tile path."""
    kernel, args, kwargs = triton_launch(op, param_dtype, state_dtype, extra)
    values = dict(zip(kernel.arg_names, args), **kwargs)
    compiled = compile_for_sm90(kernel, args, kwargs)
    state_bits = 16 if state_dtype == "bfloat16" else 32
    flags = triton_flags(values, op)
    full = ivon_model(op, flags)
    model = (Model(full.bf16_loads, full.bf16_stores) if state_bits == 16
             else Model(full.loads, full.stores))
    shown = {k: v for k, v in kwargs.items() if k.isupper() and k not in ("BLOCK", "LEAD")}
    row = Row("triton", "sm_90", name, kernel.__name__, dict(shown, params=param_dtype,
                                                             state=state_dtype),
              loop_roles(op, dict(PRICE=flags["price"], PREC=flags["prec"],
                                  PMEAN=flags["pmean"], NEXT=values.get("RESAMPLE"))))
    with tempfile.TemporaryDirectory(prefix="ivon_triton_") as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as out:
            out.write(compiled.asm["cubin"])
        (row.regs, row.stack, row.local), = resource_usage(cubin, "sm_90").values()
        (instrs,) = disassemble(cubin).values()
    measure_sass(row, instrs, model)
    check_frame(row)
    row.ptx_per_element = measure_ptx(compiled.asm["ptx"], model)
    return row


def triton_rows(cases=TRITON_CASES) -> list:
    """[Row] of the Triton cases; in a child process when this one runs the interpreter (its
    kernels cannot be compiled for a GPU target)."""
    from ivon_fast import triton_backend as tb
    if not tb._INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
        return [triton_row(*case) for case in cases]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = [case[0] for case in cases]
    code = ("import json, dataclasses, sys; from bench import machine_code as m; "
            f"cases = [c for c in m.TRITON_CASES if c[0] in {names!r}]; "
            "json.dump([dataclasses.asdict(r) for r in m.triton_rows(cases)], sys.stdout)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the Triton kernels failed: {result.stderr[-3000:]}")
    return [Row(**row) for row in json.loads(result.stdout)]


# =============================================================================================
# torch's fused AdamW (the anchor)
# =============================================================================================
# the multi_tensor_apply kernel of AdamW(fused=True) with float params, no amsgrad
ADAMW_FUNCTOR = "FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>"
# per thread and iteration: p, g, m, v read as one 128-bit access each (4 floats); the stores
# (p, m, v, and g when there is a grad scale) are predicated, so they are not modelled
ADAMW_MODEL = Model([128] * 4, None)


def libtorch_cuda() -> str | None:
    spec = importlib.util.find_spec("torch")
    path = os.path.join(os.path.dirname(spec.origin), "lib", "libtorch_cuda.so") if spec else ""
    return path if os.path.exists(path) else None


def _adamw_extract(lib: str) -> dict:
    """The fused AdamW kernel's name, resources and SASS (sm_90) from libtorch_cuda.so."""
    usage = resource_usage(lib, "sm_90")
    candidates = [name for name in usage if "FusedAdamMathFunctor" in name]
    demangled = dict(zip(candidates, demangle(candidates)))
    name = next(n for n, d in demangled.items() if ADAMW_FUNCTOR in d and "adamw" in n)
    text = run_tool("cuobjdump", "-sass", "-arch", "sm_90", "-fun", name, lib)
    return dict(name=name, demangled=demangled[name], usage=usage[name], sass=text)


def adamw_sass(lib: str) -> dict:
    """``_adamw_extract``, cached in bench/out/ (the library is 500 MB; reading its resource
    table and one function takes seconds) under its path, size and time."""
    stat = os.stat(lib)
    key = dict(lib=lib, size=stat.st_size, mtime=stat.st_mtime)
    cache = os.path.join(OUT_DIR, "torch_fused_adamw_sm_90.json")
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    extracted = dict(_adamw_extract(lib), key=key)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(cache, "w") as f:
        json.dump(extracted, f)
    return extracted


def adamw_row() -> Row:
    lib = libtorch_cuda()
    if lib is None:
        raise FileNotFoundError("torch has no libtorch_cuda.so (a CPU-only torch)")
    found = adamw_sass(lib)
    regs, stack, local = found["usage"]
    row = Row("torch", "sm_90", "AdamW(fused=True), fp32", "multi_tensor_apply_kernel",
              dict(functor=ADAMW_FUNCTOR), [], regs, stack, local)
    (instrs,) = sass.parse_sass(found["sass"]).values()
    return measure_sass(row, instrs, ADAMW_MODEL)


# =============================================================================================
# issue 19's model
# =============================================================================================
def issue_time_ms(per_element: float, gpu: str, elements: int = MODEL_ELEMENTS) -> float:
    """One warp instruction per scheduler and clock: elements x instructions / 32 threads per
    warp / (SMs x 4 schedulers x clock)."""
    sms, clock, _ = GPUS[gpu]
    return elements * per_element / WARP / (sms * SCHEDULERS_PER_SM * clock) * 1e3


def memory_time_ms(bytes_per_element: float, gpu: str, elements: int = MODEL_ELEMENTS) -> float:
    return elements * bytes_per_element / GPUS[gpu][2] * 1e3


def per_element_budget(bytes_per_element: float, gpu: str, slack: float = TARGET_SLACK) -> float:
    """The instructions per element whose issue time is ``slack`` x the memory time."""
    return slack * memory_time_ms(bytes_per_element, gpu) / issue_time_ms(1.0, gpu)


# =============================================================================================
# the report
# =============================================================================================
# (title, kernel kind, template flags) of the CUDA rows of the headline table; a flag the
# source no longer has is not matched on
CUDA_HEADLINE = (
    ("update, drop-in (fp32, unscaled)", "update",
     dict(PT="float", PRICE=True, MODE="kGradOnly", NEXT=True, SCALED=False)),
    ("update, drop-in (fp32, grad scale)", "update",
     dict(PT="float", PRICE=True, MODE="kGradOnly", NEXT=True, SCALED=True)),
    ("update, drop-in (bf16 params)", "update",
     dict(PT="BF16", PRICE=True, MODE="kGradOnly", NEXT=True, SCALED=False)),
    ("sample (fp32)", "sample", dict(PT="float")),
    ("accumulate, first (fp32)", "accumulate", dict(PT="float", PRICE=True, FIRST=True)),
    ("accumulate, later (fp32)", "accumulate", dict(PT="float", PRICE=True, FIRST=False)),
    ("update, official mc=1 (fp32)", "update",
     dict(PT="float", PRICE=True, MODE="kGradOnly", NEXT=False, SCALED=False)),
    ("update, official mc>1 (fp32)", "update",
     dict(PT="float", PRICE=True, MODE="kGradAvg", NEXT=False, SCALED=False)),
)


def _matches(row: Row, kind: str, flags: dict) -> bool:
    no_prior = all(row.flags.get(k) is not True for k in ("PREC", "PMEAN"))
    return (kind_of(row.kernel) == kind and no_prior
            and all(row.flags.get(k, v) == v for k, v in flags.items()))


def headline(rows: list) -> list:
    """[(title, Row)]: the CUDA rows of CUDA_HEADLINE per architecture, then Triton and torch."""
    chosen = []
    for arch in ARCHS:
        for title, kind, flags in CUDA_HEADLINE:
            found = [r for r in rows if r.source == "cuda" and r.arch == arch
                     and _matches(r, kind, flags)]
            chosen += [(f"CUDA {title}", found[0])] if found else []
    chosen += [(f"Triton {r.name}", r) for r in rows if r.source == "triton"]
    chosen += [(f"torch {r.name}", r) for r in rows if r.source == "torch"]
    return chosen


def widths(bits: list) -> str:
    """[128, 128, 64] -> '2x128 + 64'."""
    parts = [f"{bits.count(w)}x{w}" if bits.count(w) > 1 else str(w)
             for w in sorted(set(bits), reverse=True)]
    return " + ".join(parts) or "-"


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


HEADLINE_COLUMNS = ("kernel", "arch", "regs", "stack B", "LDL/STL path / fn", "loads",
                    "stores", "SASS/elem", "bf16 state", "PTX/elem")


def headline_cells(title: str, row: Row) -> list:
    return [title, row.arch, str(row.regs), str(row.stack),
            f"{row.path_local} / {row.local_accesses}", widths(row.loads), widths(row.stores),
            _fmt(row.per_element), _fmt(row.bf16_per_element), _fmt(row.ptx_per_element)]


def markdown_table(columns, rows) -> list:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cells) + " |" for cells in rows])


def model_lines(rows: list) -> list:
    """Issue 19's model for the drop-in step and fused AdamW, per GPU."""
    drop_in = ("CUDA update, drop-in (fp32, unscaled)", "Triton update, drop-in")
    picks = [(t, r, DROP_IN_BYTES) for t, r in headline(rows)
             if r.arch == "sm_90" and t in drop_in]
    picks += [(t, r, ADAMW_BYTES) for t, r in headline(rows) if r.source == "torch"]
    cells = []
    for title, row, nbytes in picks:
        for gpu in GPUS:
            if row.per_element is None:
                continue
            issue, memory = issue_time_ms(row.per_element, gpu), memory_time_ms(nbytes, gpu)
            cells.append([title, gpu, _fmt(row.per_element), str(nbytes), _fmt(issue, ".3f"),
                          _fmt(memory, ".3f"), _fmt(issue / memory),
                          _fmt(per_element_budget(nbytes, gpu), ".0f")])
    columns = ("kernel (sm_90)", "GPU", "SASS/elem", "B/elem", "issue ms", "memory ms",
               "issue / memory", f"SASS/elem for issue = {TARGET_SLACK:g} x memory")
    return markdown_table(columns, cells)


def target_line(rows: list) -> str:
    """Issue 19's targets against the drop-in updates measured (sm_90)."""
    found = {t: r.per_element for t, r in headline(rows) if r.arch == "sm_90" and r.per_element
             and t in ("CUDA update, drop-in (fp32, unscaled)", "Triton update, drop-in")}
    budget = per_element_budget(DROP_IN_BYTES, "H200")
    measured = "; ".join(f"{t}: {v:.2f}" for t, v in found.items()) or "not measured"
    return (f"Issue 19's targets: the CUDA and Triton updates at most {TARGET_PER_ELEMENT} SASS "
            f"per element, and the drop-in step's issue time at most {TARGET_SLACK:g} x its "
            f"memory time on an H200 (at most {budget:.0f} SASS per element at "
            f"{DROP_IN_BYTES} B). Measured (sm_90): {measured}.")


def gate_lines(rows: list) -> list:
    """The instances of the two loops that fail the gate, per source and architecture."""
    lines = []
    for source, arch in sorted({(r.source, r.arch) for r in rows if r.source != "torch"}):
        used = [r for r in rows if r.source == source and r.arch == arch and r.roles]
        failing = [r for r in used if r.problems]
        lines.append(f"- {source} {arch}: {len(used)} instances used by the loops, "
                     f"{len(failing)} fail" + (":" if failing else ""))
        lines += [f"  - `{r.name}`: {'; '.join(r.problems)}" for r in failing]
    return lines


def summary_lines(rows: list) -> list:
    """Per architecture: instances, those with a stack frame, those spilling on the path, and
    the range of the update instances' instructions per element."""
    lines = []
    for arch in ARCHS:
        mine = [r for r in rows if r.source == "cuda" and r.arch == arch]
        if not mine:
            continue
        updates = [r.per_element for r in mine if kind_of(r.kernel) == "update" and r.per_element]
        lines.append(f"- CUDA {arch}: {len(mine)} instances, {sum(r.stack > 0 for r in mine)} "
                     f"with a stack frame, {sum(r.path_local > 0 for r in mine)} with LDL/STL "
                     f"on the aligned path; update instances {min(updates, default=0):.2f} to "
                     f"{max(updates, default=0):.2f} SASS per element")
    return lines


def all_instances_lines(rows: list) -> list:
    columns = ("instance", "arch", "loops", "regs", "stack B", "LDL/STL path / fn", "loads",
               "stores", "SASS/elem", "bf16 state")
    cells = [[f"`{r.name}`", r.arch, ", ".join(r.roles) or "-", str(r.regs), str(r.stack),
              f"{r.path_local} / {r.local_accesses}", widths(r.loads), widths(r.stores),
              _fmt(r.per_element), _fmt(r.bf16_per_element)]
             for r in sorted(rows, key=lambda r: (r.arch, r.kernel, r.name))
             if r.source == "cuda"]
    return markdown_table(columns, cells)


def provenance() -> list:
    """What was measured: commit, extension, versions."""
    def git(*args):
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "?"
    lib = extension_path()
    built = (datetime.datetime.fromtimestamp(os.path.getmtime(lib)).strftime("%Y-%m-%d %H:%M")
             if lib else "-")
    versions = []
    for package in ("torch", "triton"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} absent")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
    return [f"- commit {git('rev-parse', '--short', 'HEAD')}{dirty}; extension "
            f"{os.path.relpath(lib, REPO) if lib else '-'} built {built}",
            f"- {', '.join(versions)}; SASS by nvdisasm / cuobjdump {tool_version()}"]


def tool_version() -> str:
    try:
        text = run_tool("nvdisasm", "--version")
    except (FileNotFoundError, RuntimeError):
        return "?"
    found = re.search(r"release ([\d.]+)", text)
    return found.group(1) if found else "?"


def report(rows: list, notes: list) -> str:
    """The markdown report."""
    today = datetime.date.today().isoformat()
    lines = [f"# Machine code of the kernels, {today}", "", *provenance(), "",
             "Measured by `python -m bench.machine_code` (the method is its docstring). "
             "Instructions per element: the aligned, non-skipped path of the hot loop (Triton: "
             "of the full tile), divided by its elements; 'bf16 state': the same path with bf16 "
             "momentum and hess; LDL/STL: local loads and stores on that path / in the whole "
             "function.", "", *markdown_table(HEADLINE_COLUMNS,
                                            [headline_cells(t, r) for t, r in headline(rows)]),
             "", f"## Issue 19's model at {MODEL_ELEMENTS / 2**20:g}M = 2^26 params", "",
             "issue time = elements x SASS per element / 32 / (SMs x 4 schedulers x clock), "
             "memory time = elements x bytes per element / bandwidth; "
             + "; ".join(f"{g}: {s} SMs, {c / 1e9:g} GHz, {b / 1e12:g} TB/s"
                         for g, (s, c, b) in GPUS.items()) + ".", "", *model_lines(rows), "",
             target_line(rows), "",
             "## The gate (instances the two training loops use)", "", *gate_lines(rows), "",
             *summary_lines(rows)]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    if any(r.source == "cuda" for r in rows):
        lines += ["", "## Every CUDA instance", "", "<details><summary>table</summary>", "",
                  *all_instances_lines(rows), "", "</details>"]
    return "\n".join(lines) + "\n"


def print_table(rows: list) -> None:
    cells = [headline_cells(t, r) for t, r in headline(rows)]
    widths_ = [max(len(c[i]) for c in cells + [list(HEADLINE_COLUMNS)])
               for i in range(len(HEADLINE_COLUMNS))]
    for line in [list(HEADLINE_COLUMNS)] + cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths_)))


# =============================================================================================
# command line
# =============================================================================================
def collect(args) -> tuple:
    """(rows, notes): every part that can be measured here; a part that cannot says why."""
    rows, notes = [], []
    lib = extension_path()
    reason = why_no_cuda(lib)
    if reason is None:
        rows += cuda_rows(lib, only_gated=args.gated_only)
    else:
        notes.append(f"CUDA kernels not measured: {reason}")
    for wanted, part, measure in ((args.triton, "Triton kernels", triton_rows),
                                  (args.torch, "torch's fused AdamW", lambda: [adamw_row()])):
        if not wanted:
            continue
        try:
            rows += measure()
        except (ImportError, FileNotFoundError, RuntimeError, StopIteration) as error:
            notes.append(f"{part} not measured: {type(error).__name__}: {error}")
    return rows, notes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.machine_code",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true",
                        help="write the report to bench/results/ (else bench/out/)")
    parser.add_argument("--tag", default=None,
                        help="the report's name: machine_code_<date>_<tag>.md (default: the "
                             "commit)")
    parser.add_argument("--out", default=None, help="the report's folder (wins over --record)")
    parser.add_argument("--gated-only", action="store_true",
                        help="only the CUDA instances the two training loops use (faster)")
    parser.add_argument("--no-triton", dest="triton", action="store_false")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--json", default=None, help="also write every row as JSON here")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report's notes (repeatable)")
    return parser.parse_args(argv)


def output_path(args) -> str:
    folder = args.out or (RESULTS_DIR if args.record else OUT_DIR)
    tag = args.tag
    if tag is None:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True)
        tag = result.stdout.strip() or "build"
    return os.path.join(folder, f"machine_code_{datetime.date.today().isoformat()}_{tag}.md")


def main(argv=None) -> list:
    args = parse_args(argv)
    rows, notes = collect(args)
    notes += args.note
    print_table(rows)
    print()
    print("\n".join(model_lines(rows) + [""] + gate_lines(rows) + summary_lines(rows)))
    for note in notes:
        print(f"# {note}")
    path = output_path(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as out:
        out.write(report(rows, notes))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([dataclasses.asdict(r) for r in rows], out, indent=1)
    print(f"# report: {os.path.relpath(path, os.getcwd())}")
    return rows


if __name__ == "__main__":
    main()
