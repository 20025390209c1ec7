"""Every fenced block of README.md and docs/*.md runs as written (see tests/docs_runner.py).

How it works, and how to write a page that passes:

- Each page (README.md, then docs/*.md) runs in its own copy of one fresh demo folder, built once
  per test session: the repository's files, `.venv` linked, then `bash scripts/demo.sh` (offline,
  the tiny random CLIP; its install step skipped). So a page starts where a user starts after
  the README's first command, in the repository's folder.
- ```console blocks: `$ ` lines are commands; the lines after them are their exact output
  (stdout + stderr), compared after masking uuids, dates/times, "Ns ago" and the folder's path,
  with runs of spaces collapsed (table widths follow masked values). `...` on a line of its own
  matches any number of lines. No output shown means none printed.
- ```bash / ```sh blocks must exit 0 (`set -e`); ```python blocks must exit 0.
- Blocks of one page share exported variables, the current folder and `$?`, in order.
- `<!-- docs-runner: skip (REASON) -->` on the line before a fence skips it; the reasons are
  printed (`pytest -s`, or the summary's warnings). Use it only for what cannot run offline on the
  demo's data: the real model, a GPU, the network, a long-running server.

A failure names FILE:LINE of the block, the command and a unified diff (documented -> actual).
"""

from __future__ import annotations

import os
import warnings

import pytest

from tests import docs_runner
from tests.docs_runner import Block, blocks, console_steps, mask, matches

PAGES = docs_runner.doc_files()


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    if os.environ.get(docs_runner.NESTED):
        pytest.skip("inside a documented command: no nested page runs")
    folder = tmp_path_factory.mktemp("docs-demo") / "repo"
    done = docs_runner.build_demo(folder)
    assert done.returncode == 0, f"scripts/demo.sh failed:\n{done.stdout}"
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_runs_as_written(page, demo_folder, tmp_path):
    if os.environ.get(docs_runner.NESTED):
        pytest.skip("inside a documented command: no nested page runs")
    failures, skipped = docs_runner.run_page(demo_folder, page, tmp_path)
    for block in skipped:
        message = f"{block.file}:{block.line} ({block.lang}) skipped: {block.skip}"
        print(message)
        warnings.warn(message, stacklevel=1)
    assert not failures, f"{len(failures)} documented command(s) differ:\n\n" + "\n\n".join(
        str(f) for f in failures
    )


def test_every_page_is_collected_and_every_marker_is_well_formed():
    names = {p.name for p in PAGES}
    assert {"README.md", "changing-a-policy.md", "calibration.md"} <= names
    for page in PAGES:
        for block in blocks(page):  # raises on a malformed marker
            if block.lang in docs_runner.RUN_LANGS and block.lang == "console":
                console_steps(block.text)  # raises on output before a command


def test_parsing_skip_markers_and_console_steps(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- docs-runner: skip (needs the real model) -->\n\n```bash\nmoderation bench\n```\n"
        "```console\n$ echo a \\\n  b\na b\n$ true\n```\n",
        encoding="utf-8",
    )
    found = blocks(page, tmp_path)
    assert [(b.lang, b.line, b.skip) for b in found] == [
        ("bash", 4, "needs the real model"),
        ("console", 7, None),
    ]
    assert console_steps(found[1].text) == [("echo a \\\n  b", ["a b"]), ("true", [])]
    page.write_text("<!-- docs-runner: skp (typo) -->\n", encoding="utf-8")
    with pytest.raises(ValueError, match="malformed docs-runner marker"):
        blocks(page, tmp_path)


def test_masking_and_ellipsis():
    line = "Decision 23b9f815-41fa-4a86-a13b-49220a98d08f at 2026-12-02 12:02:08 UTC (3s ago)"
    assert mask(line) == "Decision <ID> at <TIME> UTC (<AGE> ago)"
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "b"], ["a", "b"])
    assert not matches(["a", "...", "d"], ["a", "b"])
    assert not matches([], ["printed"])


def test_a_wrong_output_fails_with_a_diff(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    session = docs_runner.Session(folder, docs_runner.environment(folder))
    block = Block("x.md", 3, "console", "$ export X=1\n$ echo $X; false\n2\n$ echo $?\n1")
    failures = docs_runner.run_block(session, block)
    assert len(failures) == 1
    assert "-2" in failures[0].detail and "+1" in failures[0].detail
    assert str(failures[0]).startswith("x.md:3 (console) $ echo $X; false (exit 1)")
    bash = Block("x.md", 9, "bash", "cd /\nfalse\necho not reached")
    assert docs_runner.run_block(session, bash)[0].what == "block"
    install = Block("x.md", 12, "bash", "bash scripts/install.sh")
    assert "refused" in docs_runner.run_block(session, install)[0].detail


def test_copies_of_a_page_s_output_agree_with_the_page_that_runs_it():
    """A block skipped as "a copy of docs/PAGE.md's ..." must appear in that page verbatim."""
    import re

    for page in PAGES:
        for block in blocks(page):
            found = re.search(r"a copy of (docs/[\w.-]+\.md)", block.skip or "")
            if found:
                source = docs_runner.ROOT / found[1]
                assert block.text in source.read_text(encoding="utf-8"), (
                    f"{block.file}:{block.line} is no longer a copy of {found[1]}"
                )
