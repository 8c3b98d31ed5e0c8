"""Every ```python block of README.md and docs/*.md runs here, so a snippet that no longer works
fails the tests. (docs/studies/ holds scripts with tests of their own: tests/test_studies.py.)

A block runs on the CPU, in a fresh temporary working directory (what it saves lands there), in
a namespace that tests/doc_prelude.py fills first with the names the page assumes: a small
model, its data, an optimizer (PRELUDES there says which page gets which). Blocks stay as readers
see them; only the prelude knows they are tested.

A marker, an HTML comment on the line right before a block's opening fence, changes that:

    <!-- not-run: REASON -->   the block is not executed here, and REASON says why (it needs a
                               GPU, several processes, the network, or is a fragment by design);
                               a marker without a reason fails test_every_marker_is_well_formed
    <!-- continues -->         the block runs in the namespace the block before it (same page)
                               left: a page may build on its earlier block. The blocks so joined
                               form one chain and one test, named after its first block.

Blocks in other languages are not executed: bash blocks are commands for a shell (CI runs the
README's test command, .ci/run, and the tests run the benchmark's quick mode), plain blocks are
diagrams or program output. The pages' relative links are checked too.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import doc_prelude

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-run|continues)\b(.*?)-->$")


@dataclass
class Block:
    page: str        # path relative to the repository
    line: int        # line of the opening fence, 1-based
    marker: str      # the HTML comment on the line before the fence, or ''
    code: str

    @property
    def not_run_reason(self) -> str | None:
        match = MARKER.match(self.marker)
        if not match or match.group(1) != "not-run":
            return None
        return match.group(2).strip().lstrip(":").strip()

    @property
    def continues(self) -> bool:
        match = MARKER.match(self.marker)
        return bool(match) and match.group(1) == "continues"


def python_blocks(page: str, text: str) -> list[Block]:
    """The page's ```python blocks, each with the comment line right before its fence."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if FENCE.match(lines[j]))
        if opening.group(1) == "python":
            before = lines[index - 1].strip() if index > 0 else ""
            blocks.append(Block(page, index + 1, before if before.startswith("<!--") else "",
                                textwrap.dedent("\n".join(lines[index + 1:end]))))
        index = end + 1
    return blocks


def chains(blocks: list[Block]) -> list[list[Block]]:
    """The blocks in runs: a block marked continues joins the run of the block before it."""
    runs: list[list[Block]] = []
    for block in blocks:
        if block.continues and runs and runs[-1][-1].page == block.page:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


TEXTS = {str(path.relative_to(ROOT)): path.read_text() for path in PAGES}
ALL_BLOCKS = [block for page, text in TEXTS.items() for block in python_blocks(page, text)]
CHAINS = chains(ALL_BLOCKS)


def run_block(block: Block, namespace: dict) -> None:
    # blank lines first, so a traceback names the page and the line a reader sees
    code = compile("\n" * block.line + block.code, str(ROOT / block.page), "exec")
    exec(code, namespace)


@pytest.mark.parametrize("chain", CHAINS, ids=[f"{c[0].page}:{c[0].line}" for c in CHAINS])
def test_doc_block_runs(chain, tmp_path, monkeypatch):
    reason = chain[0].not_run_reason
    if reason is not None:
        pytest.skip(f"marked not-run in the page: {reason}")
    monkeypatch.chdir(tmp_path)
    prelude = doc_prelude.PRELUDES.get(chain[0].page, doc_prelude.basic)
    with torch.random.fork_rng():
        namespace = prelude()
        for block in chain:
            run_block(block, namespace)


def marker_problems(texts: dict) -> list[str]:
    """What is wrong with the markers of ``texts`` (page -> its text): a comment before a python
    block that is no known marker, not-run without a reason, continues with no block before it
    or after a not-run one (it would never run), a marker that applies to no python block."""
    blocks = [block for page, text in texts.items() for block in python_blocks(page, text)]
    problems = [f"{b.page}:{b.line}: unknown marker {b.marker!r}" for b in blocks
                if b.marker and not MARKER.match(b.marker)]
    problems += [f"{b.page}:{b.line}: not-run without a reason" for b in blocks
                 if b.not_run_reason == ""]
    runs = chains(blocks)
    problems += [f"{c[0].page}:{c[0].line}: continues, but no block before it on its page"
                 for c in runs if c[0].continues]
    problems += [f"{b.page}:{b.line}: continues a block marked not-run" for c in runs
                 if c[0].not_run_reason is not None for b in c[1:]]
    placed = {(block.page, block.line - 1) for block in blocks if block.marker}
    for page, text in texts.items():
        for number, line in enumerate(text.splitlines(), start=1):
            if re.match(r"\s*<!--\s*(not-run|continues)", line) and (page, number) not in placed:
                problems.append(f"{page}:{number}: marker not right before a ```python fence")
    return problems


def test_every_marker_is_well_formed():
    problems = marker_problems(TEXTS)
    assert not problems, "\n".join(problems)


def test_the_marker_check_finds_each_kind_of_problem():
    bad = "\n".join([
        "<!-- continues -->", "```python", "a = 1", "```",          # nothing before it
        "<!-- not-run -->", "```python", "b = 1", "```",            # no reason
        "<!-- continues -->", "```python", "c = 1", "```",          # continues a not-run block
        "<!-- skip this -->", "```python", "d = 1", "```",          # unknown
        "<!-- not-run: a shell command -->", "```bash", "ls", "```",  # not before python
    ])
    problems = marker_problems({"bad.md": bad})
    assert [problem.split(": ", 1)[1].split(" '")[0] for problem in problems] == [
        "unknown marker", "not-run without a reason",
        "continues, but no block before it on its page", "continues a block marked not-run",
        "marker not right before a ```python fence"], problems


def test_the_pages_have_their_blocks():
    """The extraction finds blocks on every page that has them (a broken fence pattern would
    otherwise pass silently), and most of them run."""
    pages = {block.page for block in ALL_BLOCKS}
    assert {"README.md", "docs/usage.md", "docs/hf.md", "docs/lightning.md",
            "docs/peft.md"} <= pages
    skipped = [block for block in ALL_BLOCKS if block.not_run_reason is not None]
    assert len(skipped) <= len(ALL_BLOCKS) // 4, [f"{b.page}:{b.line}" for b in skipped]


def test_the_pages_links_lead_to_files():
    """Pages moved between README.md and docs/: every relative link still finds its file."""
    broken = [f"{page}: {target}" for page, text in TEXTS.items()
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
              if "://" not in target and not ((ROOT / page).parent / target).exists()]
    assert not broken, broken
