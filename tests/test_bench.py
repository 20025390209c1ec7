"""`moderation bench`: runs end to end on tiny widths and reports one documented JSON shape.

Benchmarks, not timed tests: nothing here asserts a speed.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moderation.bench.config import BenchConfig
from moderation.bench.models import BenchError
from moderation.bench.report import evaluate_targets, format_report
from moderation.bench.run import run_bench
from moderation.bench.tables import table

# Small enough for seconds on a CPU: tiny widths, 2 batch sizes, few concepts and decisions.
TINY_ARGS = [
    "bench",
    "--quick",
    "--size",
    "tiny",
    "--batch-sizes",
    "1,2",
    "--concepts",
    "17,300",
    "--concept-batch",
    "2",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--decisions",
    "300",
]

E2E_KEYS = {
    "batch",
    "forward_ms",
    "diffusers_ms",
    "diffusers_preprocess_ms",
    "forward_eager_ms",
    "ours_ms",
    "diffusers_x_forward",
    "ours_x_forward",
    "speedup",
    "flags_agree",
    "ours_stages_ms",
    "host_syncs",
    "timing",
}
CONCEPT_KEYS = {
    "concepts",
    "batch",
    "diffusers_ms",
    "ours_ms",
    "speedup",
    "ours_pct_of_forward",
    "diffusers_timed_images",
    "diffusers_scaled",
    "fired_per_image",
    "flags_agree",
    "timing",
}
LOGGING_KEYS = {
    "database",
    "url",
    "decisions",
    "seconds",
    "per_second",
    "rows",
    "spooled",
    "lost",
    "failed",
    "write_calls",
    "write_ms_mean",
    "transactions",
    "rows_per_transaction",
    "review_items",
    "embedding_dim",
}


def _invoke(args):
    import moderation.cli.bench_cmd  # noqa: F401 - registers `bench` where the CLI does not yet
    from moderation.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """One quick bench on tiny widths through the command line, with its JSON file."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = _invoke([*TINY_ARGS, "--out", str(path)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(path.read_text())


@pytest.mark.slow
def test_bench_prints_every_table_with_device_and_versions(tiny_result):
    output, data = tiny_result
    env = data["environment"]
    assert f"torch {env['torch']}" in output
    assert f"transformers {env['transformers']}" in output
    assert f"diffusers {env['diffusers']}" in output
    assert env["device_name"] in output and "dtype float32" in output
    assert "These are CPU numbers" in output
    for title in ("a+b. Bare vision forward", "b, ours by step", "c. After the encoder", "d. "):
        assert title in output
    assert "Targets" in output


@pytest.mark.slow
def test_bench_json_has_the_documented_shape(tiny_result):
    _, data = tiny_result
    assert data["schema"] == 1
    assert set(data) >= {
        "environment",
        "config",
        "model",
        "forward",
        "end_to_end",
        "concepts",
        "logging",
        "targets",
        "seconds",
    }
    assert data["config"]["batch_sizes"] == [1, 2]
    assert data["model"]["embed_dim"] == 32 and data["model"]["ours_attention"] == "sdpa"
    assert data["model"]["diffusers_attention"] in ("sdpa", "eager")
    assert [r["batch"] for r in data["forward"]] == [1, 2]
    for row in data["forward"]:
        assert row["ms"] > 0 and row["eager_ms"] > 0 and row["timing"]["repeats"] == 1
    for row in data["end_to_end"]:
        assert set(row) == E2E_KEYS
        assert row["ours_ms"] > 0 and row["diffusers_ms"] > 0
        assert row["ours_x_forward"] == pytest.approx(row["ours_ms"] / row["forward_ms"])
        assert set(row["ours_stages_ms"]) == {
            "to_image_batch",
            "clip_preprocess",
            "score_decide",
            "apply_actions",
            "to_caller",
        }
        assert row["host_syncs"] == {"diffusers": None, "ours": None}  # counted on CUDA only
        # Same weights, same semantics: both paths flag the same images.
        assert row["flags_agree"] == f"{row['batch']}/{row['batch']}"
    assert [r["concepts"] for r in data["concepts"]] == [17, 300]
    for row in data["concepts"]:
        assert set(row) == CONCEPT_KEYS
        assert row["batch"] == 2 and row["ours_pct_of_forward"] is not None
    (log,) = data["logging"]
    assert set(log) == LOGGING_KEYS
    assert log["database"].startswith("SQLite")
    assert (log["decisions"], log["rows"], log["lost"], log["failed"]) == (300, 300, 0, 0)
    assert log["embedding_dim"] == 32


@pytest.mark.slow
def test_bench_judges_this_runs_numbers_against_the_targets(tiny_result):
    """At these sizes: one end-to-end target per batch size and one logging target (the
    10,000-concept targets need that row), each met or not from the measured numbers."""
    output, data = tiny_result
    e2e, (log,) = data["end_to_end"], data["logging"]
    targets = data["targets"]
    assert [t["target"] for t in targets[:2]] == [
        "end to end, batch 1: ours <= 1.10x the bare forward",
        "end to end, batch 2: ours <= 1.10x the bare forward",
    ]
    for target, row in zip(targets[:2], e2e, strict=True):
        assert target["measured"] == f"{row['ours_x_forward']:.3f}x"
        assert target["met"] is (row["ours_x_forward"] <= 1.10)
    assert len(targets) == 4
    assert targets[3]["target"].startswith("shadowing 3 candidates, batch 8: <= 5% more")
    database = log["database"].split(" (")[0]
    assert targets[2]["target"] == f"logging to {database}: >= 5,000 decisions/s, 0 lost"
    assert targets[2]["measured"] == f"{log['per_second']:,.0f}/s, 0 lost"
    assert targets[2]["met"] is (log["per_second"] >= 5000)
    table = output[output.index("\nTargets\n") :].splitlines()
    for target in targets:
        (line,) = [line for line in table if line.startswith(target["target"])]
        word = "yes" if target["met"] else "NO"
        assert line.split() == f"{target['target']} {target['measured']} {word}".split()


def test_run_bench_sections_subset_without_a_model():
    config = BenchConfig.quick(
        size="tiny", sections=("concepts",), concepts=(5, 4000), concept_batch=3, repeats=1
    )
    config.loop_budget = 4000  # 4000 concepts: diffusers' loops timed on 1 of 3 images
    data = run_bench(config)
    assert data["model"] is None and data["end_to_end"] == [] and data["logging"] == []
    small, large = data["concepts"]
    assert not small["diffusers_scaled"]
    assert large["diffusers_scaled"] and large["diffusers_timed_images"] == 1
    assert large["ours_pct_of_forward"] is None  # no forward row at this batch
    assert "scaled x3" in format_report(data)


@pytest.mark.parametrize(
    ("fixture", "embed_dim"), [("tiny_checker_dir", 32), ("tiny_clip_dir", 32)]
)
def test_bench_loads_a_checker_or_clip_checkpoint(request, fixture, embed_dim):
    folder = request.getfixturevalue(fixture)
    config = BenchConfig.quick(
        model=str(folder), batch_sizes=(1,), sections=("e2e",), repeats=1, warmup=0
    )
    data = run_bench(config)
    assert data["model"]["id"] == str(folder) and data["model"]["embed_dim"] == embed_dim
    assert data["end_to_end"][0]["flags_agree"] == "1/1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sections", "e2e,gpu"], "--sections: unknown gpu"),
        (["--device", "cuda:0"], "CUDA is not available"),
        (["--model", "/no/such/model", "--sections", "e2e"], "no such folder"),
    ],
)
def test_bench_rejects_bad_settings_with_a_message(args, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _invoke(["bench", "--size", "tiny", *args])
    assert result.exit_code == 1
    assert message in result.output


def test_bench_batch_sizes_must_be_positive_integers():
    result = _invoke(["bench", "--batch-sizes", "1,x"])
    assert result.exit_code == 2
    assert "expected comma-separated integers" in result.output


def test_bench_help_lists_the_issue_options():
    result = _invoke(["bench", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--device", "--dtype", "--batch-sizes", "--concepts", "--repeats"):
        assert option in result.output
    for option in ("--db", "--decisions", "--out", "--json", "--quick"):
        assert option in result.output
    assert "--size" not in result.output  # test-only widths stay hidden


def test_targets_are_judged_from_the_numbers():
    result = {
        "concepts": [
            {"concepts": 17, "batch": 8, "speedup": 2.0, "ours_pct_of_forward": 1.0},
            {"concepts": 10_000, "batch": 8, "speedup": 120.0, "ours_pct_of_forward": 7.5},
        ],
        "end_to_end": [{"batch": 8, "ours_x_forward": 1.04}],
        "logging": [{"database": "SQLite 3.40 (temp file)", "per_second": 6000.0, "lost": 1}],
    }
    met = {t["target"]: t["met"] for t in evaluate_targets(result)}
    assert list(met.values()) == [True, False, True, False]  # 50x, 5%, 1.10x, logging
    assert any("10,000 concepts" in t for t in met)


def test_table_right_aligns_numbers():
    text = table(("name", "ms"), [("a", "1.5"), ("bb", "12.0")])
    assert text.splitlines() == ["name  ms", "----  ----", "a      1.5", "bb    12.0"]


def test_bench_error_is_a_moderation_error():
    from moderation.errors import ModerationError

    assert issubclass(BenchError, ModerationError)


@pytest.mark.postgres
@pytest.mark.slow
def test_bench_logs_to_postgresql_in_a_scratch_database(tmp_path, pg_server):
    path = tmp_path / "bench.json"
    args = ["bench", "--size", "tiny", "--sections", "logging", "--decisions", "500"]
    result = _invoke([*args, "--db", pg_server, "--out", str(path)])
    assert result.exit_code == 0, result.output
    (log,) = json.loads(path.read_text())["logging"]
    assert log["database"].startswith("PostgreSQL")
    assert (log["rows"], log["lost"]) == (500, 0)


def test_our_path_reads_no_scalar_per_image_where_diffusers_reads_one_per_concept():
    """On a GPU each scalar read (item, bool, nonzero) makes the host wait for the device.

    A CPU proxy for CUDA's sync debug mode (which the bench uses on a GPU): it sees scalar reads,
    not whole-tensor copies such as decide()'s one transfer per batch.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from moderation.bench.models import load_models
    from moderation.engine import Moderator

    SCALAR_READS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero"}

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).split(".")[1] in SCALAR_READS:
                self.count += 1
            return func(*args, **(kwargs or {}))

    models = load_models(model=None, size="tiny", device=torch.device("cpu"), dtype=torch.float32)
    moderator = Moderator(models.policy, models.encoder)
    ours, theirs = {}, {}
    with torch.inference_mode():
        for batch in (1, 4):
            images = torch.rand(batch, 3, 64, 64) * 2 - 1  # [B,3,H,W] in [-1,1]
            with ScalarReads() as reads:
                moderator.moderate(images, value_range="-1,1")
            ours[batch] = reads.count
            with ScalarReads() as reads:
                models.checker(images=images.clone(), clip_input=torch.randn(batch, 3, 224, 224))
            theirs[batch] = reads.count
    assert ours[1] == ours[4] <= 1  # per batch, not per image
    assert theirs[4] >= 4 * (17 + 3)  # one .item() per image and concept


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "banana",
            "--device 'banana': not a torch device (expected e.g. cpu, cuda, cuda:1 or mps)",
        ),
        ("meta", "--device meta: holds no data, so it cannot run a model"),
    ],
)
def test_bench_bad_device_is_one_line(device, message):
    result = CliRunner().invoke(_main(), ["bench", "--size", "tiny", "--device", device])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.strip().splitlines() == [f"Error: {message}"]


# On 2 CPU cores one ViT-L/14 image through a vision tower takes seconds (2-9 s measured while
# the machine was shared): this many keep `--quick` within the few minutes the README promises.
QUICK_TOWER_IMAGES = 16


def test_quick_sends_few_images_through_the_vision_towers(monkeypatch):
    """Images through our tower and diffusers' in `bench --quick` (its defaults, tiny widths).

    The first call of each of 4 paths, 2 rounds of those 4 at batch 1, and one embedding for the
    per-step row: 13. The earlier quick sizes (batches 1 and 4, one warm-up) sent 69.
    """
    import moderation.bench.models as bench_models

    images = []
    real_load = bench_models.load_models

    def load_and_count(**kwargs):
        models = real_load(**kwargs)
        for tower in (models.encoder.vision_model, models.checker.vision_model):
            tower.register_forward_hook(lambda _m, args, _out: images.append(len(args[0])))
        return models

    monkeypatch.setattr(bench_models, "load_models", load_and_count)
    result = _invoke(["bench", "--quick", "--size", "tiny", "--sections", "e2e"])
    assert result.exit_code == 0, result.output
    assert 0 < sum(images) <= QUICK_TOWER_IMAGES


def test_quick_help_says_what_it_runs_and_how_long():
    result = _invoke(["bench", "--help"])
    assert "--quick" in result.output
    help_text = " ".join(result.output.split())
    assert "Batch 1 only, 2 repeats" in help_text and "minutes on 2 CPU cores" in help_text


def _main():
    import moderation.cli.bench_cmd  # noqa: F401 - registers `bench`
    from moderation.cli import main

    return main
