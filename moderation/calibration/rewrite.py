"""`calibrate --out`: the policy file again, with only threshold values changed.

Round-trip YAML editing (ruamel.yaml) keeps comments, key order, flow and block styles and
quoting. The smallest change per concept:
- a concept with a `threshold:` of its own gets the new value on that line;
- a concept whose threshold comes from `defaults` gets a `threshold:` line right after its
  `name` (inside `{...}` for a flow mapping);
- a concept inherited from a base policy (`extends`) gets an override entry
  `- name: X / threshold: T` at the end of this file's concept list: the base is never edited.
The file is written only when ruamel.yaml reproduces it unchanged before the edit, and the
result is checked line by line: nothing but threshold lines (and override entries) may differ.
"""

from __future__ import annotations

import difflib
import io
import re
from pathlib import Path
from typing import Any

from moderation.calibration.samples import CalibrationError

# Indentations tried, most common first: (mapping, sequence, offset) as ruamel.yaml names them.
LAYOUTS = ((2, 4, 2), (2, 2, 0), (4, 6, 4), (4, 4, 0), (2, 3, 1), (4, 4, 2))
_ALLOWED = re.compile(r"^\s*(- )?(name: .*|threshold: .*|concepts:\s*|special_care:\s*)$")


def _yaml(layout: tuple[int, int, int]) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1 << 16  # never re-wrap long lines
    mapping, sequence, offset = layout
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def _dump(yaml: Any, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _round_trip(text: str, file: str) -> tuple[Any, Any]:
    """(yaml, document) of the first layout that writes `text` back unchanged."""
    from ruamel.yaml.error import YAMLError

    for layout in LAYOUTS:
        yaml = _yaml(layout)
        try:
            data = yaml.load(text)
        except YAMLError as exc:
            raise CalibrationError(f"{file}: cannot edit: {exc}") from None
        if _dump(yaml, data) == text:
            return yaml, data
    raise CalibrationError(
        f"{file}: cannot rewrite it keeping its layout (mixed indentation?); "
        "set the suggested thresholds by hand"
    )


def _entries(data: Any, special: bool) -> Any:
    if special:
        care = data.get("special_care")
        return care.get("concepts") if care is not None else None
    return data.get("concepts")


def _set(entry: Any, value: float) -> None:
    if "threshold" in entry:
        entry["threshold"] = value
    else:  # the default threshold: a line of its own, right after the name
        keys = list(entry.keys())
        entry.insert(keys.index("name") + 1 if "name" in keys else 0, "threshold", value)


def _override(data: Any, special: bool, name: str, value: float) -> None:
    """An entry that overrides an inherited concept's threshold, in this file's list."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    entry = CommentedMap()
    entry["name"], entry["threshold"] = name, value
    holder = data
    if special:
        if data.get("special_care") is None:
            data["special_care"] = CommentedMap()
        holder = data["special_care"]
    if holder.get("concepts") is None:
        holder["concepts"] = CommentedSeq()
    holder["concepts"].append(entry)


def rewrite_thresholds(text: str, file: str, changes: dict[str, tuple[bool, float]]) -> str:
    """`text` with each {concept: (special, threshold)} set; the other lines as they were."""
    yaml, data = _round_trip(text, file)
    for name, (special, value) in changes.items():
        entries = _entries(data, special) or []
        entry = next((e for e in entries if hasattr(e, "keys") and e.get("name") == name), None)
        if entry is None:
            _override(data, special, name, value)
        else:
            _set(entry, value)
    result = _dump(yaml, data)
    _check(text, result, file)
    return result


def _check(before: str, after: str, file: str) -> None:
    """Refuse a result in which anything but thresholds (and override entries) changed."""
    diff = difflib.ndiff(before.splitlines(), after.splitlines())
    changed = [line[2:] for line in diff if line[:2] in ("- ", "+ ")]
    other = [line for line in changed if "threshold" not in line and not _ALLOWED.match(line)]
    if other:
        raise CalibrationError(
            f"{file}: rewriting would change more than thresholds ({other[0].strip()!r}); "
            "set the suggested thresholds by hand"
        )


def write_policy(
    source: Path,
    out: Path,
    changes: dict[str, tuple[bool, float]],
    *,
    scored_text: str | None = None,
) -> None:
    """Write the policy text that was scored (`scored_text`), with new thresholds, to `out`
    (a regular file; not over the source), atomically (policy.atomic).

    The thresholds were measured for the concepts of `scored_text`: if `source` no longer
    holds that text (edited while calibrate ran), nothing is written (CalibrationError), so a
    threshold measured for one vector is never put on another. Without `scored_text` the file
    is read now (a caller that scored nothing)."""
    if out.resolve() == source.resolve():
        raise CalibrationError(f"--out {out}: is the policy itself; write a new file")
    if out.exists() and not out.is_file():
        raise CalibrationError(f"--out {out}: is not a regular file")
    try:
        now = source.read_text(encoding="utf-8-sig")  # as policy.loader reads it
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{source}: cannot read it again ({exc})") from None
    if scored_text is not None and now != scored_text:
        raise CalibrationError(
            f"{source} changed while it was being calibrated; nothing written to {out} "
            "(run calibrate again on the new version)"
        )
    text = now if scored_text is None else scored_text
    result = rewrite_thresholds(text, str(source), changes)
    from policy import PolicyError, load_policy
    from policy.atomic import atomic_file
    from policy.relocate import relocate_model

    result = relocate_model(result, source, out)  # a relative model folder follows the file

    def loads_there(tmp: Path) -> None:
        # Relative names (extends, embedding files, examples, a model folder) are read from the
        # new file's folder: a policy that does not load there is not written.
        try:
            load_policy(tmp)
        except PolicyError as err:
            raise CalibrationError(
                f"--out {out}: the new policy does not load from that folder "
                f"({err.issues[0].message}); write it beside {source}"
            ) from None

    try:
        with atomic_file(out, text=True, newline="", check=loads_there) as file:
            file.write(result)
    except OSError as exc:
        raise CalibrationError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
