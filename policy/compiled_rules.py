"""The rules every CompiledPolicy obeys, however it was made: compiled, loaded, or built in code.

Fail closed in one place: a compiled policy whose fields could let an image through unjudged
(`on_error: allow`, a review placeholder of `allow`, a blur that changes nothing, a threshold no
cosine can reach, a matrix row that is not a unit vector, names that do not line up with the
matrix rows) cannot exist, so `decide()`, the engine's error path and every loader can use its
fields as they are.
"""

from __future__ import annotations

import math
import typing
from typing import Any

import torch

from policy.errors import kind_of
from policy.limits import (
    DIFFUSERS_ADJUSTMENT,
    MODEL_MAX,
    NAME_MAX,
    VERSION_MAX,
    adjustment_problem,
    blur_problem,
    name_problem,
    pixelate_problem,
)
from policy.schema import Severity
from policy.vocabulary import ACTIONS, FAIL_CLOSED, PLACEHOLDERS, VIEWS

SEVERITIES = typing.get_args(Severity)
# Rows are normalised by the compiler; a matrix cast to a half type keeps them within ~1e-3.
_UNIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_HALF_UNIT_TOLERANCE = 2e-2


def _n(count: int, word: str) -> str:
    plural = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{count} {word if count == 1 else plural}"


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Found:
    """Collects problems as one-line messages, each starting with the field it is about."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def text(self, field: str, value: Any, limit: int) -> None:
        if not isinstance(value, str):
            self.add(f"{field} must be a string, got {kind_of(value)}")
        elif not value.strip():
            self.add(f"{field} must not be empty")
        elif problem := name_problem(value, limit):
            self.add(f"{field} {problem}")

    def choice(self, field: str, value: Any, allowed: tuple[Any, ...]) -> None:
        if value not in allowed or isinstance(value, bool):
            self.add(f"{field} must be one of {_quoted(allowed)}, got {value!r}")

    def names(self, field: str, values: Any, count: int | None, what: str) -> bool:
        """A tuple of `count` storable names; False when it is not even a tuple of strings."""
        if not isinstance(values, tuple) or not all(isinstance(v, str) for v in values):
            self.add(f"{field} must be a list of strings")
            return False
        for i, value in enumerate(values):
            problem = "must not be empty" if not value.strip() else name_problem(value, NAME_MAX)
            if problem:
                self.add(f"{field}[{i}] {problem}")
                break
        if count is not None and len(values) != count:
            self.add(f"{field} has {_n(len(values), 'name')} for the {_n(count, 'row')} of {what}")
        return True

    def per_concept(self, field: str, values: Any, count: int, allowed: tuple[Any, ...]) -> None:
        if not isinstance(values, tuple):
            self.add(f"{field} must be a list, got {kind_of(values)}")
            return
        if len(values) != count:
            self.add(
                f"{field} has {_n(len(values), 'entry')} for the {_n(count, 'row')} of"
                " concept_matrix"
            )
        bad = next((i for i, v in enumerate(values) if v not in allowed), None)
        if bad is not None:
            self.add(f"{field}[{bad}] must be one of {_quoted(allowed)}, got {values[bad]!r}")


def _matrix(found: _Found, field: str, matrix: Any, names: tuple[str, ...]) -> int | None:
    """Check a [N, D] matrix of unit rows; its width D, or None when it is not a matrix."""
    if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point() or matrix.ndim != 2:
        shape = list(matrix.shape) if isinstance(matrix, torch.Tensor) else kind_of(matrix)
        found.add(f"{field} must be a 2-D floating-point tensor, got {shape}")
        return None
    if matrix.shape[0] and matrix.shape[1] and matrix.device.type != "meta":  # meta: no values
        values = matrix.detach().float()
        bad_rows = ~torch.isfinite(values).all(dim=1)  # [N]
        norms = values.norm(dim=1)  # [N]
        tolerance = _UNIT_TOLERANCE.get(matrix.dtype, _HALF_UNIT_TOLERANCE)
        not_unit = ~((norms - 1).abs() <= tolerance) & ~bad_rows
        for mask, what in ((bad_rows, "has NaN or infinite values"), (not_unit, "")):
            rows = torch.nonzero(mask).flatten()
            if rows.numel():
                row = int(rows[0])
                name = f" (concept {names[row]!r})" if row < len(names) else ""
                what = what or f"is not a unit vector (norm {float(norms[row]):.6g})"
                found.add(f"{field} row {row}{name} {what}")
    return int(matrix.shape[1])


def _thresholds(found: _Found, field: str, thresholds: Any, count: int, names: tuple) -> None:
    if not isinstance(thresholds, torch.Tensor) or not thresholds.is_floating_point():
        found.add(f"{field} must be a floating-point tensor, got {kind_of(thresholds)}")
        return
    if tuple(thresholds.shape) != (count,):
        found.add(f"{field} has shape {list(thresholds.shape)} for {_n(count, 'concept')}")
        return
    if thresholds.device.type == "meta":
        return
    values = thresholds.detach().float()
    outside = ~((values >= -1) & (values <= 1))  # NaN is outside too
    rows = torch.nonzero(outside).flatten()
    if rows.numel():
        row = int(rows[0])
        name = f" (concept {names[row]!r})" if row < len(names) else ""
        found.add(f"{field}[{row}]{name} must be between -1 and 1, got {float(values[row])}")


def _scalar(found: _Found, field: str, value: Any, check) -> None:
    """A finite number that `check` (value -> problem or None) accepts."""
    if not _number(value):
        found.add(f"{field} must be a number, got {kind_of(value)}")
    elif not math.isfinite(value):
        found.add(f"{field} must be a finite number, got {value}")
    elif problem := check(value):
        found.add(f"{field} {problem}")


def problems(policy: Any) -> list[str]:
    """Every rule a CompiledPolicy breaks, one line each (empty when it is usable)."""
    p, found = policy, _Found()
    found.text("name", p.name, NAME_MAX)
    found.text("version", p.version, VERSION_MAX)
    found.text("model", p.model, MODEL_MAX)
    dim = _matrix(found, "concept_matrix", p.concept_matrix, _tuple(p.concept_names))
    count = int(p.concept_matrix.shape[0]) if dim is not None else None
    if found.names("concept_names", p.concept_names, count, "concept_matrix") and count is not None:
        found.per_concept("actions", p.actions, count, ACTIONS)
        found.per_concept("severities", p.severities, count, SEVERITIES)
        if not isinstance(p.categories, tuple) or len(p.categories) != count:
            found.add(f"categories must be a list of {_n(count, 'entry')} (a name or null each)")
        elif any(c is not None and not isinstance(c, str) for c in p.categories):
            found.add("categories must hold names or null")
        _thresholds(found, "thresholds", p.thresholds, count, p.concept_names)
    special_dim = _matrix(found, "special_matrix", p.special_matrix, _tuple(p.special_names))
    special_count = int(p.special_matrix.shape[0]) if special_dim is not None else None
    if found.names("special_names", p.special_names, special_count, "special_matrix"):
        if special_count is not None:
            _thresholds(
                found, "special_thresholds", p.special_thresholds, special_count, p.special_names
            )
        everything = [*_tuple(p.concept_names), *p.special_names]
        if len(set(everything)) != len(everything):
            seen: set[str] = set()
            duplicate = next(n for n in everything if n in seen or seen.add(n))
            found.add(f"concept name {duplicate!r} is given twice")
    if dim is not None and special_dim is not None and special_count and dim != special_dim:
        found.add(f"special_matrix is {special_dim} wide but concept_matrix is {dim} wide")
    if dim == 0:
        found.add("concept_matrix must be at least 1 wide")
    _scalar(found, "adjustment", p.adjustment, adjustment_problem)
    found.choice("escalate", p.escalate, (None, *ACTIONS))
    _scalar(found, "review_band", p.review_band, _review_band_problem)
    if p.on_error == "allow":
        found.add(
            "on_error must not be 'allow': an image that could not be checked must not pass"
            " unchecked"
        )
    else:
        found.choice("on_error", p.on_error, FAIL_CLOSED)
    found.choice("compat", p.compat, (None, "diffusers"))
    found.choice("views", p.views, VIEWS)
    if p.compat == "diffusers":
        if p.views != "center":
            found.add(f"views must be 'center' when compat is 'diffusers', got {p.views!r}")
        if p.review_band != 0:
            found.add("review_band must be 0 when compat is 'diffusers'")
        if special_count and p.adjustment != DIFFUSERS_ADJUSTMENT:
            found.add(
                f"adjustment must be {DIFFUSERS_ADJUSTMENT} when compat is 'diffusers' (the"
                f" safety checker's own), got {p.adjustment}"
            )
    _scalar(found, "blur_radius", p.blur_radius, blur_problem)
    _scalar(found, "pixelate_block", p.pixelate_block, pixelate_problem)
    found.choice("review_placeholder", p.review_placeholder, PLACEHOLDERS)
    examples = p.example_sha256
    if not isinstance(examples, tuple) or not all(
        isinstance(e, str) and len(e.rpartition(":")[2]) == 64 for e in examples
    ):
        found.add("example_sha256 must be a list of 'CONCEPT:SHA256' strings")
    if not isinstance(p.source, str):
        found.add(f"source must be a string, got {kind_of(p.source)}")
    if not isinstance(p.digest, str):
        found.add(f"digest must be a string, got {kind_of(p.digest)}")
    return found.messages


def _tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else ()


def _review_band_problem(value: float) -> str | None:
    return None if 0 <= value < 0.5 else f"must be at least 0 and less than 0.5, got {value}"
