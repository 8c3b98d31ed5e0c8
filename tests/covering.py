"""Covering arrays for the kernel suite: a deterministic greedy all-pairs generator.

A *factor* is a named test dimension with a list of levels (hashable labels: strings, numbers,
bools, None, tuples); its first level is the cheap default that fills a slot nothing else asks
for. ``cover`` returns rows (dicts name -> level) such that

- every pair of levels of two factors appears in some row (pairwise, "strength 2"),
- every partial assignment in ``required`` appears in some row (``product`` builds the full
  cross of some factors: a kernel's instance flags, say),
- every partial assignment in ``explicit`` gets a row of its own (the known risky combinations),
- no row breaks ``valid`` (called on partial rows too: it must only reject what the keys it sees
  already rule out),

in a few hundred rows where the full grid would have thousands. Greedy, AETG-like: a new row
starts from the first uncovered requirement (explicit rows first, then ``required``, then the
pairs, each in the order given), and each remaining factor takes the level that completes the
most uncovered requirements (ties: the earlier level). Deterministic: no randomness and no set
iteration order reaches the result.

``NIGHTLY`` says whether the long grids were asked for (``--nightly``, ``-m nightly`` or
``IVON_FAST_NIGHTLY=1``; tests/conftest.py sets the variable for the first two before the test
modules are imported): the suites then also build their full grids, marked ``nightly``.
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Iterable, Mapping, Sequence

NIGHTLY = os.environ.get("IVON_FAST_NIGHTLY") == "1"

Row = dict


def product(factors: Mapping[str, Sequence], names: Sequence[str] | None = None,
            **levels: Sequence) -> list[dict]:
    """Every combination of the levels of ``names`` (default: all factors), as partial rows;
    a keyword overrides a factor's levels (``product(F, ["a", "b"], b=[True])``)."""
    names = list(factors) if names is None else list(names)
    choices = [levels.get(name, factors[name]) for name in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


class _Missing:
    pass


_MISSING = _Missing()


def _key(assignment: Mapping) -> tuple:
    return tuple(sorted(assignment.items(), key=lambda item: item[0]))


def _requirements(factors, explicit, required, valid, pairwise) -> tuple:
    """(the explicit rows, the uncovered requirements by ``_key``, in order), each checked
    against the factors; requirements that ``valid`` rejects are dropped."""
    for name, levels in factors.items():
        if len(set(levels)) != len(levels) or not levels:
            raise ValueError(f"factor {name}: levels must be distinct and non-empty: {levels}")

    def check(assignment):
        for name, level in assignment.items():
            if name not in factors or level not in factors[name]:
                raise ValueError(f"unknown factor or level {name}={level!r}")
        return assignment

    explicit = [check(dict(a)) for a in explicit]
    wanted = [check(dict(a)) for a in required]
    if pairwise:
        for a, b in itertools.combinations(list(factors), 2):
            wanted += [{a: x, b: y} for x in factors[a] for y in factors[b]]
    uncovered: dict[tuple, dict] = {}
    for assignment in wanted:
        if valid(assignment):
            uncovered.setdefault(_key(assignment), assignment)
    return explicit, uncovered


def cover(factors: Mapping[str, Sequence], *, required: Iterable[Mapping] = (),
          explicit: Iterable[Mapping] = (), valid: Callable[[Mapping], bool] = lambda row: True,
          pairwise: bool = True) -> list[Row]:
    """Rows covering every pair, every ``required`` partial row and every ``explicit`` one
    (see the module docstring). Requirements that ``valid`` rejects are dropped (they cannot
    occur); a requirement with an unknown factor or level is an error."""
    names = list(factors)
    explicit, uncovered = _requirements(factors, explicit, required, valid, pairwise)
    # each uncovered requirement is indexed under its factors' names so that a candidate level
    # only looks at the requirements it could complete
    index: dict[tuple, set] = {}  # (name, level) -> the uncovered requirements that hold it
    primary: dict[tuple, set] = {}  # the same, under the first item of each requirement only
    for key, assignment in uncovered.items():
        for item in assignment.items():
            index.setdefault(item, set()).add(key)
        primary.setdefault(key[0], set()).add(key)

    def completes(row, name, level):
        """How many uncovered requirements setting name=level in ``row`` completes (a count:
        the order of the set does not matter)."""
        count = 0
        for key in index.get((name, level), ()):
            if all(n == name or row.get(n, _MISSING) == v for n, v in key):
                count += 1
        return count

    def complete(start):
        row = dict(start)
        if not valid(row):
            raise ValueError(f"an explicit or required row is invalid: {start}")
        for name in names:
            if name in row:
                continue
            best, best_score = _MISSING, -1
            for level in factors[name]:
                if not valid({**row, name: level}):
                    continue
                score = completes(row, name, level)
                if score > best_score:
                    best, best_score = level, score
            if best is _MISSING:
                raise ValueError(f"no valid level of {name} for {row}")
            row[name] = best
        done = [k for item in row.items() for k in primary.get(item, ())
                if all(row[n] == v for n, v in k)]
        for key in done:
            del uncovered[key]
            primary[key[0]].discard(key)
            for item in key:
                index[item].discard(key)
        return row

    rows = [complete(assignment) for assignment in explicit]
    while uncovered:
        rows.append(complete(next(iter(uncovered.values()))))
    return rows


def label(row: Mapping, names: Sequence[str] | None = None) -> str:
    """A short test id of a row: name=level pairs of ``names`` (default: all)."""
    names = list(row) if names is None else names
    return "-".join(f"{name}={row[name]}" for name in names)


def missing(rows: Iterable[Mapping], wanted: Iterable[Mapping]) -> list[dict]:
    """The partial rows of ``wanted`` that no row of ``rows`` contains (for coverage proofs)."""
    rows = list(rows)
    return [dict(w) for w in wanted
            if not any(all(row.get(n, _MISSING) == v for n, v in w.items()) for row in rows)]
