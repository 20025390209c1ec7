"""`moderation bench-serve` (issue 17): a small run of the service against in-process moderate."""

from __future__ import annotations

import pytest

from moderation.bench import serve


@pytest.mark.slow
def test_a_small_serve_bench_reports_every_row(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = serve.run_serve_bench("tiny", (1, 4), {1: 4, 4: 8}, progress=lambda _m: None)
    rows = {(r["path"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {("service", 1), ("service", 4), ("in-process", 1), ("in-process", 4)}
    assert rows[("service", 4)]["statuses"] == {200: 8}
    assert 1 <= rows[("service", 4)]["mean_batch"] <= 4
    assert all(r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in rows.values())
    table = serve.report(result)
    assert table.count("\n| service |") == 2 and "HTTP ceiling" in table
    assert [line.split(":")[0] for line in serve.summary(result)] == [
        "concurrency 1",
        "concurrency 4",
    ]


def test_bench_images_are_distinct_224_pngs():
    from io import BytesIO

    from PIL import Image

    images = serve.bench_images(3)
    assert len(set(images)) == 3
    assert all(Image.open(BytesIO(b)).size == (224, 224) for b in images)


def test_request_bodies_carry_each_png_as_a_data_url():
    import base64

    pngs = serve.bench_images(2)
    bodies = serve.request_bodies(pngs)
    urls = [body["input"][0]["image_url"]["url"] for body in bodies]
    assert [body["input"][0]["type"] for body in bodies] == ["image_url"] * 2
    assert all(url.startswith("data:image/png;base64,") for url in urls)
    assert [base64.b64decode(url.split(",", 1)[1]) for url in urls] == pngs
