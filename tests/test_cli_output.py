"""Nothing leaks, nothing is clobbered (issue 8, items 12-15; issue 7's `--db` fixes): escaped
terminal output, safe CSV, masked passwords, refused output targets, one-line output errors,
owner-only SQLite files."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from moderation.bench.records import example_decisions, example_policy
from moderation.cli import main
from moderation.cli.options import clean
from moderation.storage import DecisionLog
from moderation.storage import db as storage_db

REPO = Path(__file__).resolve().parents[1]
ESC = "\x1b"
TITLE = "\x1b]0;pwned\x07"  # sets the terminal window title
CLEAR = "\x1b[2J"
HOSTILE_NAME = f"mallory{TITLE}"
HOSTILE_REASON = f"fine\nItem 1: approved by admin{CLEAR}"  # forges a line, then clears the screen
HOSTILE_CONCEPT = f"gore{CLEAR}\u202e"
DOWN_PG = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x"


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def cli(*args, **kwargs):
    """`python -m moderation ...` in a real process (for real stdout/stderr file descriptors)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moderation", *map(str, args)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def full_device(tmp_path) -> Path:
    """A private copy of /dev/full (a test never risks replacing the real one)."""
    path = tmp_path / "full"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except (PermissionError, AttributeError):
        pytest.skip("cannot create a device node here (needs root)")
    return path


@pytest.fixture
def hostile_db(tmp_path):
    """A log written through the real insert path, full of terminal escapes and forged lines."""
    url = f"sqlite:///{tmp_path / 'hostile.db'}"
    base = example_policy()
    concepts = [dict(c) for c in base.concepts]
    concepts[1]["name"] = HOSTILE_CONCEPT
    policy = dataclasses.replace(base, name=f"pol{CLEAR}", version=f"1{ESC}[5m", concepts=concepts)
    records = example_decisions(3, policy, review_every=1)
    for r in records:
        r.top_concept = HOSTILE_CONCEPT
        r.fired = [HOSTILE_CONCEPT, "=cmd|' /C calc'!A0"]
        r.meta = {"prompt": f'=HYPERLINK("http://x"){TITLE}', f"k{ESC}": "+1", "user": "@SUM(1)"}
        r.error = f"bad{ESC}[31m file\nforged"
    with DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held") as log:
        log.register_policy(policy)
        log.write(records)
    yield url
    storage_db.dispose(url)


# -- item 13: control characters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("line\nforged\rx\ty", "line\\nforged\\rx\\ty"),
        ("\x00\x07\x7f\x9b", "\\x00\\x07\\x7f\\x9b"),
        ("right\u202eleft\u2066\u2028", "right\\u202eleft\\u2066\\u2028"),
        ("café ✓ 👨‍👩‍👧 \\n", "café ✓ 👨‍👩‍👧 \\n"),
        (None, ""),
    ],
)
def test_clean_escapes_every_control_character_and_nothing_else(raw, shown):
    assert clean(raw) == shown
    assert clean(clean(raw)) == clean(raw)


def _assert_inert(text: str) -> None:
    assert ESC not in text and "\x07" not in text and "\u202e" not in text
    assert not any(line.startswith(("Item 1: approved", "forged")) for line in text.splitlines())


def test_review_list_show_and_stats_escape_what_users_typed(hostile_db):
    run("review", "claim", "--reviewer", HOSTILE_NAME, "--db", hostile_db)
    run(
        "review",
        "reject",
        "1",
        "--reviewer",
        HOSTILE_NAME,
        "--reason",
        HOSTILE_REASON,
        "--db",
        hostile_db,
    )
    listed = run("review", "list", "--db", hostile_db).output
    _assert_inert(listed)
    assert len(listed.splitlines()) == 4  # header + 3 items: one line each
    assert "mallory\\x1b]0;pwned\\x07" in listed and "gore\\x1b[2J\\u202e" in listed
    assert "pol\\x1b[2J@1\\x1b[5m" in listed

    shown = run("review", "show", "1", "--db", hostile_db).output
    _assert_inert(shown)
    assert shown.startswith(
        "Item 1: rejected by mallory\\x1b]0;pwned\\x07: fine\\nItem 1: approved by admin\\x1b[2J\n"
    )
    assert "  verdict review, action review, top concept gore\\x1b[2J\\u202e\n" in shown
    assert "  error bad\\x1b[31m file\\nforged\n" in shown
    assert '  meta prompt="=HYPERLINK(\\"http://x\\")\\u001b]0;pwned\\u0007" k\\x1b="+1"' in shown

    stats = run("review", "stats", "--db", hostile_db).output
    _assert_inert(stats)
    assert "  by fired concept: =cmd|' /C calc'!A0 3, gore\\x1b[2J\\u202e 3" in stats

    claimed = run("review", "claim", "--reviewer", f"eve{CLEAR}", "--db", hostile_db).output
    assert claimed.startswith("Claimed 1 item(s) for eve\\x1b[2J until ")
    _assert_inert(claimed)


def test_json_stays_exact_and_inert(hostile_db):
    (item, *_) = json.loads(run("review", "list", "--json", "--db", hostile_db).stdout)
    assert item["top_concept"] == HOSTILE_CONCEPT  # exact once parsed
    text = run("review", "show", "1", "--json", "--db", hostile_db).stdout
    assert ESC not in text and "\u202e" not in text  # \u001b and \u202e escapes instead
    assert json.loads(text)["decision"]["error"] == f"bad{ESC}[31m file\nforged"


def test_error_messages_that_echo_input_are_escaped(hostile_db):
    run("review", "claim", "--reviewer", "alice", "-n", "3", "--db", hostile_db)
    result = run(
        "review", "approve", "1", "--reviewer", f"bob{CLEAR}\nforged", "--db", hostile_db, code=1
    )
    assert result.output == "Error: item 1: claimed by alice, not bob\\x1b[2J\\nforged\n"


def test_csv_export_neutralises_formulas_and_escapes_controls(hostile_db, tmp_path):
    run("review", "claim", "--reviewer", "@alice", "--db", hostile_db)
    run("review", "reject", "1", "--reviewer", "@alice", "--reason", "=1+1\tx", "--db", hostile_db)
    text = run("review", "export", "--format", "csv", "--db", hostile_db).stdout
    assert ESC not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    (rejected,) = [r for r in rows if r["review_status"] == "rejected"]
    assert rejected["reviewer"] == "'@alice"
    assert rejected["review_reason"] == "'=1+1\\tx"
    assert rejected["policy_name"] == "pol\\x1b[2J"
    assert rejected["top_concept"] == "gore\\x1b[2J\\u202e"
    assert rejected["error"] == "bad\\x1b[31m file\\nforged"
    assert json.loads(rejected["fired"]) == [HOSTILE_CONCEPT, "=cmd|' /C calc'!A0"]  # [ first
    float(rejected["margin"])  # numbers stay numbers: a negative margin is not a formula
    for cell in (c for r in rows for c in r.values()):
        if cell.startswith(("=", "+", "-", "@", "\t", "\r")):
            float(cell)  # only a number may start like a formula
    lines = run("review", "export", "--format", "jsonl", "--db", hostile_db).stdout.splitlines()
    exact = [json.loads(line) for line in lines if json.loads(line)["review_status"] == "rejected"]
    assert exact[0]["review_reason"] == "=1+1\tx" and exact[0]["reviewer"] == "@alice"


def test_check_table_escapes_file_names(tmp_path, tiny_clip_dir):
    from moderation.demo import sample_images

    folder = tmp_path / "in"
    folder.mkdir()
    sample_images(folder, n=1)
    (folder / "sample-00.png").rename(folder / f"a{CLEAR}b.png")
    (folder / "bad\nforged.png").write_bytes(b"not a png")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        f"policy: p\nmodel: {tiny_clip_dir}\nconcepts:\n"
        "  - name: any\n    prompts: [a photo]\n    threshold: -1\n    action: blur\n"
    )
    result = run("check", folder, "--policy", policy, "--no-log", code=1)
    _assert_inert(result.stdout)
    rows = [line.split() for line in result.stdout.splitlines()[2:4]]
    assert [row[:2] for row in rows] == [
        [f"{folder}/a\\x1b[2Jb.png", "flag"],
        [f"{folder}/bad\\nforged.png", "error"],
    ]


# -- item 12 and issue 7: URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["review", "list"],
        ["review", "stats"],
        ["review", "export", "--format", "jsonl"],
        ["db", "upgrade"],
        ["db", "current"],
        ["db", "downgrade", "--revision", "base"],
        ["db", "replay", "--spool", "SPOOL"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://u:s3cret@h:notaport/db",
            "Error: invalid database URL 'postgresql+psycopg://***@h:notaport/db': it does not "
            "parse as BACKEND://USER:PASSWORD@HOST:PORT/DATABASE (a port that is not a number, or "
            "an `@`, `:` or `/` in a password that is not percent-encoded)\n",
        ),
        (
            "postgresql+psycopg://u:p@ss:w0rd@h:5999/x",  # issue 15 item 8: an unescaped `@`
            "Error: invalid database URL 'postgresql+psycopg://***@h:5999/x': it does not "
            "parse as BACKEND://USER:PASSWORD@HOST:PORT/DATABASE (a port that is not a number, or "
            "an `@`, `:` or `/` in a password that is not percent-encoded)\n",
        ),
        (
            "postgresql+psycopg://u:p@ss@h/x",  # parses, with `ss@h` as its host
            "Error: invalid database URL 'postgresql+psycopg://***@h/x': more than one `@` "
            "before the host (percent-encode an `@` in the user name or password as %40)\n",
        ),
        (
            "not a url",
            "Error: invalid database URL 'not a url': not a URL (BACKEND://...)\n",
        ),
        (
            DOWN_PG,
            "Error: cannot reach database postgresql+psycopg://postgres:***@127.0.0.1:1/x: ",
        ),
    ],
    ids=["bad-port", "at-in-password", "two-ats", "garbage", "down"],
)
def test_db_urls_give_one_line_errors_and_never_show_passwords(tmp_path, args, url, message):
    if "SPOOL" in args and url == DOWN_PG:  # something to replay, so that it tries the database
        with DecisionLog(url, spool_dir=tmp_path / "spool") as down:
            down.register_policy(example_policy())
    args = [str(tmp_path / "spool") if a == "SPOOL" else a for a in args]
    result = run(*args, "--db", url, code=1)
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert "w0rd" not in result.output and "@ss" not in result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["review", "list"],
        ["review", "show", "1"],
        ["review", "claim", "--reviewer", "a"],
        ["review", "stats"],
        ["review", "export", "--format", "csv"],
        ["db", "current"],
        ["db", "downgrade", "--revision", "base"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_a_sqlite_file_that_does_not_exist_is_refused_not_created(tmp_path, args):
    path = tmp_path / "typo.db"
    result = run(*args, "--db", f"sqlite:///{path}", code=1)
    assert result.output == (
        f"Error: no database at {path} (sqlite:///{path}); `moderation db upgrade --db URL` "
        "creates one\n"
    )
    assert not path.exists()


def test_db_upgrade_creates_the_file_owner_only_with_its_wal(tmp_path):
    os.umask(0o022)
    path = tmp_path / "new.db"
    result = run("db", "upgrade", "--db", f"sqlite:///{path}")
    assert result.output.startswith(f"upgraded sqlite:///{path} from an empty database to ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    policy = example_policy()
    with DecisionLog(f"sqlite:///{path}", spool_dir=tmp_path / "s") as log:
        log.register_policy(policy)
        log.write(example_decisions(2, policy))
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            assert stat.S_IMODE(side.stat().st_mode) == 0o600, suffix
    storage_db.dispose(f"sqlite:///{path}")


def test_an_existing_database_keeps_its_mode_and_is_warned_about(tmp_path):
    path = tmp_path / "shared.db"
    url = f"sqlite:///{path}"
    run("db", "upgrade", "--db", url)
    os.chmod(path, 0o644)
    result = run("db", "current", "--db", url)
    assert result.stderr == (
        f"warning: {path} is readable by other users (mode 0644) and holds prompts, users and "
        f"embeddings; `chmod 600 {path}` unless that is intended\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # never changed behind the owner's back
    storage_db.dispose(url)


def test_check_creates_its_database_owner_only(tmp_path, tiny_clip_dir):
    from moderation.demo import sample_images

    sample_images(tmp_path, n=1)
    policy = tmp_path / "p.yaml"
    policy.write_text(
        f"policy: p\nmodel: {tiny_clip_dir}\nconcepts:\n  - name: x\n    prompts: [a]\n"
    )
    db = tmp_path / "m.db"
    run("check", tmp_path / "sample-00.png", "--policy", policy, "--db", f"sqlite:///{db}")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    storage_db.dispose(f"sqlite:///{db}")


# -- item 14: output targets and output errors --------------------------------------------------


@pytest.fixture
def compiled_policy(tmp_path, tiny_clip_dir):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"policy: p\nmodel: {tiny_clip_dir}\nconcepts:\n  - name: x\n    prompts: [a]\n"
    )
    return path


def test_compile_refuses_to_replace_what_is_not_a_regular_file(tmp_path, compiled_policy):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere.safetensors")
    targets = {fifo: "a named pipe", link: "a symbolic link"}
    if os.geteuid() == 0:
        targets[full_device(tmp_path)] = "a character device"
    for target, kind in targets.items():
        result = run("policy", "compile", compiled_policy, "-o", target, code=1)
        assert result.stderr == (
            f"Error: refusing to write {target}: it is {kind}, not a regular file\n"
        )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link)
    assert not (tmp_path / "elsewhere.safetensors").exists()
    if os.geteuid() == 0:
        assert stat.S_ISCHR(os.lstat(tmp_path / "full").st_mode)


def test_compile_into_a_folder_that_cannot_exist_is_one_line(tmp_path, compiled_policy):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("policy", "compile", compiled_policy, "-o", blocker / "x.safetensors", code=1)
    (line,) = result.stderr.splitlines()[-1:]
    assert line.startswith(f"Error: cannot write {blocker / 'x.safetensors'}: ")
    assert "Not a directory" in line and "Traceback" not in result.output


def test_export_refuses_to_overwrite_without_force(hostile_db, tmp_path):
    out = tmp_path / "export.jsonl"
    out.write_text("keep me\n")
    result = run("review", "export", "--format", "jsonl", "-o", out, "--db", hostile_db, code=1)
    assert result.output == f"Error: {out} exists; pass --force to overwrite it\n"
    assert out.read_text() == "keep me\n"
    result = run("review", "export", "--format", "jsonl", "-o", out, "--force", "--db", hostile_db)
    assert result.stderr == f"Exported 3 decisions to {out}.\n"
    assert len(out.read_text().splitlines()) == 3


def test_export_to_a_full_disk_is_one_line(hostile_db, tmp_path):
    device = full_device(tmp_path)
    result = run(
        "review", "export", "--format", "csv", "-o", device, "--force", "--db", hostile_db, code=1
    )
    assert result.output == f"Error: cannot write {device}: No space left on device\n"
    assert stat.S_ISCHR(os.lstat(device).st_mode), "a device is written to, never replaced"


def test_export_into_a_missing_folder_leaves_nothing(hostile_db, tmp_path):
    out = tmp_path / "no" / "x.csv"
    result = run("review", "export", "--format", "csv", "-o", out, "--db", hostile_db, code=1)
    assert result.output == f"Error: cannot write {out}: No such file or directory\n"


@pytest.mark.parametrize("stdout", ["full", "closed", "broken pipe"])
def test_standard_output_that_cannot_be_written_is_one_line(hostile_db, tmp_path, stdout):
    args = ["review", "export", "--format", "jsonl", "--db", hostile_db]
    if stdout == "full":
        with full_device(tmp_path).open("w") as sink:
            result = cli(*args, stdout=sink)
        reason = "No space left on device"
    elif stdout == "closed":
        result = cli(*args, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
        reason = "it is closed"
    else:
        read, write = os.pipe()
        os.close(read)
        result = cli(*args, stdout=write)
        os.close(write)
        reason = "Broken pipe"
    assert (result.returncode, result.stderr) == (
        1,
        f"Error: cannot write to standard output: {reason}\n",
    )


def test_check_out_into_an_unwritable_place_is_one_line(tmp_path, compiled_policy):
    from moderation.demo import sample_images

    sample_images(tmp_path, n=1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    image = tmp_path / "sample-00.png"
    result = run(
        "check", image, "--policy", compiled_policy, "--no-log", "--out", blocker / "o", code=1
    )
    assert result.stderr == f"Error: cannot write {blocker / 'o'}: Not a directory\n"
    out = tmp_path / "out"
    out.mkdir()
    (out / "sample-00.png").symlink_to(tmp_path / "victim")
    result = run("check", image, "--policy", compiled_policy, "--no-log", "--out", out, code=1)
    assert result.stderr == (
        f"Error: refusing to write {out / 'sample-00.png'}: it is a symbolic link, not a regular "
        "file\n"
    )
    assert not (tmp_path / "victim").exists()


def test_import_sd_checker_refuses_to_replace_what_is_not_a_regular_file(
    tmp_path, tiny_checker_dir
):
    out = tmp_path / "checker.yaml"
    (tmp_path / "checker.safetensors").symlink_to(tmp_path / "victim")
    result = run("policy", "import-sd-checker", tiny_checker_dir, "--out", out, "--force", code=1)
    assert result.output == (
        f"Error: refusing to write {tmp_path / 'checker.safetensors'}: it is a symbolic link, "
        "not a regular file\n"
    )
    assert not (tmp_path / "victim").exists() and not out.exists()
