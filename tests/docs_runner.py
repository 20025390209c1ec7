"""Run the fenced blocks of the README and docs/*.md as a user would (tests/test_docs_commands.py).

The convention every page follows (README.md and docs/*.md, every fenced block, in order):

- ```console: a line starting with `$ ` is a command (a line ending in `\\` continues it), the
  lines after it up to the next command are its expected output (stdout and stderr together, as
  a terminal shows them). A line `...` (indentation allowed) stands for any number of lines.
  Output is compared after masking what differs in every run: uuids (decision ids), dates and
  times, "Ns ago" ages, and the folder the pages run in. A command with no output shown must
  print nothing (and `echo $?` shows the status of the previous command).
- ```bash / ```sh: the block is run as one script with `set -e` and must exit 0.
- ```python: the block is run with the test's Python and must exit 0.
- Any other language (yaml, json, none...) is content to read, not run.
- A block that cannot run offline on the demo's data (it needs the real model, a GPU, the
  network or a long-running server) is preceded by `<!-- docs-runner: skip (REASON) -->` on the
  line before its fence (blank lines between are allowed); the runner prints the reasons.

Each page runs in its own copy of a fresh demo folder: the repository's files (with `.venv`
linked) after `scripts/demo.sh` ran in it (offline, tiny model, install skipped), so a page
starts where a user who ran the demo starts. Blocks of one page share the shell's exported
variables, the current folder and the last exit status, as one terminal session would.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
SKIP = re.compile(r"^<!--\s*docs-runner:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
MARKER = re.compile(r"<!--\s*docs-runner")
RUN_LANGS = {
    "console": "console",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
    "python": "python",
}
COMMAND_TIMEOUT = 300
# Blocks that install into (or run the whole suite from) the environment the tests run in: the
# page's `.venv` is the test's own, so these would repoint its editable install at a temporary
# copy. They must be marked skip; the runner refuses to run them.
REFUSED = re.compile(r"scripts/(?:install|test)\.sh|\.ci/run|\bpip\s+install\b")
NESTED = "MODERATION_DOCS_RUNNER"  # set inside the pages: a nested run of the suite runs no page


@dataclass
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None  # the reason, when marked


@dataclass
class Failure:
    block: Block
    what: str  # the command or "block"
    detail: str

    def __str__(self) -> str:
        return f"{self.block.file}:{self.block.line} ({self.block.lang}) {self.what}\n{self.detail}"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of a Markdown file, with its skip reason; a malformed marker raises."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if MARKER.search(lines[i]) and not SKIP.match(lines[i].strip()):
                raise ValueError(f"{path}:{i + 1}: malformed docs-runner marker: {lines[i]!r}")
            i += 1
            continue
        fence, start = match["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(match["indent"]) :])
            i += 1
        i += 1  # the closing fence
        skip = None
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        if before >= 0 and (marker := SKIP.match(lines[before].strip())):
            skip = marker["reason"]
        found.append(
            Block(
                str(path.relative_to(root)), start + 1, match["lang"].lower(), "\n".join(body), skip
            )
        )
    return found


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$ ` line of a console block."""
    steps: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if steps:
                steps[-1][1].append(line)
            elif line.strip():
                raise ValueError(f"output before the first command: {line!r}")
            i += 1
            continue
        command = line[2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command += "\n" + lines[i]  # bash reads the backslash-newline itself
        steps.append((command, []))
        i += 1
    return steps


# --- masking -----------------------------------------------------------------------------------

UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
DATETIME = re.compile(
    r"\b\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[+-]\d{2}:\d{2}|Z)?)?\b"
)
AGO = re.compile(r"\b\d+(?:\.\d+)?\s?(?:s|m|h|d|min|seconds?|minutes?|hours?|days?) ago\b")
SECONDS = re.compile(r"\bin \d+(?:\.\d+)? ?s\b")


# An absolute path up to the repository's folder: pages show a user's own (`/home/you/moderation`).
REPO_PATH = re.compile(r"(?:/[^\s/]+)+(?=/(?:demo|examples|policies)/)")


def mask(text: str, folder: Path | None = None) -> str:
    if folder is not None:
        for form in {str(folder), str(folder.resolve())}:
            text = text.replace(form, "<FOLDER>")
    text = REPO_PATH.sub("<FOLDER>", text)
    text = UUID.sub("<ID>", text)
    text = DATETIME.sub("<TIME>", text)
    text = AGO.sub("<AGE> ago", text)
    return SECONDS.sub("in <N>s", text)


def _normal(lines: list[str]) -> list[str]:
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; a `...` line in expected matches any number of actual lines."""
    if not expected:
        return not actual
    head = expected[0]
    if head.strip() == "...":
        return any(matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and head == actual[0] and matches(expected[1:], actual[1:])


def collapse(text: str) -> str:
    """Table columns are padded to their widest value; masked values change widths."""
    return re.sub(r"(?<=\S) {2,}(?=\S)", "  ", text)


# --- running -----------------------------------------------------------------------------------


def _run(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """stdout and stderr together; on a timeout the whole process group is killed."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        out += f"\n[docs runner: killed after {COMMAND_TIMEOUT} s]"
        return subprocess.CompletedProcess(args, -9, out, None)
    return subprocess.CompletedProcess(args, process.returncode, out, None)


@dataclass
class Session:
    """One terminal session in `folder`: exported variables, current folder and last status."""

    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    status: int = 0

    def __post_init__(self) -> None:
        self.cwd = self.cwd or self.folder
        self.state = self.folder.parent / f".{self.folder.name}-shell-state"

    def bash(self, script: str, *, strict: bool) -> subprocess.CompletedProcess:
        """Run a script in bash; keep its exports and folder for the next one."""
        keep = (
            f"export -p > {shlex.quote(str(self.state))}; pwd >> {shlex.quote(str(self.state))}.pwd"
        )
        wrapped = (
            f"trap {shlex.quote(keep)} EXIT\n"
            "set -a\n"  # `ID=...` then `$ID` in the next command: variables carry over
            f"(exit {self.status})\n"  # `echo $?` sees the previous command's status
            + ("set -e\n" if strict else "")
            + script
            + "\n"
        )
        Path(f"{self.state}.pwd").unlink(missing_ok=True)
        done = _run(["bash", "-c", wrapped], cwd=self.cwd, env=self.env)
        self._reload()
        self.status = done.returncode
        return done

    def _reload(self) -> None:
        dumped = subprocess.run(
            ["bash", "-c", f"set -a; . {shlex.quote(str(self.state))} 2>/dev/null; env -0"],
            env={"PATH": self.env.get("PATH", "/usr/bin:/bin")},
            capture_output=True,
            text=True,
        ).stdout
        env = dict(entry.split("=", 1) for entry in dumped.split("\0") if "=" in entry)
        for name in ("SHLVL", "_", "OLDPWD", "PWD"):
            env.pop(name, None)
        if env:
            self.env = env
        pwd = Path(f"{self.state}.pwd")
        if pwd.exists() and (lines := pwd.read_text().splitlines()):
            self.cwd = Path(lines[-1])

    def python(self, code: str) -> subprocess.CompletedProcess:
        done = _run([sys.executable, "-c", code], cwd=self.cwd, env=self.env)
        self.status = done.returncode
        return done


def run_block(session: Session, block: Block) -> list[Failure]:
    kind = RUN_LANGS.get(block.lang)
    if kind is None or block.skip:
        return []
    if REFUSED.search(block.text):
        return [
            Failure(block, "block", "refused: it installs or runs the test suite; mark it skip")
        ]
    if kind == "bash":
        done = session.bash(block.text, strict=True)
        if done.returncode:
            return [Failure(block, "block", f"exit {done.returncode}:\n{done.stdout}")]
        return []
    if kind == "python":
        done = session.python(block.text)
        if done.returncode:
            return [Failure(block, "block", f"exit {done.returncode}:\n{done.stdout}")]
        return []
    failures = []
    for command, expected in console_steps(block.text):
        done = session.bash(command, strict=False)
        want = _normal([collapse(mask(line, session.folder)) for line in expected])
        got = _normal([collapse(mask(line, session.folder)) for line in done.stdout.splitlines()])
        if not matches(want, got):
            diff = "\n".join(
                difflib.unified_diff(want, got, "documented", "actual", lineterm="", n=2)
            )
            status = f" (exit {done.returncode})" if done.returncode else ""
            failures.append(Failure(block, f"$ {command}{status}", diff or "(no output shown)"))
    return failures


def environment(folder: Path) -> dict[str, str]:
    """A user's shell in the demo folder: offline, its own `.venv` first on PATH, nothing of ours."""
    keep = {"HOME", "LANG", "LC_ALL", "TMPDIR", "TERM", "USER"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        PATH=f"{folder / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        PYTHONPATH=str(folder),  # the copy's code, not an editable install's
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        COLUMNS="200",
        MODERATION_DEMO_SKIP_INSTALL="1",  # `bash scripts/demo.sh` in a page: the venv is ours
    )
    env[NESTED] = "1"
    for name in ("MODERATION_CACHE_DIR", "MODERATION_EMBEDDING_CACHE_DIR"):
        env[name] = str(folder / ".cache" / name.lower())
    return env


IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "demo",
    "moderation.db*",
    "spool",
    "held",
    "build",
    "dist",
)


def build_demo(folder: Path) -> subprocess.CompletedProcess:
    """A copy of the repository with `.venv` linked, after `scripts/demo.sh` (install skipped)."""
    shutil.copytree(ROOT, folder, ignore=IGNORED, symlinks=True)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    env = environment(folder)
    return _run(["bash", "scripts/demo.sh"], cwd=folder, env=env)


def run_page(demo: Path, page: Path, work: Path) -> tuple[list[Failure], list[Block]]:
    """Run one page's blocks in a copy of the demo folder: (failures, skipped blocks)."""
    folder = work / page.stem
    shutil.copytree(demo, folder, symlinks=True)
    session = Session(folder, environment(folder))
    failures: list[Failure] = []
    skipped: list[Block] = []
    for block in blocks(page):
        if block.skip and block.lang in RUN_LANGS:
            skipped.append(block)
        failures += run_block(session, block)
    return failures, skipped


# --- updating a page ---------------------------------------------------------------------------


def update_page(demo: Path, page: Path, work: Path) -> int:
    """Write each console command's actual output into `page` where it differs (blocks with a
    `...` line are left alone: they are abridged by hand); the number of outputs replaced."""
    folder = work / page.stem
    shutil.copytree(demo, folder, symlinks=True)
    session = Session(folder, environment(folder))
    lines = page.read_text(encoding="utf-8").splitlines()
    edits: list[tuple[int, int, list[str]]] = []
    for block in blocks(page):
        if RUN_LANGS.get(block.lang) != "console" or block.skip:
            run_block(session, block)
            continue
        body = block.text.splitlines()
        starts = [i for i, line in enumerate(body) if line.startswith("$ ")]
        for step, (command, expected) in enumerate(console_steps(block.text)):
            done = session.bash(command, strict=False)
            actual = done.stdout.rstrip("\n").splitlines()
            actual = [REPO_PATH.sub("/home/you/moderation", line.rstrip()) for line in actual]
            if any(line.strip() == "..." for line in expected):
                continue
            want = _normal([collapse(mask(x, folder)) for x in expected])
            if matches(want, _normal([collapse(mask(x, folder)) for x in actual])):
                continue
            first = starts[step] + command.count("\n") + 1  # the output's first line in body
            end = starts[step + 1] if step + 1 < len(starts) else len(body)
            while end > first and not body[end - 1].strip():
                end -= 1
            edits.append((block.line + first, block.line + end, actual))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(edits)


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.docs_runner --update PAGE...`: refresh the pages' shown outputs."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.docs_runner")
    parser.add_argument("--update", nargs="+", type=Path, required=True, metavar="PAGE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "repo"
        done = build_demo(demo)
        if done.returncode:
            raise SystemExit(f"scripts/demo.sh failed:\n{done.stdout}")
        for page in args.update:
            count = update_page(demo, page.resolve(), Path(tmp))
            print(f"{page}: {count} output(s) updated")


if __name__ == "__main__":
    main()
