"""Machine code as control flow: parse SASS (``cuobjdump -sass`` or ``nvdisasm -c``) and PTX
into basic blocks, find the loops, and walk a loop's aligned, non-skipped path
(bench/machine_code.py says why and how; this module knows nothing of IVON).

The path: within a region (a loop's body with its back-edges removed, or a whole function
whose loops hold no vector access), the path from its head to a latch (or exit) that holds a
given number of vector global accesses (>= 64 bits), and among those the most (or, for bf16
state, the fewest) vector bytes, then the fewest calls, then the fewest instructions. A dynamic
programme over the region's DAG, one entry per vector-access count per block, keeps the best
path of each count.
"""
from __future__ import annotations

import dataclasses
import re

# ---- one instruction ----

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_HEX_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
_WIDTH_TOKENS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8, "256": 256}


@dataclasses.dataclass
class Instr:
    """One instruction: its address (SASS; PTX: the line), guard, opcode with modifiers and
    operands, and what the walk needs to know of it."""
    addr: int
    guard: str          # "" or "@P0", "@!P3", ...
    opcode: str         # "LDG.E.128", "ld.global.v4.b32", ...
    operands: str
    target: object = None          # branch / call target (SASS address or PTX label)
    access: tuple = None           # ("load" | "store", bits) of a global access
    local: bool = False            # a local-memory access (LDL / STL, ld.local / st.local)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def _sass_access(opcode: str):
    """("load" | "store", bits) for LDG / STG; widths come from exact modifier tokens, so a
    cache hint such as .LTC128B is not read as 128 bits."""
    parts = opcode.split(".")
    kind = {"LDG": "load", "STG": "store"}.get(parts[0])
    if kind is None:
        return None
    bits = next((_WIDTH_TOKENS[p] for p in parts[1:] if p in _WIDTH_TOKENS), 32)
    return kind, bits


_LABEL_TARGET = re.compile(r"`\(([^)]+)\)")
_FUNCTION = re.compile(r"\s*Function : (\S+)|\.text\.(\S+):$")
_LABEL = re.compile(r"\s*([.$\w]+):\s*$")


def _sass_instr(match) -> Instr:
    body = match.group(2).strip()
    guard = ""
    if body.startswith("@"):
        guard, body = body.split(None, 1)
    opcode, _, operands = body.partition(" ")
    instr = Instr(int(match.group(1), 16), guard, opcode, operands.strip())
    if instr.base in ("BRA", "JMP", "CALL", "BRX", "JMX"):
        label = _LABEL_TARGET.search(instr.operands)  # nvdisasm: `(.L_x_5)
        target = _HEX_TARGET.search(instr.operands)   # cuobjdump: 0xb00
        instr.target = label.group(1) if label else int(target.group(1), 16) if target else None
    instr.access = _sass_access(opcode)
    instr.local = instr.base in ("LDL", "STL")
    return instr


def _resolve(instrs: list, labels: dict) -> list:
    for instr in instrs:
        if isinstance(instr.target, str):
            instr.target = labels.get(instr.target)
    return instrs


def parse_sass(text: str) -> dict:
    """{function name: [Instr]} from ``cuobjdump -sass`` or ``nvdisasm -c`` output (one or
    many functions; nvdisasm's branch labels become addresses)."""
    functions, labels, current, here, pending = {}, {}, None, None, []
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            name = header.group(1) or header.group(2)
            current, pending = functions.setdefault(name, []), []
            here = labels.setdefault(name, {})
            continue
        if current is None:
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.match(line)
        if match is not None:
            current.append(_sass_instr(match))
            here.update((name, current[-1].addr) for name in pending)
            pending = []
    return {name: _resolve(instrs, labels[name]) for name, instrs in functions.items()}


# ---- basic blocks ----

@dataclasses.dataclass
class Block:
    index: int
    instrs: list
    succs: list = dataclasses.field(default_factory=list)

    @property
    def vector(self) -> list:
        """The widths of the vector (>= 64-bit) global accesses, in order."""
        return [i.access for i in self.instrs if i.access and i.access[1] >= 64]


def _flow(instr: Instr, dialect: str):
    """(ends the block, falls through, jump target) of one instruction."""
    base = instr.base
    guarded = bool(instr.guard) and instr.guard not in ("@PT", "@UPT")
    if dialect == "sass":
        if base in ("BRA", "JMP"):
            conditional = guarded or "," in instr.operands  # BRA P3, target / BRA.DIV UR4, t
            return True, conditional, instr.target
        if base == "EXIT":
            return True, guarded, None
        if base in ("RET", "BRX", "JMX"):
            return True, False, None
        return False, True, None
    if base == "bra":
        return True, guarded, instr.target
    if base in ("ret", "exit", "trap"):
        return True, guarded, None
    return False, True, None


def basic_blocks(instrs: list, dialect: str = "sass") -> list:
    """The function's basic blocks in address order, with their successors (calls are not
    followed: a called subroutine is not on the caller's path)."""
    by_addr = {ins.addr: k for k, ins in enumerate(instrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        ends, _, target = _flow(ins, dialect)
        if target in by_addr:
            leaders.add(by_addr[target])
        if ends and k + 1 < len(instrs):
            leaders.add(k + 1)
    starts = sorted(leaders)
    block_of = {s: n for n, s in enumerate(starts)}
    blocks = [Block(n, instrs[s:(starts[n + 1] if n + 1 < len(starts) else len(instrs))])
              for n, s in enumerate(starts)]
    for block in blocks:
        ends, falls, target = _flow(block.instrs[-1], dialect)
        if target in by_addr:
            block.succs.append(block_of[by_addr[target]])
        if (falls or not ends) and block.index + 1 < len(blocks):
            block.succs.append(block.index + 1)
    return blocks


def back_edges(blocks: list) -> set:
    """Edges (u, v) of a depth-first walk from the entry to a block still on the walk's stack:
    the loops' back-edges. Iterative, so a long function cannot overflow the recursion."""
    seen, on_stack, edges = set(), set(), set()
    stack = [(0, iter(blocks[0].succs))] if blocks else []
    seen.add(0)
    on_stack.add(0)
    while stack:
        node, successors = stack[-1]
        nxt = next(successors, None)
        if nxt is None:
            on_stack.discard(node)
            stack.pop()
        elif nxt in on_stack:
            edges.add((node, nxt))
        elif nxt not in seen:
            seen.add(nxt)
            on_stack.add(nxt)
            stack.append((nxt, iter(blocks[nxt].succs)))
    return edges


def reachable(blocks: list) -> set:
    seen, todo = {0}, [0]
    while todo:
        for nxt in blocks[todo.pop()].succs:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def loops(blocks: list) -> list:
    """[(header, latches, body)]: the natural loop of each header of a back-edge."""
    preds = {b.index: [] for b in blocks}
    for b in blocks:
        for s in b.succs:
            preds[s].append(b.index)
    latches_of = {}
    for u, v in back_edges(blocks):
        latches_of.setdefault(v, set()).add(u)
    result = []
    for header, latches in sorted(latches_of.items()):
        body, todo = {header}, list(latches)
        while todo:
            node = todo.pop()
            if node not in body:
                body.add(node)
                todo.extend(preds[node])
        result.append((header, latches, body))
    return result


# ---- the path ----

@dataclasses.dataclass
class Path:
    blocks: list            # block indices, head first

    def instrs(self, blocks: list) -> list:
        return [i for n in self.blocks for i in blocks[n].instrs]


def _topological(nodes: set, edges: dict) -> list:
    indegree = {n: 0 for n in nodes}
    for n in nodes:
        for s in edges[n]:
            indegree[s] += 1
    order, ready = [], sorted(n for n in nodes if indegree[n] == 0)
    while ready:
        node = ready.pop()
        order.append(node)
        for s in edges[node]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    return order


def region_dag(blocks: list, nodes: set, header: int) -> dict:
    """The region's edges without those into its head and without inner back-edges."""
    inner = back_edges(blocks)
    return {n: [s for s in blocks[n].succs
                if s in nodes and s != header and (n, s) not in inner] for n in nodes}


def best_paths(blocks: list, nodes: set, head: int, ends: set, fewest_bytes: bool) -> dict:
    """{number of vector accesses: (Path, instructions, vector bytes)}: for each count, the
    path from ``head`` to one of ``ends`` with the most (``fewest_bytes``: fewest) vector bytes,
    then the fewest calls (a call is a slow path: division, square root, sincos, whose fast
    path can be as short as the call's setup), then the fewest instructions."""
    edges = region_dag(blocks, nodes, head)
    sign = -1 if fewest_bytes else 1

    def weight(n):  # (vector accesses, (instructions, vector bytes, calls))
        vec, instrs = blocks[n].vector, blocks[n].instrs
        return len(vec), (len(instrs), sum(bits for _, bits in vec) // 8,
                          sum(i.base in ("CALL", "call") for i in instrs))

    def better(a, b):  # most / fewest bytes, then fewest calls, then fewest instructions
        return b is None or (sign * a[1], -a[2], -a[0]) > (sign * b[1], -b[2], -b[0])

    best = {n: {} for n in nodes}
    count, totals = weight(head)
    best[head][count] = (totals, (head,))
    result = {}
    for node in _topological(nodes, edges):
        for count, (totals, path) in best[node].items():
            if node in ends and better(totals, result.get(count, (None,))[0]):
                result[count] = (totals, path)
            for succ in edges[node]:
                c, more = weight(succ)
                entry = (tuple(x + y for x, y in zip(totals, more)), path + (succ,))
                if better(entry[0], best[succ].get(count + c, (None,))[0]):
                    best[succ][count + c] = entry
    return {c: (Path(list(p)), t[0], t[1]) for c, (t, p) in result.items()}


def regions(blocks: list) -> list:
    """[(head, ends, nodes)]: every loop (latches as ends), or, when no loop holds a vector
    access (a Triton program handles its tile once), the whole function from its entry to
    its exits."""
    found = [(h, latches, body) for h, latches, body in loops(blocks)
             if any(blocks[n].vector for n in body)]
    if found:
        return found
    nodes = reachable(blocks)
    exits = {n for n in nodes if not blocks[n].succs}
    return [(0, exits, nodes)]


# ---- PTX ----

_PTX_LABEL = re.compile(r"^\s*(\$?[\w.$]+):")
_PTX_WIDTH = re.compile(r"\.(?:b|u|s|f)(8|16|32|64)\b")


def _ptx_access(opcode: str):
    parts = opcode.split(".")
    if parts[0] not in ("ld", "st") or "global" not in parts:
        return None
    lanes = 4 if "v4" in parts else 2 if "v2" in parts else 1
    width = _PTX_WIDTH.search(opcode)
    return ("load" if parts[0] == "ld" else "store"), lanes * int(width.group(1) if width else 32)


def parse_ptx(text: str) -> list:
    """The instructions of the (one) entry function of a PTX file, labels kept as the targets
    of the branches; inline-asm braces, directives and comments are not instructions."""
    instrs, labels, body = [], {}, False
    for line in text.splitlines():
        line = line.split("//", 1)[0].strip()
        if line.startswith(".visible .entry") or line.startswith(".entry"):
            body = True
        if not body or not line or line.startswith(".") or line in ("{", "}"):
            continue
        label = _PTX_LABEL.match(line)
        if label and not line.endswith(";"):
            labels[label.group(1)] = len(instrs)
            continue
        guard = ""
        if line.startswith("@"):
            guard, line = line.split(None, 1)
        opcode, _, operands = line.rstrip(";").partition(" ")
        instr = Instr(len(instrs), guard, opcode, operands.strip())
        if opcode.startswith("bra"):
            instr.target = operands.strip().rstrip(";").strip()
        instr.access = _ptx_access(opcode)
        instr.local = opcode.startswith(("ld.local", "st.local"))
        instrs.append(instr)
    for instr in instrs:  # labels -> the address of the instruction they name
        if isinstance(instr.target, str):
            instr.target = labels.get(instr.target)
    return instrs
