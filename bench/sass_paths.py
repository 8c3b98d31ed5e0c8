"""SASS instructions per element of the CUDA kernels by scenario (issue 19's instruction diet).

    python -m bench.sass_paths [--cubin FILE] [--arch sm_90 ...] [--types float,BF16,F16]

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
(bench/results/cuda_diet_2026-12-07.md).

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
import subprocess
from collections import Counter
from dataclasses import dataclass

_ADDR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"^@!?U?P\w+\s+")
_ACCESS = re.compile(r"\b(LDG|STG)\.E\b[\w.]*")


def tool(name: str) -> str:
    """cuobjdump / nvdisasm: the ones that ship with triton, else the CUDA toolkit's."""
    import triton
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = os.path.join(folder, name)
    return path if os.path.exists(path) else name


@dataclass
class Instr:
    addr: int
    text: str

    @property
    def guarded(self) -> bool:
        return self.text.startswith("@")

    @property
    def op(self) -> str:
        body = _GUARD.sub("", self.text)
        return body.split()[0] if body else ""

    def operands(self) -> list:
        body = _GUARD.sub("", self.text)
        return [o.strip() for o in body[len(self.op):].split(",") if o.strip()]

    def target(self):
        """the branch target address of a BRA, else None"""
        if not self.op.startswith("BRA"):
            return None
        return int(self.operands()[-1].strip("`()"), 16)

    def conditional(self) -> bool:
        """a branch that may fall through: guarded, or with a predicate operand"""
        ops = self.operands()
        return self.guarded or (len(ops) > 1 and ops[0].lstrip("!") not in ("PT", "UPT"))

    def access(self):
        """('LDG' | 'STG', width in bits) of a global access, else None"""
        m = _ACCESS.search(self.text)
        if not m:
            return None
        width = 128 if ".128" in m.group(0) else 64 if ".64" in m.group(0) else 32
        return m.group(1), width


def functions(sass: str) -> dict:
    """name -> [Instr] of every function in cuobjdump -sass output."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = _ADDR.match(line)
        if m and name:
            out[name].append(Instr(int(m.group(1), 16), m.group(2)))
    return out


def _ends_block(ins: Instr) -> bool:
    return ins.target() is not None or ins.op in ("EXIT", "RET", "BRX", "JMX")


def _falls_through(ins: Instr) -> bool:
    if ins.target() is not None:
        return ins.conditional()
    return not (ins.op in ("EXIT", "RET") and not ins.guarded)


def blocks(code: list) -> dict:
    """start address -> (instructions, successor start addresses) of the basic blocks."""
    starts = {code[0].addr}
    for k, ins in enumerate(code):
        if ins.target() is not None:
            starts.add(ins.target())
        if _ends_block(ins) and k + 1 < len(code):
            starts.add(code[k + 1].addr)
    out = {}
    for ins in code:
        if ins.addr in starts:
            cur = out.setdefault(ins.addr, ([], []))
        cur[0].append(ins)
    order = sorted(out)
    for j, start in enumerate(order):
        body, succ = out[start]
        if body[-1].target() is not None:
            succ.append(body[-1].target())
        if _falls_through(body[-1]) and j + 1 < len(order):
            succ.append(order[j + 1])
    return out


def back_edges(code: list) -> list:
    """(head, tail) addresses of every backward branch, widest first."""
    edges = [(ins.target(), ins.addr) for ins in code
             if ins.target() is not None and ins.target() <= ins.addr]
    return sorted(edges, key=lambda e: e[0] - e[1])


@dataclass(frozen=True)
class Scenario:
    """What one iteration of the hot path does (Note [the hot path of a loop]): its global
    accesses, ((kind, width in bits), count) pairs, its divisions (FCHK) and its draws of four
    normals (six int-to-float conversions each: four uniforms, two logarithms' exponents) per
    quad."""
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


def _step(sig: dict, ins: Instr):
    """the path's signature after one more instruction; None when no hot path goes on here
    (a call to a slow path, a scalar access of the unaligned fallback). A predicated call is no
    slow path: sm_80 code leaves a loop by one (to the code after it)."""
    if ins.op.startswith("CALL") and not ins.guarded:
        return None
    a = ins.access()
    key = a if a is not None else _COUNTED.get(ins.op)
    if key is None:
        return sig
    if a is not None and a[1] < 64:
        return None
    out = dict(sig)
    out[key] = out.get(key, 0) + 1
    return out


_COUNTED = {"FCHK": "div", "I2FP.F32.S32": "i2f", "I2F": "i2f"}


def _freeze(sig: dict) -> tuple:
    return tuple(sorted(sig.items(), key=str))


def _path_ends(code: list, edge: tuple) -> dict:
    """{signature: (fewest instructions, its blocks)} of the paths from the loop head to its back
    edge.
    Dynamic programming over the loop's blocks in address order (the body without its back
    edge has forward edges only)."""
    head, tail = edge
    bb = blocks(code)
    last = max(s for s in bb if s <= tail)
    best = {head: {(): (0, ())}}  # block -> {signature so far: (fewest instructions, blocks)}
    ends = {}
    for start in sorted(s for s in bb if head <= s <= last):
        body, succ = bb[start]
        for key, (count, path) in best.get(start, {}).items():
            sig = dict(key)
            for ins in body:
                sig = sig if sig is None else _step(sig, ins)
            if sig is None:
                continue
            total = count + len(body)
            targets = [None] if start == last else [n for n in succ if start < n <= last]
            for nxt in targets:
                slot = ends if nxt is None else best.setdefault(nxt, {})
                old = slot.get(_freeze(sig))
                if old is None or total < old[0]:
                    slot[_freeze(sig)] = (total, path + (start,))
    return ends


def _best_path(code: list, scenario: Scenario, edge: tuple):
    """(rank, instructions, blocks) of the scenario's path through one iteration of the loop
    `edge`, or None when no path can be it (Note [the hot path of a loop])."""
    ranked = [(scenario.rank(dict(sig)), n, path)
              for sig, (n, path) in _path_ends(code, edge).items()]
    ranked = sorted(r for r in ranked if r[0] is not None)
    return ranked[0] if ranked else None


def loop_hot_path(code: list, scenario: Scenario, blocks_of=None):
    """(instructions per iteration, the loop's (head, tail)) of the scenario's path, over every
    loop of the kernel (Note [the hot path of a loop]); (None, None) if no loop has one. The
    path's blocks are appended to `blocks_of` when given."""
    found = [(best, edge) for edge in back_edges(code)
             for best in [_best_path(code, scenario, edge)] if best is not None]
    if not found:
        return None, None
    (_, n, path), edge = min(found)
    if blocks_of is not None:
        blocks_of.extend(path)
    return n, edge


def local_accesses(code: list, edge) -> int:
    """local-memory loads and stores inside a loop: spills (the stack outside is harmless)"""
    head, tail = edge
    return sum(1 for ins in code if head <= ins.addr <= tail and ins.op.startswith(("LDL", "STL")))


def resources(path: str, arch: str) -> dict:
    """function name -> (registers, stack bytes) from cuobjdump -res-usage."""
    out = subprocess.run([tool("cuobjdump"), "-res-usage", "-arch", arch, path],
                         capture_output=True, text=True, check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and name:
            res[name] = (int(m.group(1)), int(m.group(2)))
    return res


def demangle(names) -> dict:
    names = list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


# ---- the kernel instances of the two training loops and their scenarios ----------------------

_TYPE = {"float": 128, "ivon_fast::cuda_math::BF16": 64, "ivon_fast::cuda_math::F16": 64}
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
        return [("sample", Scenario(((("LDG", 128), 2), (("STG", pw), 1)), 4, 1))]
    if kernel == "accumulate_kernel":
        price, first = args[1] == "true", args[2] == "true"
        loads = Counter({("LDG", pw): 1})
        loads[("LDG", 128)] += int(price) + 2 * int(not first)
        divisions = 4 * (int(price) + 2 * int(not first))
        name = f"accumulate {'price' if price else 'gradsq'}{' first' if first else ''}"
        accesses = tuple((+loads).items()) + ((("STG", 128), 2),)
        return [(name, Scenario(accesses, divisions, int(price)))]
    nexts = [args[3] == "true"] if len(args) > 3 else [False, True]
    out = [_update_scenario(args[1] == "true", _MODES[args[2]], nxt, pw, debias_one)
           for nxt in nexts]
    if len(args) == 4 and args[1:] == ["true", "0", "true"]:  # the drop-in, with a GradScaler
        out.append(_update_scenario(True, "grad_only", True, pw, debias_one, scaled=True))
    return out


def _update_scenario(price: bool, mode: str, nxt: bool, pw: int, debias_one: bool,
                     scaled: bool = False):
    loads = Counter({("LDG", 128): 3})  # mean, momentum, hess
    loads[("LDG", pw)] += int(mode != "avg_only")
    loads[("LDG", 128)] += 2 * int(mode != "grad_only")
    stores = Counter({("STG", 128): 3})
    stores[("STG", pw)] += 1
    per_element = (int(price and mode != "avg_only") + 2 * int(mode == "grad_avg") + 2
                   + int(not debias_one) + int(nxt) + int(scaled))  # grad_only: 1 unscaled
    normals = int(price and mode != "avg_only") + int(nxt)
    name = (f"update {'price' if price else 'gradsq'} {mode}{' next' if nxt else ''}"
            + (" grad scale" if scaled else ""))
    return name, Scenario(tuple(loads.items()) + tuple(stores.items()), 4 * per_element, normals)


# template arguments from which on every one must be false (the old instances' SCALED, PREC,
# PMEAN; sample's and accumulate's PREC): the instance without grad scale and prior
_FIXED = {"update_kernel": 4, "sample_kernel": 1, "accumulate_kernel": 3}


def report(path: str, arch: str, param_types=("float",)) -> list:
    """rows (instance, registers, stack, loop spills, instructions per element with debias != 1
    and with debias == 1) for the training loops' instances in `path` for `arch`."""
    sass = subprocess.run([tool("cuobjdump"), "-sass", "-arch", arch, path],
                          capture_output=True, text=True, check=True).stdout
    funcs, res = functions(sass), resources(path, arch)
    names = demangle(funcs)
    rows = []
    for mangled, code in funcs.items():
        kernel, args = _template_args(names[mangled])
        if kernel is None or args[0] not in [t if t == "float" else f"ivon_fast::cuda_math::{t}"
                                             for t in param_types]:
            continue
        for k, (label, _) in enumerate(scenarios(kernel, args, False)):
            counts, edges = [], []
            for debias_one in (False, True):
                if debias_one and label.endswith("grad scale"):
                    # its divisions are those of the step without a scale and debias != 1:
                    # the signature cannot tell the two apart
                    counts.append(None)
                    continue
                n, edge = loop_hot_path(code, scenarios(kernel, args, debias_one)[k][1])
                counts.append(None if n is None else n / 4)
                edges += [edge] if edge else []
            regs, stack = res.get(mangled, (None, None))
            spills = max((local_accesses(code, e) for e in edges), default=None)
            rows.append((f"{label} ({args[0].split('::')[-1]})", regs, stack, spills, *counts))
    return sorted(rows)


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
    args = parser.parse_args(argv)
    path = args.cubin or _so_path()
    print("| instance | arch | regs | stack | loop spills | instr/elem | instr/elem (debias 1) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.arch or ["sm_90", "sm_80"]:
        for row in report(path, arch, tuple(args.types.split(","))):
            cells = ["-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                     for v in row[1:]]
            print(f"| {row[0]} | {arch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
