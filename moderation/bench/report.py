"""The tables `moderation bench` prints, and the issue's targets checked against its numbers."""

from __future__ import annotations

from typing import Any

from moderation.bench.pipelines import pipelines_table, pipelines_targets
from moderation.bench.quick import quick_misses
from moderation.bench.tables import ms, table, times

# The targets (knobs: change them here and in BENCHMARKS.md together).
CONCEPTS_TARGET_N = 10_000
CONCEPTS_MIN_SPEEDUP = 50.0
CONCEPTS_MAX_PCT_OF_FORWARD = 5.0
E2E_MAX_X_FORWARD = 1.10
LOG_MIN_PER_SECOND = 5_000.0
SHADOW_MAX_OVERHEAD_PCT = 5.0  # 3 candidates on the post-encoder work of a batch of 8
BACKTEST_MIN_PER_SECOND = 50_000.0
BACKTEST_MAX_RSS_GROWTH_MB = 500.0


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target with the measured value and whether it is met."""
    targets: list[dict[str, Any]] = []
    for row in result["concepts"]:
        if row["concepts"] != CONCEPTS_TARGET_N:
            continue
        targets.append(
            {
                "target": f"after the encoder, {row['concepts']:,} concepts, batch {row['batch']}: "
                f"ours >= {CONCEPTS_MIN_SPEEDUP:.0f}x faster than diffusers' loops",
                "measured": f"{row['speedup']:.0f}x",
                "met": row["speedup"] >= CONCEPTS_MIN_SPEEDUP,
            }
        )
        pct = row["ours_pct_of_forward"]
        targets.append(
            {
                "target": f"after the encoder, {row['concepts']:,} concepts, batch {row['batch']}: "
                f"ours <= {CONCEPTS_MAX_PCT_OF_FORWARD:.0f}% of the bare forward",
                "measured": "not measured (no forward row at this batch)"
                if pct is None
                else f"{pct:.2f}%",
                "met": None if pct is None else pct <= CONCEPTS_MAX_PCT_OF_FORWARD,
            }
        )
    for row in result["end_to_end"]:
        targets.append(
            {
                "target": f"end to end, batch {row['batch']}: ours <= {E2E_MAX_X_FORWARD:.2f}x "
                "the bare forward",
                "measured": f"{row['ours_x_forward']:.3f}x",
                "met": row["ours_x_forward"] <= E2E_MAX_X_FORWARD,
            }
        )
    for row in result["logging"]:
        targets.append(
            {
                "target": f"logging to {row['database'].split(' (')[0]}: "
                f">= {LOG_MIN_PER_SECOND:,.0f} decisions/s, 0 lost",
                "measured": f"{row['per_second']:,.0f}/s, {row['lost']} lost",
                "met": row["per_second"] >= LOG_MIN_PER_SECOND and row["lost"] == 0,
            }
        )
    for row in result.get("shadow") or []:
        targets.append(
            {
                "target": f"shadowing {row['candidates']} candidates, batch {row['batch']}: "
                f"<= {SHADOW_MAX_OVERHEAD_PCT:.0f}% more post-encoder work",
                "measured": f"{row['overhead_pct']:+.1f}%",
                "met": row["overhead_pct"] <= SHADOW_MAX_OVERHEAD_PCT,
            }
        )
    if result.get("backtest"):
        targets += backtest_targets(result["backtest"])
    targets += pipelines_targets(result.get("pipelines") or [])
    return targets


def format_report(result: dict[str, Any]) -> str:
    """The whole report as printed: environment, tables a-f, targets."""
    env, cfg, model = result["environment"], result["config"], result["model"]
    threads = f"{env['cpu_count']} cores, {env['torch_threads']} torch threads"
    lines = [
        f"moderation bench: {env['device_name']} ({threads}) | dtype {env['dtype']} | "
        f"torch {env['torch']} | transformers {env['transformers']} | "
        f"diffusers {env['diffusers']} | python {env['python']}",
    ]
    if env["device"].startswith("cpu"):
        lines.append("These are CPU numbers (no GPU in this run).")
    start, end = env.get("load_average_start"), env.get("load_average_end")
    if start and end:
        # On a shared machine other processes slow the timed calls down unevenly.
        lines.append(
            f"load average (1/5/15 min) at start {'/'.join(map(str, start))}, at end "
            f"{'/'.join(map(str, end))} (this run's own threads included), {env['cpu_count']} cores"
        )
    if model:
        lines.append(
            f"model: {model['description']}; ours: ClipEncoder with {model['ours_attention']} "
            f"attention{', torch.compile' if model['compiled'] else ''}; diffusers: "
            f"StableDiffusionSafetyChecker as its pipeline loads it ({model['diffusers_attention']} "
            f"attention), {model['feature_extractor']}"
        )
    e2e_repeats = cfg["e2e_repeats"] or cfg["repeats"]
    rounds = f"{e2e_repeats} round(s)"
    if cfg.get("e2e_seconds"):
        rounds = f"at least {e2e_repeats} round(s) and {cfg['e2e_seconds']:g} s per batch size"
    lines.append(
        f"timing: medians; forward and end to end: {rounds}, interleaved, after "
        f"{cfg['warmup']} warm-up call(s) (and one first call of each path); our steps "
        f"and section c: at least {cfg['repeats']} repeats and {cfg['fast_seconds']:g} s per "
        "row; device synchronised around every call"
    )
    if result["end_to_end"]:
        lines += ["", _e2e_table(result["end_to_end"])]
    if result["end_to_end"] and result["end_to_end"][0].get("ours_stages_ms"):
        lines += ["", _stages_table(result["end_to_end"])]
    if result["concepts"]:
        lines += ["", _concepts_table(result["concepts"])]
    if result["logging"]:
        lines += ["", _logging_table(result["logging"], cfg)]
    if result.get("views"):
        lines += ["", views_table(result["views"])]
    if result.get("shadow"):
        lines += ["", shadow_table(result["shadow"])]
    if result.get("backtest"):
        lines += ["", backtest_table(result["backtest"])]
    lines += ["", pipelines_table(result["pipelines"])] if result.get("pipelines") else []
    if result.get("targets"):
        rows = [
            (t["target"], t["measured"], {True: "yes", False: "NO", None: "-"}[t["met"]])
            for t in result["targets"]
        ]
        lines += ["", "Targets", table(("target", "measured", "met"), rows)]
        lines += quick_misses(result)
    return "\n".join(lines)


def _e2e_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "a+b. Bare vision forward (the floor: our tower; 'eager': the same weights with eager "
        "attention) and end to end from the VAE's [B,3,512,512] tensor in "
        "[-1,1], ms; 'x forward' = / the floor"
    )
    body = [
        (
            r["batch"],
            ms(r["forward_ms"]),
            ms(r["forward_eager_ms"]),
            ms(r["diffusers_ms"]),
            ms(r["diffusers_preprocess_ms"]),
            times(r["diffusers_x_forward"]),
            ms(r["ours_ms"]),
            times(r["ours_x_forward"]),
            times(r["speedup"]),
            r["flags_agree"],
        )
        for r in rows
    ]
    headers = (
        "batch",
        "forward",
        "eager forward",
        "diffusers",
        "of which PIL+processor",
        "x forward",
        "ours",
        "x forward",
        "diffusers/ours",
        "flags agree",
    )
    return head + "\n" + table(headers, body)


def _stages_table(rows: list[dict[str, Any]]) -> str:
    head = "b, ours by step (each timed on its own; the encoder's share is the forward above), ms"
    names = ("to_image_batch", "clip_preprocess", "score_decide", "apply_actions", "to_caller")
    body = []
    for r in rows:
        stages = r["ours_stages_ms"]
        outside = sum(stages[n] for n in names)
        body.append(
            (
                r["batch"],
                *(ms(stages[n]) for n in names),
                ms(outside),
                f"{100 * outside / r['forward_ms']:.1f}%",
            )
        )
    headers = ("batch", *names, "all but the encoder", "% of forward")
    if rows[0].get("host_syncs", {}).get("ours") is not None:
        headers += ("host syncs: diffusers", "ours")
        body = [
            (*line, r["host_syncs"]["diffusers"], r["host_syncs"]["ours"])
            for line, r in zip(body, rows, strict=True)
        ]
    return head + "\n" + table(headers, body)


def _concepts_table(rows: list[dict[str, Any]]) -> str:
    batch = rows[0]["batch"]
    head = (
        f"c. After the encoder, batch {batch}: diffusers' forward after image_embeds vs ours "
        "(score + decide + host transfer, until Decision objects exist), ms"
    )
    body = []
    for r in rows:
        note = ""
        if r["diffusers_scaled"]:
            note = (
                f"diffusers timed on {r['diffusers_timed_images']} of {r['batch']} images, "
                f"scaled x{r['batch'] / r['diffusers_timed_images']:g}"
            )
        pct = r["ours_pct_of_forward"]
        body.append(
            (
                f"{r['concepts']:,}",
                ms(r["diffusers_ms"]),
                ms(r["ours_ms"]),
                times(r["speedup"]),
                "-" if pct is None else f"{pct:.3f}%",
                f"{r['fired_per_image']:.1f}",
                r["flags_agree"],
                note,
            )
        )
    headers = (
        "concepts",
        "diffusers",
        "ours",
        "speed-up",
        "ours % of forward",
        "fired/image",
        "flags agree",
        "note",
    )
    return head + "\n" + table(headers, body)


def _logging_table(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    head = (
        f"d. Decision logging through BackgroundDecisionLog: {rows[0]['decisions']:,} decisions "
        f"in writes of {cfg['write_size']}, float16 embeddings [{rows[0]['embedding_dim']}], "
        f"{rows[0]['review_items']:,} review items"
    )
    body = [
        (
            r["database"],
            f"{r['seconds']:.2f}",
            f"{r['per_second']:,.0f}",
            f"{r['rows']:,}",
            r["spooled"],
            r["lost"],
            f"{r['rows_per_transaction']:.0f}",
            f"{r['write_ms_mean']:.3f}",
        )
        for r in rows
    ]
    headers = (
        "database",
        "seconds",
        "decisions/s",
        "rows",
        "spooled",
        "lost",
        "rows/transaction",
        "write() mean ms",
    )
    return head + "\n" + table(headers, body)


def views_table(rows: list[dict[str, Any]]) -> str:
    """Section e as printed: views per image and ms per image for each mode."""
    modes = list(rows[0]["ms_per_image"])
    head = (
        f"e. Coverage: views per image and ms per image (end to end, batch {rows[0]['batch']}) "
        "of CLIP's centre crop ('center', what diffusers sees), 'cover' (every pixel, the "
        "default) and 'tiles'; 'x center' = / the centre crop"
    )
    body = []
    for r in rows:
        line = [r["aspect"], f"{r['width']}x{r['height']}"]
        line += [r["views_per_image"][m] for m in ("center", "cover", "tiles")]
        for m in modes:
            line.append(ms(r["ms_per_image"][m]))
            if m != "center" and r["x_center"][m] is not None:
                line.append(times(r["x_center"][m]))
        body.append(line)
    headers = ["aspect", "size", "views: center", "cover", "tiles"]
    for m in modes:
        headers.append(f"ms/image {m}")
        if m != "center" and "center" in modes:
            headers.append("x center")
    return head + "\n" + table(headers, body)


def shadow_table(rows: list[dict[str, Any]]) -> str:
    """Section f as printed."""
    first = rows[0]
    title = (
        f"f. Shadow candidates: post-encoder work of a batch of {first['batch']} "
        f"({first['image_side']}x{first['image_side']}, {first['views']} views; the default "
        f"policy's {first['concepts']}+{first['special_concepts']} concepts; score, decide, hash, "
        "act, records to the log, images back), without and with candidates; medians of "
        f"{first['timing']['plain']['repeats']} interleaved rounds, each call after a 64 MB "
        "cache sweep; 'paired': median of the per-round differences"
    )
    body = [
        (
            r["candidates"],
            ms(r["plain_ms"]),
            ms(r["shadow_ms"]),
            f"{r['overhead_pct']:+.1f}%",
            f"{r['overhead_pct_of_medians']:+.1f}%",
            ms(r["decide_plain_ms"]),
            ms(r["decide_shadow_ms"]),
            f"{r['decide_overhead_pct']:+.0f}%",
        )
        for r in rows
    ]
    headers = (
        "candidates",
        "post-encoder",
        "shadowed",
        "overhead (paired)",
        "(of medians)",
        "decide",
        "shadowed",
        "overhead",
    )
    cpu = "; ".join(
        f"{r['candidates']} candidates: {r['cpu_overhead_pct']:+.1f}% ({r['torch_threads']} torch "
        "thread(s))"
        for r in rows
    )
    note = f"this thread's CPU time of the same calls (paired): {cpu}"
    return title + "\n" + table(headers, body) + "\n" + note


def backtest_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"g. policy backtest of a {rows[0]['concepts']}-concept candidate over logged decisions "
        f"(float16 embeddings [{rows[0]['embedding_dim']}], 10% two views), each in a fresh "
        "process; 'thresholds': every cosine the logged one, 'new concepts': every cosine from "
        "the embeddings; memory: peak RSS growth during the run"
    )
    body = [
        (
            r["database"],
            f"{r['decisions']:,}",
            r["candidate"],
            f"{r['seconds']:.2f}",
            f"{r['per_second']:,.0f}",
            f"{r['peak_rss_growth_mb']:.0f}",
            f"{r['changed']:,}",
        )
        for r in rows
    ]
    headers = (
        "database",
        "decisions",
        "candidate",
        "seconds",
        "decisions/s",
        "peak RSS +MB",
        "changed",
    )
    return head + "\n" + table(headers, body)


def backtest_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        met = (
            r["per_second"] >= BACKTEST_MIN_PER_SECOND
            and r["peak_rss_growth_mb"] < BACKTEST_MAX_RSS_GROWTH_MB
        )
        out.append(
            {
                "target": f"backtest ({r['candidate']}) of {r['decisions']:,} decisions from "
                f"{r['database'].split(' (')[0]}: >= {BACKTEST_MIN_PER_SECOND:,.0f}/s, "
                f"< {BACKTEST_MAX_RSS_GROWTH_MB:.0f} MB peak RSS growth",
                "measured": f"{r['per_second']:,.0f}/s, {r['peak_rss_growth_mb']:.0f} MB",
                "met": met,
            }
        )
    return out
