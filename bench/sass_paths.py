"""SASS instructions per element of the CUDA and Triton kernels by scenario (issue 19's diet).

    python -m bench.sass_paths [--cubin FILE] [--arch sm_90 ...] [--types float,BF16,F16]
    python -m bench.sass_paths --triton

bench/machine_code.py is the machine-code gate and report (every instance, Triton, torch's
AdamW, the issue model); its walk takes the shortest aligned path, which for the update is the
step with a debias factor of 1 and no grad scale (both tested at run time). This script counts
the paths of named scenarios instead, so that the diet's figures can be given for each: for
every update instance the loops launch (fp32 state, no prior), the step with debias != 1 (the
first ~165 steps with beta1 = 0.9) and with debias == 1 (later, or debias=False), the drop-in
with a GradScaler; on sample and accumulate too. Reads the built extension (default
``ivon_fast/_C*.so``) or a cubin (``nvcc -cubin -arch=sm_90 -O3 --fmad=false -Icsrc
csrc/cuda_update_float.cu``) with cuobjdump, and prints per instance its registers, stack,
local loads / stores in the loop (spills) and the instructions of one iteration of the loop per
element (an iteration handles one quad: 4 elements); the kernels from before the diet (their
flags as template arguments) are read too, which is how the before / after record was made
(bench/results/cuda_diet_2026-12-07.md). With ``--triton`` the same for the Triton update kernels
(fp32 state), compiled for sm_90 without a GPU.

Note [the hot path of a loop]: a loop is a backward branch; the body without it is a graph
without cycles, and a path through it is one iteration. The path that counts is picked by what
it does, not by guessing branch directions. It makes no call (the out-of-line slow paths of
division and square root) and no global access narrower than 64 bits (the bounds-checked
fallback), and it holds the scenario's global accesses, say four 128-bit loads and four 128-bit
stores for the drop-in update of fp32 params (grad, mean, momentum, hess in; mean, momentum,
hess, param out). Among such paths it is the one that draws the scenario's normals (six
int-to-float conversions each: a next sample or not), then with the division count (one FCHK
each) nearest to the scenario's (a step with debias == 1 or without a grad scale has fewer),
then with the fewest accesses beyond the scenario's (a branch that loads a prior input is not
taken; a load the compiler predicated off stays on every path, and it is counted, since it is
issued), and then the shortest: the branches left are uniform tests of options the scenario
does not use, such as the clip, which the default radius (+inf) skips. A kernel may have
several loops that hold such a path (its bounds-checked loop has none, its loop for the rare
inputs has more accesses): the one whose path ranks first counts.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass

from bench import machine_code, sass
from bench.machine_code import demangle, resource_usage, run_tool


@dataclass(frozen=True)
class Scenario:
    """What one iteration of the hot path does (Note [the hot path of a loop]): its global
    accesses, (("load" | "store", width in bits), count) pairs, its divisions (FCHK) and its
    draws of four normals (six int-to-float conversions each: four uniforms, two logarithms'
    exponents) per quad."""
    accesses: tuple
    divisions: int
    normals: int = 0

    def rank(self, sig: dict):
        """None if a path with this signature cannot be the scenario's, else a key: the path
        with the smallest key is the scenario's (fewest accesses beyond the scenario's, then
        the division count nearest to it)."""
        want = dict(self.accesses)
        if any(sig.get(k, 0) < n for k, n in want.items()):
            return None
        extra = sum(n - want.get(k, 0) for k, n in sig.items() if k not in ("div", "i2f"))
        return (abs(sig.get("i2f", 0) - 6 * self.normals),
                abs(sig.get("div", 0) - self.divisions), extra)


def _step(sig: dict, ins: sass.Instr):
    """the path's signature after one more instruction; None when no hot path goes on here
    (a call to a slow path, a scalar access of the unaligned fallback). A predicated call is no
    slow path: sm_80 code leaves a loop by one (to the code after it)."""
    if ins.base == "CALL" and not ins.guard:
        return None
    key = ins.access if ins.access is not None else _COUNTED.get(ins.opcode)
    if key is None:
        return sig
    if ins.access is not None and ins.access[1] < 64:
        return None
    out = dict(sig)
    out[key] = out.get(key, 0) + 1
    return out


_COUNTED = {"FCHK": "div", "I2FP.F32.S32": "i2f", "I2F": "i2f"}


def _freeze(sig: dict) -> tuple:
    return tuple(sorted(sig.items(), key=str))


def _path_ends(blocks: list, edge: tuple) -> dict:
    """{signature: (fewest instructions, its blocks)} of the paths from the loop's header to its
    latch (``edge``: a back edge (latch, header) of ``sass.back_edges``). Dynamic programming
    over the blocks in address order: the body without its back edge has forward edges only."""
    last, head = edge
    best = {head: {(): (0, ())}}  # block -> {signature so far: (fewest instructions, blocks)}
    ends = {}
    for index in range(head, last + 1):
        block = blocks[index]
        for key, (count, path) in best.get(index, {}).items():
            sig = dict(key)
            for ins in block.instrs:
                sig = sig if sig is None else _step(sig, ins)
            if sig is None:
                continue
            total = count + len(block.instrs)
            targets = [None] if index == last else [n for n in block.succs if index < n <= last]
            for nxt in targets:
                slot = ends if nxt is None else best.setdefault(nxt, {})
                old = slot.get(_freeze(sig))
                if old is None or total < old[0]:
                    slot[_freeze(sig)] = (total, path + (index,))
    return ends


def _best_path(blocks: list, scenario: Scenario, edge: tuple):
    """(rank, instructions, blocks) of the scenario's path through one iteration of the loop
    of ``edge``, or None when no path can be it (Note [the hot path of a loop])."""
    ranked = [(scenario.rank(dict(sig)), n, path)
              for sig, (n, path) in _path_ends(blocks, edge).items()]
    ranked = sorted(r for r in ranked if r[0] is not None)
    return ranked[0] if ranked else None


def loop_hot_path(blocks: list, scenario: Scenario):
    """(instructions per iteration, the loop's back edge) of the scenario's path, over every
    loop of the kernel (Note [the hot path of a loop]); (None, None) if no loop has one."""
    found = [(best, edge) for edge in sorted(sass.back_edges(blocks))
             for best in [_best_path(blocks, scenario, edge)] if best is not None]
    if not found:
        return None, None
    (_, n, _), edge = min(found)
    return n, edge


def local_accesses(blocks: list, edge) -> int:
    """local-memory loads and stores inside a loop: spills (the stack outside is harmless)"""
    last, head = edge
    return sum(ins.local for block in blocks[head:last + 1] for ins in block.instrs)


# ---- the kernel instances of the two training loops and their scenarios ----------------------

_TYPE = {"float": 128, "ivon_fast::cuda_math::BF16": 64, "ivon_fast::cuda_math::F16": 64}
_LOAD, _STORE = "load", "store"
_MODES = {"0": "grad_only", "1": "grad_avg", "2": "avg_only"}


def _template_args(demangled: str):
    """(kernel name, [template arguments]) of a demangled kernel instance."""
    m = re.search(r"(\w+_kernel)<(.*)>\(", demangled)
    if not m:
        return None, []
    args = [a.strip().replace("(ivon_fast::GradMode)", "") for a in m.group(2).split(",")]
    return m.group(1), args


def scenarios(kernel: str, args: list, debias_one: bool) -> list:
    """[(label, Scenario)] of a kernel instance as the training loops launch it with fp32 state,
    no prior and no grad scale; [] for another instance. An update instance whose next sample
    is a run-time flag (no fourth template argument) serves two."""
    if args[0] not in _TYPE or any(a == "true" for a in args[_FIXED.get(kernel, 99):]):
        return []
    pw = _TYPE[args[0]]
    if kernel == "sample_kernel":
        return [("sample", Scenario((((_LOAD, 128), 2), ((_STORE, pw), 1)), 4, 1))]
    if kernel == "accumulate_kernel":
        price, first = args[1] == "true", args[2] == "true"
        loads = Counter({(_LOAD, pw): 1})
        loads[(_LOAD, 128)] += int(price) + 2 * int(not first)
        divisions = 4 * (int(price) + 2 * int(not first))
        name = f"accumulate {'price' if price else 'gradsq'}{' first' if first else ''}"
        accesses = tuple((+loads).items()) + (((_STORE, 128), 2),)
        return [(name, Scenario(accesses, divisions, int(price)))]
    nexts = [args[3] == "true"] if len(args) > 3 else [False, True]
    out = [_update_scenario(args[1] == "true", _MODES[args[2]], nxt, pw, debias_one)
           for nxt in nexts]
    if len(args) == 4 and args[1:] == ["true", "0", "true"]:  # the drop-in, with a GradScaler
        out.append(_update_scenario(True, "grad_only", True, pw, debias_one, scaled=True))
    return out


def _update_scenario(price: bool, mode: str, nxt: bool, pw: int, debias_one: bool,
                     scaled: bool = False):
    loads = Counter({(_LOAD, 128): 3})  # mean, momentum, hess
    loads[(_LOAD, pw)] += int(mode != "avg_only")
    loads[(_LOAD, 128)] += 2 * int(mode != "grad_only")
    stores = Counter({(_STORE, 128): 3})
    stores[(_STORE, pw)] += 1
    per_element = (int(price and mode != "avg_only") + 2 * int(mode == "grad_avg") + 2
                   + int(not debias_one) + int(nxt) + int(scaled))  # grad_only: 1 unscaled
    normals = int(price and mode != "avg_only") + int(nxt)
    name = (f"update {'price' if price else 'gradsq'} {mode}{' next' if nxt else ''}"
            + (" grad scale" if scaled else ""))
    return name, Scenario(tuple(loads.items()) + tuple(stores.items()), 4 * per_element, normals)


# template arguments from which on every one must be false (the old instances' SCALED, PREC,
# PMEAN; sample's and accumulate's PREC): the instance without grad scale and prior
_FIXED = {"update_kernel": 4, "sample_kernel": 1, "accumulate_kernel": 3}


def _columns(blocks: list, scenario_of) -> tuple:
    """(loop spills, instructions per element with debias != 1, with debias == 1) of the path of
    ``scenario_of(debias_one)`` (None: a scenario the walk cannot tell apart)."""
    counts, edges = [], []
    for debias_one in (False, True):
        scenario = scenario_of(debias_one)
        n, edge = (None, None) if scenario is None else loop_hot_path(blocks, scenario)
        counts.append(None if n is None else n / 4)
        edges += [edge] if edge else []
    return (max((local_accesses(blocks, e) for e in edges), default=None), *counts)


def report(path: str, arch: str, param_types=("float",), only: str | None = None) -> list:
    """rows (instance, registers, stack, loop spills, instructions per element with debias != 1
    and with debias == 1) for the training loops' instances in `path` for `arch` (``only``: the
    rows of that label alone)."""
    funcs = sass.parse_sass(run_tool("cuobjdump", "-sass", "-arch", arch, path))
    res = resource_usage(path, arch)
    names = dict(zip(funcs, demangle(list(funcs))))
    types = [t if t == "float" else f"ivon_fast::cuda_math::{t}" for t in param_types]
    rows = []
    for mangled, code in funcs.items():
        kernel, args = _template_args(names[mangled])
        if kernel is None or args[0] not in types:
            continue
        blocks = sass.basic_blocks(code)
        for k, (label, _) in enumerate(scenarios(kernel, args, False)):
            name = f"{label} ({args[0].split('::')[-1]})"
            if only is not None and name != only:
                continue

            def scenario_of(debias_one, k=k, label=label):
                # with a grad scale and debias 1 the divisions are those of the step without a
                # scale and debias != 1: the signature cannot tell the two apart
                if debias_one and label.endswith("grad scale"):
                    return None
                return scenarios(kernel, args, debias_one)[k][1]
            regs, stack, _ = res.get(mangled, (None, None, None))
            rows.append((name, regs, stack, *_columns(blocks, scenario_of)))
    return sorted(rows)


# bench.machine_code's Triton update launches with fp32 state: (price, mode, next sample,
# param access width)
_TRITON_UPDATES = {
    "update, drop-in": (True, "grad_only", True, 128),
    "update, drop-in, bf16 params": (True, "grad_only", True, 64),
    "update, drop-in, no finite check": (True, "grad_only", True, 128),
    "update, official mc=1": (True, "grad_only", False, 128),
    "update, official mc>1": (True, "grad_avg", False, 128),
    "update, averages only": (True, "avg_only", False, 128),
}


def triton_report(only: str | None = None) -> list:
    """``report``'s rows for the Triton update launches, compiled for sm_90 without a GPU (their
    tiles run in a loop: Note [tiles of a launch] in ivon_fast/triton_backend.py; ``only``: that
    launch alone). Run without TRITON_INTERPRET."""
    rows = []
    for name, op, *launch in machine_code.TRITON_CASES:
        if name not in _TRITON_UPDATES or only not in (None, name):
            continue
        kernel, args, kwargs = machine_code.triton_launch(op, *launch)
        compiled = machine_code.compile_for_sm90(kernel, args, kwargs)
        with tempfile.TemporaryDirectory(prefix="ivon_triton_") as folder:
            cubin = os.path.join(folder, "kernel.cubin")
            with open(cubin, "wb") as out:
                out.write(compiled.asm["cubin"])
            (regs, stack, _), = resource_usage(cubin, "sm_90").values()
            (code,) = machine_code.disassemble(cubin).values()
        blocks = sass.basic_blocks(code)
        rows.append((name, regs, stack, *_columns(
            blocks, lambda one, name=name: _update_scenario(*_TRITON_UPDATES[name], one)[1])))
    return rows


def _so_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(here, "ivon_fast", "_C*.so"))
    if not found:
        raise SystemExit("no ivon_fast/_C*.so: build the extension first (setup.py), or --cubin")
    return found[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cubin", help="a cubin or extension .so (default: ivon_fast/_C*.so)")
    parser.add_argument("--arch", action="append", help="sm_90, sm_80 (default: both)")
    parser.add_argument("--types", default="float", help="param types, e.g. float,BF16,F16")
    parser.add_argument("--triton", action="store_true",
                        help="the Triton update kernels (sm_90) instead of the extension's")
    parser.add_argument("--only", help="one row, by its instance name as printed")
    args = parser.parse_args(argv)
    if args.triton:
        tables = [("sm_90", triton_report(args.only))]
    else:
        path = args.cubin or _so_path()
        tables = [(arch, report(path, arch, tuple(args.types.split(",")), args.only))
                  for arch in args.arch or ["sm_90", "sm_80"]]
    print("| instance | arch | regs | stack | loop spills | instr/elem | instr/elem (debias 1) |")
    print("|---|---|---|---|---|---|---|")
    for arch, rows in tables:
        for row in rows:
            cells = ["-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                     for v in row[1:]]
            print(f"| {row[0]} | {arch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
