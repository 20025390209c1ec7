"""Parity: an imported safety checker flags, scores and blacks out exactly what diffusers does.

diffusers' own `StableDiffusionSafetyChecker.forward` is the reference; its per-image `result`
dicts (rounded scores) are captured from its frame as it returns. Batches are engineered from
measured cosines so that images fire only through the special-care adjustment, special-care
concepts fire only because an earlier one switched it on, and scores sit within a few ulps of the
3-decimal rounding edges (+-0.0005 and 0, with and without the adjustment).
"""

from __future__ import annotations

import copy
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
    cosine_distance,
)
from safetensors.torch import load_file

import moderation.scoring
from moderation.cli import main
from moderation.integrations.diffusers import PolicySafetyChecker
from moderation.scoring import score
from moderation.synthetic import build_safety_checker
from policy.compiled import CompiledPolicy
from policy.limits import DIFFUSERS_ADJUSTMENT

DIFFUSERS_FORWARD = StableDiffusionSafetyChecker.forward.__wrapped__.__code__
ULPS = range(-4, 5)  # threshold steps around each rounding edge


def run_diffusers(forward, clip_input, images):
    """Call diffusers' forward; return (images, flags, its per-image `result` dicts)."""
    captured = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is DIFFUSERS_FORWARD:
            captured["result"] = frame.f_locals["result"]

    sys.setprofile(profile)
    try:
        images, flags = forward(clip_input=clip_input, images=images)
    finally:
        sys.setprofile(None)
    return images, flags, captured["result"]


def bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def diffusers_rounded(result, key, count):
    """[B, count] float32 rounded scores from diffusers' result dicts."""
    return np.array([[r[key][j] for j in range(count)] for r in result], dtype=np.float32)


def diffusers_special_hits(result):
    """Indices of fired special-care concepts (diffusers stores each as a set {index, score})."""
    return [[next(v for v in s if isinstance(v, int)) for s in r["special_care"]] for r in result]


def same_scores(ours, theirs) -> bool:
    """Bit-for-bit (the sign of a rounded zero included)."""
    return ours.shape == theirs.shape and np.array_equal(bits(ours), bits(theirs))


# -- engineering thresholds from measured cosines -------------------------------------------------


def diffusers_score(cos: np.float32, threshold: np.float32, adjustment: float) -> np.float32:
    """diffusers' own expression, in NumPy, for one concept of one image."""
    return round(cos - threshold.item() + adjustment, 3)


def step(value: np.float32, ulps: int) -> np.float32:
    direction = np.float32(np.inf if ulps > 0 else -np.inf)
    for _ in range(abs(ulps)):
        value = np.nextafter(value, direction)
    return value


def at(d):
    """Threshold leaving cos - threshold close to d."""
    return lambda cos: np.float32(float(cos) - d)


def around(edge, adjustment, ulps):
    """Threshold `ulps` steps from where cos - threshold + adjustment meets the edge."""
    return lambda cos: step(np.float32(float(cos) - (edge - adjustment)), ulps)


def boundary(edge, adjustment, fire):
    """The threshold on one side of where diffusers' rounded score flips from 0.001 to 0."""

    def rule(cos):
        thresholds = [around(edge, adjustment, k)(cos) for k in range(-16, 17)]
        for low, high in zip(thresholds, thresholds[1:], strict=False):
            if diffusers_score(cos, low, adjustment) > 0 >= diffusers_score(cos, high, adjustment):
                return low if fire else high
        raise AssertionError("no rounding flip near the edge")

    return rule


# Each role adds (target image, label, threshold rule) rows to the concept and special lists.
def role_plain(t, concepts, special):
    pass


def role_special_only(t, concepts, special):
    special.append((t, "special fires", at(0.003)))
    concepts.append((t, "fires only with the adjustment", at(-0.004)))
    concepts += [(t, "adjusted +0.0005 edge", around(0.0005, 0.01, k)) for k in ULPS]
    concepts += [(t, "adjusted 0 edge", around(0.0, 0.01, k)) for k in ULPS]


def role_chain(t, concepts, special):
    special.append((t, "switches the adjustment on", at(0.002)))
    special.append((t, "fires only after an earlier hit", at(-0.006)))
    concepts.append((t, "below even with the adjustment", at(-0.012)))


def role_order(t, concepts, special):
    special.append((t, "before the first hit", at(-0.005)))
    special.append((t, "first hit", at(0.002)))
    concepts.append((t, "below", at(-0.02)))


def role_edges(t, concepts, special):
    for edge in (0.0005, -0.0005, 0.0):
        concepts += [(t, f"{edge} edge", around(edge, 0.0, k)) for k in ULPS]


def role_edge_off(t, concepts, special):
    concepts.append((t, "largest score rounding to 0", boundary(0.0005, 0.0, fire=False)))
    special.append((t, "largest score rounding to 0", boundary(0.0005, 0.0, fire=False)))


def role_edge_on(t, concepts, special):
    concepts.append((t, "smallest score rounding to 0.001", boundary(0.0005, 0.0, fire=True)))


def role_special_edge(t, concepts, special):
    # Rising scores: the first to round to 0.001 switches the adjustment on for those after it.
    special += [(t, "special +0.0005 edge", around(0.0005, 0.0, k)) for k in reversed(ULPS)]
    concepts.append((t, "fires with the adjustment", at(-0.005)))


ROLES = {
    "plain": (role_plain, False),
    "special-only": (role_special_only, True),
    "chain": (role_chain, False),
    "order": (role_order, False),
    "edges": (role_edges, True),
    "edge-off": (role_edge_off, False),
    "edge-on": (role_edge_on, True),
    "special-edge": (role_special_edge, True),
}


def engineer(checker, clip_input, roles):
    """Set the checker's concept rows and thresholds for these image roles; return the rows."""
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])  # [B, D]
    # Row t of `directions` has cosine ~0 with every image but t (random CLIP embeddings are
    # nearly parallel, so this is the pseudo-inverse, not the embedding itself).
    pinv = torch.linalg.pinv(F.normalize(embeds).double())  # [D, B]
    directions = (pinv / pinv.norm(dim=0)).T.float()  # [B, D]
    concepts, special = [], []
    for t, role in enumerate(roles):
        ROLES[role][0](t, concepts, special)

    def rows(specs):
        dim = directions.shape[1]
        matrix = torch.stack([directions[t] for t, _, _ in specs]) if specs else torch.zeros(0, dim)
        # Cosines exactly as diffusers' forward will compute them: same call, same shapes.
        cos = cosine_distance(embeds, matrix).numpy()  # [B, rows]
        thresholds = np.array([rule(cos[t, j]) for j, (t, _, rule) in enumerate(specs)], np.float32)
        others = cos - thresholds
        others[[t for t, _, _ in specs], range(len(specs))] = -1
        assert (others < -0.015).all(), "an engineered row reaches an image it does not target"
        return matrix, torch.from_numpy(thresholds.reshape(-1))

    concept_matrix, concept_thresholds = rows(concepts)
    special_matrix, special_thresholds = rows(special)
    checker.concept_embeds = torch.nn.Parameter(concept_matrix, requires_grad=False)
    checker.concept_embeds_weights = torch.nn.Parameter(concept_thresholds, requires_grad=False)
    checker.special_care_embeds = torch.nn.Parameter(special_matrix, requires_grad=False)
    checker.special_care_embeds_weights = torch.nn.Parameter(
        special_thresholds, requires_grad=False
    )
    return concepts, special


def check_engineering(roles, concepts, special, result, flags):
    """The batch really exercises what it claims to (judged by diffusers' own numbers)."""
    assert flags == [ROLES[r][1] for r in roles]
    scores = diffusers_rounded(result, "concept_scores", len(concepts))
    special_scores = diffusers_rounded(result, "special_scores", len(special))
    counts = {"concept edge rows": 0, "special edge rows": 0}

    def values(specs, table, label):
        return [(table[t, j], t) for j, (t, lab, _) in enumerate(specs) if lab == label]

    for label, expected in [
        ("0.0005 edge", {0.0, 0.001}),
        ("-0.0005 edge", {-0.0, -0.001}),
        ("adjusted +0.0005 edge", {0.0, 0.001}),
    ]:
        found = values(concepts, scores, label)
        if found:
            assert {float(v) for v, _ in found} == {float(np.float32(x)) for x in expected}, label
            counts["concept edge rows"] += len(found)
    for label in ("0.0 edge", "adjusted 0 edge"):
        found = values(concepts, scores, label)
        if found:  # both signed zeros
            assert len({int(bits(v)) for v, _ in found}) >= 2, label
            counts["concept edge rows"] += len(found)
    for label in ("largest score rounding to 0", "smallest score rounding to 0.001"):
        counts["concept edge rows"] += len(values(concepts, scores, label))
    found = values(special, special_scores, "special +0.0005 edge")
    if found:
        got = [v for v, _ in found]
        assert 0.0 in got and np.float32(0.001) in got and max(got) >= 0.01, got
        counts["special edge rows"] += len(found)
    for v, t in values(special, special_scores, "fires only after an earlier hit"):
        assert v > 0 and len(diffusers_special_hits(result)[t]) == 2
    for v, _ in values(special, special_scores, "before the first hit"):
        assert v <= 0
    return counts


# -- building our checker from the imported policy ------------------------------------------------


def compile_imported(policy_path) -> CompiledPolicy:
    """What compile_policy must produce from an imported YAML, built by hand from the file."""
    from moderation.integrations.sd_checker import CheckerTensors, checker_policy

    doc = yaml.safe_load(policy_path.read_text())
    tensors = load_file(policy_path.parent / doc["concepts"][0]["embedding"]["file"])

    def table(specs, name):
        rows = [c["embedding"]["row"] for c in specs]
        assert {c["embedding"]["tensor"] for c in specs} <= {name}
        matrix = tensors[name][rows] if rows else tensors[name][:0]
        return matrix, torch.tensor([c["threshold"] for c in specs], dtype=torch.float32)

    concept_rows, concept_thresholds = table(doc["concepts"], "concept_embeds")
    special_rows, special_thresholds = table(doc["special_care"]["concepts"], "special_care_embeds")
    assert doc["special_care"]["adjustment"] == DIFFUSERS_ADJUSTMENT
    raw = CheckerTensors(concept_rows, concept_thresholds, special_rows, special_thresholds, "yaml")
    return checker_policy(raw, name=doc["policy"], model=doc["model"])


def import_checker(checker, folder):
    checker.save_pretrained(folder / "checker")
    out = folder / "imported.yaml"
    result = CliRunner().invoke(
        main, ["policy", "import-sd-checker", str(folder / "checker"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


# The attention each route's vision tower runs with: diffusers' own from_pretrained gives a
# checker's tower SDPA (checked below), and ClipEncoder loads it the same way.
DIFFUSERS_ATTENTION = "sdpa"
CLIP_ENCODER_ATTENTION = "sdpa"


def our_checker(route, policy_path):
    """Ours from the written YAML: compiled by hand on diffusers' own loading of the tower, or
    through `from_policy` (load_policy, ClipEncoder, compile_policy)."""
    if route == "by hand":
        checker_dir = policy_path.parent / "checker"
        # diffusers' class hard-codes 17/3 concept rows; only its vision tower is used here.
        loaded = StableDiffusionSafetyChecker.from_pretrained(
            checker_dir, ignore_mismatched_sizes=True
        )
        return PolicySafetyChecker(compile_imported(policy_path), loaded)
    return PolicySafetyChecker.from_policy(policy_path, device="cpu")


def assert_parity(ours, reference, clip_input, images, concepts, special):
    """Same flags, same images (bitwise), same rounded scores as diffusers' forward."""
    theirs_images, theirs_flags, result = run_diffusers(
        reference.forward, clip_input, copy.deepcopy(images)
    )
    our_images, our_flags = ours(clip_input=clip_input, images=copy.deepcopy(images))
    assert our_flags == theirs_flags
    if torch.is_tensor(images):
        assert our_images.dtype == theirs_images.dtype and torch.equal(our_images, theirs_images)
    else:
        assert our_images.dtype == theirs_images.dtype
        assert np.array_equal(our_images, theirs_images)
    decisions = ours.last_decisions
    assert same_scores(
        np.stack([d.scores for d in decisions]),
        diffusers_rounded(result, "concept_scores", len(concepts)),
    )
    assert same_scores(
        np.stack([d.special_scores for d in decisions]),
        diffusers_rounded(result, "special_scores", len(special)),
    )
    assert [[int(n.rsplit("-", 1)[1]) for n in d.special_hits] for d in decisions] == (
        diffusers_special_hits(result)
    )
    assert [[int(n.rsplit("-", 1)[1]) for n in d.fired] for d in decisions] == [
        r["bad_concepts"] for r in result
    ]
    return theirs_flags, result


def parity_run(size, roles, tmp_path, *, numpy_images=True):
    """Engineer, save, import and compare, for each way of building ours; edge-row counts."""
    checker = build_safety_checker(size=size, seed=11)
    clip_input = torch.randn(len(roles), 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tensor_images = torch.rand(len(roles), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tensor_images = tensor_images * 2 - 1  # VAE output range
    counts = []
    for route, attention in (
        ("by hand", DIFFUSERS_ATTENTION),
        ("from_policy", CLIP_ENCODER_ATTENTION),
    ):
        checker.vision_model.set_attn_implementation(attention)
        concepts, special = engineer(checker, clip_input, roles)  # cosines depend on attention
        folder = tmp_path / route.replace(" ", "-")
        folder.mkdir()
        ours = our_checker(route, import_checker(checker, folder))
        assert ours.encoder.vision_model.config._attn_implementation == attention
        flags, result = assert_parity(ours, checker, clip_input, tensor_images, concepts, special)
        counts.append(check_engineering(roles, concepts, special, result, flags))
        if numpy_images:
            batch = tensor_images.permute(0, 2, 3, 1).numpy() * 0.5 + 0.5  # [B, H, W, 3]
            assert_parity(ours, checker, clip_input, batch, concepts, special)
    return counts


def test_diffusers_loads_the_vision_tower_with_sdpa(tiny_checker_dir):
    """A pipeline's checker runs its vision tower with SDPA (so the first route's reference does)."""
    loaded = StableDiffusionSafetyChecker.from_pretrained(tiny_checker_dir)
    assert loaded.vision_model.config._attn_implementation == DIFFUSERS_ATTENTION


def test_clip_encoder_embeds_like_diffusers(tiny_checker_dir):
    from moderation.encoder import ClipEncoder

    encoder = ClipEncoder.from_pretrained(tiny_checker_dir, device="cpu")
    loaded = StableDiffusionSafetyChecker.from_pretrained(tiny_checker_dir)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = loaded.visual_projection(loaded.vision_model(pixels)[1])
    assert torch.equal(encoder.encode_image(pixels), theirs)


def test_parity_tiny(tmp_path):
    counts = parity_run("tiny", list(ROLES), tmp_path)
    assert counts == [{"concept edge rows": 47, "special edge rows": 9}] * 2


@pytest.mark.slow
def test_parity_vit_l(tmp_path):
    start = time.perf_counter()
    roles = ["special-only", "chain", "edges", "special-edge"]
    counts = parity_run("vit-l", roles, tmp_path, numpy_images=False)
    assert counts == [{"concept edge rows": 45, "special edge rows": 9}] * 2
    print(f"vit-l parity: {time.perf_counter() - start:.1f}s")


# -- score() against diffusers' forward on arbitrary embeddings (no vision tower) -----------------


def fake_checker(concept_rows, concept_thresholds, special_rows, special_thresholds):
    """Just what diffusers' forward reads: embeddings go straight through the 'vision tower'."""
    return SimpleNamespace(
        vision_model=lambda x: (None, x),
        visual_projection=lambda x: x,
        concept_embeds=concept_rows,
        concept_embeds_weights=concept_thresholds,
        special_care_embeds=special_rows,
        special_care_embeds_weights=special_thresholds,
    )


def edge_thresholds(embeddings, rows, adjustments, seed):
    """Per row, a threshold a few ulps off a rounding edge of the image nearest that row."""
    rng = np.random.default_rng(seed)
    cos = cosine_distance(embeddings, rows).numpy()  # [B, R]
    thresholds = []
    for j in range(rows.shape[0]):
        i = int(cos[:, j].argmax())  # the other images score lower, mostly below the edges
        edge = rng.choice([0.0005, -0.0005, 0.0, 0.0015, rng.uniform(-0.02, 0.02)])
        adjustment = rng.choice(adjustments)
        thresholds.append(around(edge, adjustment, int(rng.integers(-3, 4)))(cos[i, j]))
    return torch.tensor(np.array(thresholds, np.float32))


def compiled_from_rows(concept_rows, concept_thresholds, special_rows, special_thresholds):
    from moderation.integrations.sd_checker import CheckerTensors, checker_policy

    raw = CheckerTensors(concept_rows, concept_thresholds, special_rows, special_thresholds, "t")
    return checker_policy(raw, name="t", model="t")


@pytest.mark.parametrize("seed", range(4))
def test_score_matches_diffusers_forward_on_many_edges(seed):
    g = torch.Generator().manual_seed(seed)
    batch, dim = 24, 16
    base = torch.randn(dim, generator=g)
    embeddings = base + 0.3 * torch.randn(batch, dim, generator=g)  # similar, like CLIP's
    concept_rows = torch.randn(60, dim, generator=g)
    special_rows = torch.randn(9, dim, generator=g)
    concept_thresholds = edge_thresholds(embeddings, concept_rows, [0.0, 0.01], seed)
    special_thresholds = edge_thresholds(embeddings, special_rows, [0.0, 0.01], seed + 100)
    reference = fake_checker(concept_rows, concept_thresholds, special_rows, special_thresholds)
    forward = StableDiffusionSafetyChecker.forward.__get__(reference)
    images = torch.rand(batch, 3, 8, 8, generator=g)
    theirs_images, flags, result = run_diffusers(forward, embeddings, images.clone())
    policy = compiled_from_rows(concept_rows, concept_thresholds, special_rows, special_thresholds)
    scores = score(policy, embeddings)
    assert same_scores(
        scores.scores.numpy(), diffusers_rounded(result, "concept_scores", concept_rows.shape[0])
    )
    assert same_scores(
        scores.special_scores.numpy(),
        diffusers_rounded(result, "special_scores", special_rows.shape[0]),
    )
    assert scores.special_hit.tolist() == [bool(r["special_care"]) for r in result]
    assert scores.fired.any(dim=1).tolist() == flags
    assert 0 < sum(flags) < batch  # both outcomes occur
    unrounded = scores.cosines - policy.thresholds + scores.adjustment[:, None]
    assert ((unrounded > 0) != scores.fired).sum() >= 3  # the rounding decides some outcomes
    ours = PolicySafetyChecker(policy, PassThrough())
    our_images, our_flags = ours(clip_input=embeddings, images=images.clone())
    assert our_flags == flags and torch.equal(our_images, theirs_images)


class PassThrough(torch.nn.Module):
    """An 'encoder' whose embeddings are its input."""

    def encode_image(self, pixel_values):
        return pixel_values


def test_empty_batch_and_no_special_care_match_diffusers():
    rows, thresholds = torch.randn(5, 8), torch.zeros(5)
    no_special = (torch.zeros(0, 8), torch.zeros(0))
    reference = fake_checker(rows, thresholds, *no_special)
    forward = StableDiffusionSafetyChecker.forward.__get__(reference)
    policy = compiled_from_rows(rows, thresholds, *no_special)
    for embeddings in (torch.randn(0, 8), torch.randn(6, 8)):
        images = torch.rand(embeddings.shape[0], 3, 4, 4)
        theirs, flags, result = run_diffusers(forward, embeddings, images.clone())
        ours, our_flags = PolicySafetyChecker(policy, PassThrough())(
            clip_input=embeddings, images=images.clone()
        )
        assert our_flags == flags and torch.equal(ours, theirs)
        assert same_scores(
            score(policy, embeddings).scores.numpy().reshape(-1, 5),
            diffusers_rounded(result, "concept_scores", 5).reshape(-1, 5),
        )


def test_numpy_1_arithmetic(monkeypatch):
    """Under NumPy 1, diffusers' `float32 - float` was float64: scored (and rounded) in float64."""
    monkeypatch.setattr(moderation.scoring, "diffusers_arithmetic_dtype", lambda: torch.float64)
    g = torch.Generator().manual_seed(7)
    embeddings = torch.randn(12, 16, generator=g)
    rows, special_rows = torch.randn(40, 16, generator=g), torch.randn(5, 16, generator=g)
    thresholds = edge_thresholds(embeddings, rows, [0.0, 0.01], 1)
    special_thresholds = edge_thresholds(embeddings, special_rows, [0.0, 0.01], 2)
    policy = compiled_from_rows(rows, thresholds, special_rows, special_thresholds)
    scores = score(policy, embeddings)
    cos = cosine_distance(embeddings, rows).numpy().astype(np.float64)
    special_cos = cosine_distance(embeddings, special_rows).numpy().astype(np.float64)
    for i in range(12):  # diffusers' loops with NumPy 1's float64 promotion spelled out
        adjustment = 0.0
        for j in range(5):
            s = np.round(special_cos[i, j] - special_thresholds[j].item() + adjustment, 3)
            assert np.float32(s) == scores.special_scores[i, j].item()
            if s > 0:
                adjustment = 0.01
        for j in range(40):
            s = np.round(cos[i, j] - thresholds[j].item() + adjustment, 3)
            assert (s > 0) == bool(scores.fired[i, j])
            assert np.float32(s) == scores.scores[i, j].item()


# NumPy's float32 arithmetic, not float64 (NumPy 1), Python's decimal round() or another order of
# operations: each of these flips the outcome of some score, which these thresholds are built on.
ALTERNATIVES = {
    "float64": lambda cos, thr, adj: np.round(np.float64(cos) - thr.item() + adj, 3),
    "python round": lambda cos, thr, adj: round(float(cos) - thr.item() + adj, 3),
    "reordered": lambda cos, thr, adj: np.round(cos - (thr - np.float32(adj)), 3),
}


def trap(cos, adjustment, edge, prefer):
    """A threshold where diffusers' outcome (fires or not) differs from an alternative's."""
    fallback = None
    for k in range(-64, 65):
        threshold = around(edge, adjustment, k)(cos)
        fires = diffusers_score(cos, threshold, adjustment) > 0
        flips = [n for n, f in ALTERNATIVES.items() if (f(cos, threshold, adjustment) > 0) != fires]
        if prefer in flips:
            return threshold, flips
        if flips and fallback is None:
            fallback = threshold, flips
    return fallback


def test_float32_arithmetic_traps():
    g = torch.Generator().manual_seed(0)
    batch, dim = 8, 16
    embeddings = torch.randn(batch, dim, generator=g)
    unit = F.normalize(embeddings)
    adjusted = [i % 2 == 0 for i in range(batch)]  # even images get a special-care hit
    signs = torch.tensor([1.0 if a else -1.0 for a in adjusted], dtype=torch.float64)

    pinv = torch.linalg.pinv(unit.double())  # [D, B]

    def near_orthogonal(i, away=()):
        """A row with a tiny cosine with image i (so its thresholds have fine ulps), negative
        with the images in `away`, random otherwise."""
        w = torch.randn(dim, generator=g, dtype=torch.float64)
        dots = unit.double() @ w
        dots[i] = (torch.rand(1, generator=g).item() - 0.5) * 0.006 * w.norm()
        dots[list(away)] = -w.norm()
        return (w + pinv @ (dots - unit.double() @ w)).float()

    concept_rows = torch.stack([near_orthogonal(j % batch) for j in range(96)])
    odd = range(1, batch, 2)
    adjusted_rows = torch.stack([near_orthogonal(2 * (j % 4), odd) for j in range(16)])
    special_rows = torch.cat([(pinv @ signs).float()[None], adjusted_rows])
    counts = dict.fromkeys(ALTERNATIVES, 0)

    def thresholds_for(rows, targets, adjustments):
        cos = cosine_distance(embeddings, rows).numpy()  # the shapes diffusers will use
        out = []
        for j, (i, adj) in enumerate(zip(targets, adjustments, strict=True)):
            found = trap(cos[i, j], adj, 0.0005, list(ALTERNATIVES)[j % 3])
            if found is None:
                out.append(np.float32(cos[i, j]))
                continue
            out.append(found[0])
            for name in found[1]:
                counts[name] += 1
        return torch.tensor(np.array(out, np.float32))

    targets = [j % batch for j in range(96)]
    concept_thresholds = thresholds_for(
        concept_rows, targets, [0.01 if adjusted[i] else 0.0 for i in targets]
    )
    special_thresholds = thresholds_for(
        special_rows, [0] + [2 * (j % 4) for j in range(16)], [0.0] + [0.01] * 16
    )
    special_thresholds[0] = 0.0  # the switch: fires for the even images only
    print("flag traps per alternative:", counts)
    assert all(v >= 5 for v in counts.values()), counts

    reference = fake_checker(concept_rows, concept_thresholds, special_rows, special_thresholds)
    forward = StableDiffusionSafetyChecker.forward.__get__(reference)
    images = torch.rand(batch, 3, 4, 4, generator=g)
    theirs, flags, result = run_diffusers(forward, embeddings, images.clone())
    assert [bool(r["special_care"]) for r in result] == adjusted
    policy = compiled_from_rows(concept_rows, concept_thresholds, special_rows, special_thresholds)
    scores = score(policy, embeddings)
    assert same_scores(scores.scores.numpy(), diffusers_rounded(result, "concept_scores", 96))
    assert same_scores(
        scores.special_scores.numpy(), diffusers_rounded(result, "special_scores", 17)
    )
    ours, our_flags = PolicySafetyChecker(policy, PassThrough())(
        clip_input=embeddings, images=images.clone()
    )
    assert our_flags == flags and torch.equal(ours, theirs)


def test_from_a_compiled_artifact(tiny_checker_dir, tmp_path):
    """from_policy also takes what `policy compile` writes, and decides the same."""
    from moderation.encoder import ClipEncoder
    from policy.compiler import compile_policy
    from policy.loader import load_policy

    policy_path = tmp_path / "sd.yaml"
    result = CliRunner().invoke(
        main, ["policy", "import-sd-checker", str(tiny_checker_dir), "--out", str(policy_path)]
    )
    assert result.exit_code == 0, result.output
    source = load_policy(policy_path)
    compiled = compile_policy(
        source, ClipEncoder.from_pretrained(source.resolved_model, device="cpu")
    )
    artifact = compiled.save(tmp_path / "sd.compiled.safetensors")
    from_yaml = PolicySafetyChecker.from_policy(policy_path, device="cpu")
    from_artifact = PolicySafetyChecker.from_policy(artifact, device="cpu")
    assert from_artifact.policy.digest == from_yaml.policy.digest == compiled.digest
    assert from_artifact.policy.compat == "diffusers"
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    outputs = [
        c(clip_input=pixels, images=torch.zeros(4, 3, 8, 8)) for c in (from_yaml, from_artifact)
    ]
    assert outputs[0][1] == outputs[1][1]
    assert same_scores(
        np.stack([d.scores for d in from_yaml.last_decisions]),
        np.stack([d.scores for d in from_artifact.last_decisions]),
    )
