"""The decision rule, written once: from scores to the action, and the reason it was taken.

A concept fires when its score is above 0. The action of a scored image is the most severe
action (policy.schema.ACTION_RANK) among its fired concepts (allow when none fired), raised to
the policy's `escalate` by a special-care hit and to review by a concept scoring within the
review band below its threshold (`-band < score <= 0`). The margin is the highest concept score
and the top concept the first concept holding it. The reason (`action_reason`) names the rule
that set the action, in this order of precedence:

- "concept": a fired concept whose action is the image's; the highest-scoring such concept;
- "special_care": a special-care hit escalated the image to `escalate`;
- "review_band": a concept within the review band (the nearest such concept);
- "nothing_fired": nothing fired and nothing raised the action: allow;
- "error": the image could not be scored (set by the caller: the policy's `on_error`);
- "unknown": a logged row the logged policy cannot account for (never from live scores).

`apply` is one batched torch reduction over the columns of K policies at once (their concept
columns concatenated, `Rules.owner` naming each column's policy): the live policy (K = 1),
every shadow candidate in one pass, the backtest over logged cosines, and the explanation of a
logged row (`Rules.logged`) all decide through it. No host sync: the caller copies the named
fields it needs to the host in one transfer (moderation.host_columns.to_host).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from policy.vocabulary import ACTION_RANK

if TYPE_CHECKING:
    from policy.compiled import CompiledPolicy

REASONS = ("nothing_fired", "concept", "special_care", "review_band", "error", "unknown")
REASON_CODE = {name: i for i, name in enumerate(REASONS)}
REVIEW = ACTION_RANK["review"]


@dataclass(frozen=True, eq=False)
class Rules:
    """The rule parameters of K policies over their concatenated columns (on one device)."""

    ranks: torch.Tensor  # [C] uint8: the action rank of each concept column
    owner: torch.Tensor  # [C] int64: the policy of each concept column
    start: torch.Tensor  # [K] int64: each policy's first concept column
    special_owner: torch.Tensor  # [S] int64: the policy of each special-care column
    escalate: torch.Tensor  # [K] int64: the rank a special-care hit raises to (0: none)
    band: torch.Tensor  # [K] float32: the review band (0: none)
    neg_band: torch.Tensor  # [C] float32: -band of each column's policy (0: no band)

    @property
    def k(self) -> int:
        return int(self.escalate.shape[0])

    @classmethod
    def of(cls, policies: Sequence[CompiledPolicy], device: Any = None) -> Rules:
        """The rules of compiled policies, in order (device: the first policy's)."""
        device = policies[0].device if device is None else device
        ranks = torch.cat([p.action_ranks.to(device) for p in policies])
        return cls.build(
            ranks,
            [len(p.concept_names) for p in policies],
            [len(p.special_names) for p in policies],
            [p.escalate for p in policies],
            [p.review_band for p in policies],
            device,
        )

    @classmethod
    def logged(
        cls, actions: Sequence[str], n_special: int, escalate: str | None, band: float | None
    ) -> Rules:
        """The rules of one logged policy (a `policies` row's concept actions, on the CPU)."""
        ranks = torch.tensor([ACTION_RANK[a] for a in actions], dtype=torch.int64)
        return cls.build(ranks, [len(actions)], [n_special], [escalate], [band or 0.0], "cpu")

    @classmethod
    def build(
        cls,
        ranks: torch.Tensor,
        counts: Sequence[int],
        special_counts: Sequence[int],
        escalate: Sequence[str | None],
        bands: Sequence[float],
        device: Any,
    ) -> Rules:
        k = len(counts)
        index = torch.arange(k, device=device)
        counts_t = torch.tensor(list(counts), dtype=torch.int64, device=device)
        owner = torch.repeat_interleave(index, counts_t)
        band = torch.tensor([float(b or 0.0) for b in bands], dtype=torch.float32, device=device)
        return cls(
            ranks=ranks.to(device, torch.uint8),  # small: [B, C] rank columns stay small
            owner=owner,
            start=torch.cumsum(counts_t, 0) - counts_t,
            special_owner=torch.repeat_interleave(
                index, torch.tensor(list(special_counts), dtype=torch.int64, device=device)
            ),
            escalate=torch.tensor(
                [ACTION_RANK[e] if e else 0 for e in escalate], dtype=torch.int64, device=device
            ),
            band=band,
            neg_band=-band[owner],
        )


_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rules_of(policy: CompiledPolicy, device: Any = None) -> Rules:
    """One policy's Rules on `device` (default its own), built once per policy and device."""
    device = torch.device(policy.device if device is None else device)
    per_device = _RULES.setdefault(policy, {})
    found = per_device.get(device)
    if found is None:
        found = per_device[device] = Rules.of([policy], device)
    return found


class FiredScores:
    """Which concepts fired, said once for every holder of scores (`scoring.Scores`, `Outcome`):
    those whose score is above 0."""

    scores: torch.Tensor  # [B, C]
    special_scores: torch.Tensor  # [B, S]

    @property
    def fired(self) -> torch.Tensor:
        """[B, C] bool: concepts that fired."""
        return self.scores > 0

    @property
    def special_fired(self) -> torch.Tensor:
        """[B, S] bool: special-care concepts that fired."""
        return self.special_scores > 0


@dataclass(frozen=True, eq=False)
class Outcome(FiredScores):
    """What the rule concludes, per image and policy ([B, K]); per column on demand."""

    rules: Rules
    scores: torch.Tensor  # [B, C] the scores it was applied to
    special_scores: torch.Tensor  # [B, S]
    rank: torch.Tensor  # [B, K] int64: the action's rank (ACTIONS[rank])
    margin: torch.Tensor  # [B, K] float32: the highest concept score (-inf: no concepts)
    top: torch.Tensor  # [B, K] int64: the concept holding it, within its policy
    reason: torch.Tensor  # [B, K] int64: REASONS index
    reason_concept: torch.Tensor  # [B, K] int64: the concept named by the reason, or -1
    any_fired: torch.Tensor  # [B, K] bool
    hit: torch.Tensor  # [B, K] bool: a special-care concept fired

    @property
    def in_band(self) -> torch.Tensor:
        """[B, C] bool: concepts within the review band below their threshold."""
        return (self.scores > self.rules.neg_band) & (self.scores <= 0)


def segment_max(values: torch.Tensor, owner: torch.Tensor, k: int, empty: float) -> torch.Tensor:
    """[B, K]: per row, the maximum of `values` [B, C] over each policy's columns (`empty`
    where a policy has none). NaN wins, as in torch.max."""
    b, c = values.shape
    out = values.new_full((b, k), empty)
    if c == 0:
        return out
    if k == 1:  # one policy (the live one): a plain reduction, several times faster
        return (
            values.any(dim=1, keepdim=True)
            if values.dtype == torch.bool
            else (values.amax(dim=1, keepdim=True))
        )
    if values.dtype == torch.bool:
        return segment_max(values.to(torch.uint8), owner, k, int(empty)).bool()
    index = owner[None, :].expand(b, c)
    out = out.scatter_reduce(1, index, values, "amax", include_self=False)
    if values.is_floating_point():
        nan = torch.zeros(b, k, dtype=torch.bool, device=values.device).scatter_reduce(
            1, index, torch.isnan(values), "amax", include_self=True
        )
        out = torch.where(nan, torch.full_like(out, float("nan")), out)
    return out


def segment_first(holds: torch.Tensor, rules: Rules) -> torch.Tensor:
    """[B, K]: per row, the first column (within its policy) where `holds` [B, C]; -1: none."""
    b, c = holds.shape
    if c == 0:
        return torch.full((b, rules.k), -1, dtype=torch.int64, device=holds.device)
    if rules.k == 1:  # argmax gives the first maximal index
        first = holds.to(torch.uint8).argmax(dim=1, keepdim=True)
        return torch.where(holds.any(dim=1, keepdim=True), first, torch.full_like(first, -1))
    local = torch.arange(c, device=holds.device) - rules.start[rules.owner]  # [C]
    big = torch.full((b, c), c, dtype=torch.int64, device=holds.device)
    first = torch.full((b, rules.k), c, dtype=torch.int64, device=holds.device).scatter_reduce(
        1, rules.owner[None, :].expand(b, c), torch.where(holds, local[None, :], big), "amin"
    )
    return torch.where(first == c, torch.full_like(first, -1), first)


def special_hits(special_scores: torch.Tensor, rules: Rules) -> torch.Tensor:
    """[B, K] bool: which policies had a special-care concept fire (score > 0)."""
    fired = (special_scores > 0).to(torch.int64)
    return segment_max(fired, rules.special_owner, rules.k, 0).bool()


def per_column(x: torch.Tensor, rules: Rules) -> torch.Tensor:
    """A [B, K] value of each policy for each of its columns ([B, C]; [B, 1] when K is 1)."""
    return x if rules.k == 1 else x[:, rules.owner]


def segment_argmax(
    values: torch.Tensor, rules: Rules, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and policy ([B, K]): the maximum of `values` [B, C] over its columns (where
    `mask`), and the first column holding it, within the policy (-1: none)."""
    b, c = values.shape
    if mask is not None:
        values = values.masked_fill(~mask, -torch.inf)
    if c == 0:
        empty = values.new_full((b, rules.k), -torch.inf)
        return empty, torch.full((b, rules.k), -1, dtype=torch.int64, device=values.device)
    if rules.k == 1:  # torch.max gives the first maximal index
        best, at = values.max(dim=1, keepdim=True)
    else:
        best = segment_max(values, rules.owner, rules.k, -torch.inf)
        at = segment_first(values == best[:, rules.owner], rules)
    if mask is not None:
        at = torch.where(best > -torch.inf, at, torch.full_like(at, -1))
    return best, at


def apply(rules: Rules, scores: torch.Tensor, special_scores: torch.Tensor) -> Outcome:
    """The rule over K policies' concatenated scores [B, C] and special-care scores [B, S].

    A fixed number of device operations whatever K, B or C (two maxima with their index, a few
    elementwise passes over [B, C]); no host sync.
    """
    k, owner = rules.k, rules.owner
    fired = scores > 0  # [B, C]
    hit = special_hits(special_scores, rules)  # [B, K]
    zero = torch.zeros((), dtype=rules.ranks.dtype, device=scores.device)
    concept_rank = segment_max(torch.where(fired, rules.ranks, zero), owner, k, 0)  # [B, K]
    margin, top = segment_argmax(scores, rules)  # [B, K]
    any_fired = margin > 0  # [B, K]
    # The review band: a score in (-band, 0]. The highest score not above 0 tells whether any is.
    nearest = segment_max(scores.masked_fill(fired, -torch.inf), owner, k, -torch.inf)
    any_band = nearest > -rules.band  # [B, K] (no band: never, as nearest <= 0)
    rank = torch.maximum(concept_rank.long(), hit.long() * rules.escalate)
    rank = torch.maximum(rank, any_band.long() * REVIEW)  # [B, K]

    # The reason, by precedence. A concept sets the action when one of its action fired (the
    # highest-scoring such concept); the review band names the nearest concept within it. Fired
    # scores are above 0 and those in the band are not: one maximum finds either.
    winners = fired & (rules.ranks == per_column(rank, rules))  # [B, C]
    named = winners | ((scores > rules.neg_band) & ~fired)  # [B, C]
    best, chosen = segment_argmax(scores, rules, named)  # [B, K]
    by_concept = torch.where(best > 0, chosen, torch.full_like(chosen, -1))
    escalates = hit & (rules.escalate > 0) & (rules.escalate == rank)
    code = torch.full_like(rank, REASON_CODE["unknown"])
    code = torch.where((rank == 0) & ~any_fired, REASON_CODE["nothing_fired"], code)
    code = torch.where(any_band & (rank == REVIEW), REASON_CODE["review_band"], code)
    code = torch.where(escalates, REASON_CODE["special_care"], code)
    code = torch.where(by_concept >= 0, REASON_CODE["concept"], code)
    named_concept = (code == REASON_CODE["concept"]) | (code == REASON_CODE["review_band"])
    return Outcome(
        rules=rules,
        scores=scores,
        special_scores=special_scores,
        rank=rank,
        margin=margin,
        top=top.clamp(min=0),
        reason=code,
        reason_concept=torch.where(named_concept, chosen, torch.full_like(chosen, -1)),
        any_fired=any_fired,
        hit=hit,
    )


def reason_text(reason: str, concept: str | None, *, action: str, error: str | None = None) -> str:
    """One line for people: what set the action."""
    if reason == "concept":
        return f"concept {concept} (its action is {action})"
    if reason == "special_care":
        return f"special care escalation to {action}"
    if reason == "review_band":
        return f"review band (nearest: {concept})"
    if reason == "error":
        return f"the policy's on_error (the image could not be scored: {error or 'unknown'})"
    if reason == "nothing_fired":
        return "nothing fired"
    return "not explained by the logged policy"
