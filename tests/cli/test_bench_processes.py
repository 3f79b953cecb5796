"""``moefx bench --processes N``: children's arguments, the summary over processes, and a real run."""

from __future__ import annotations

import json
import statistics

from moefx.cli.bench.processes import child_argv, speedups_by_shape, summarize
from tests.cli.helpers import moefx as run


def result(shape, impl, ms, dense_ms, skipped=None):
    return {"shape": shape, "impl": impl, "median_ms": ms, "skipped": skipped,
            "dense_over_impl": dense_ms / ms if ms else None}


def test_child_argv_drops_processes_and_json_in_both_spellings():
    argv = ["--shapes", "S2", "--processes", "3", "--json", "a.json", "--processes=4", "--json=b.json", "--repeats", "5"]
    assert child_argv(argv, "/tmp/x.json") == [
        "--shapes", "S2", "--repeats", "5", "--json", "/tmp/x.json", "--processes", "1"
    ]


def test_summary_takes_medians_over_processes_of_each_process_ratio():
    moefx_ms, hf_ms, dense_ms = [300.0, 400.0, 280.0], [600.0, 640.0, 500.0], [270.0, 250.0, 230.0]
    runs = [
        {"results": [result("S2", "moefx", m, d), result("S2", "hf_eager", h, d), result("S2", "dense", d, d)]}
        for m, h, d in zip(moefx_ms, hf_ms, dense_ms)
    ]
    rows = {r["impl"]: r for r in summarize(runs)}
    assert rows["moefx"]["median_ms"] == 300.0
    # the median of the paired (within-process) ratios, not the ratio of the medians
    assert rows["moefx"]["median_dense_over_impl"] == statistics.median(d / m for m, d in zip(moefx_ms, dense_ms))
    assert rows["moefx"]["median_dense_over_impl"] != statistics.median(dense_ms) / statistics.median(moefx_ms)
    assert speedups_by_shape(runs) == {"S2": {"hf_eager": statistics.median(h / m for m, h in zip(moefx_ms, hf_ms))}}


def test_summary_counts_an_impl_where_it_ran_and_keeps_the_reason_where_it_never_did():
    runs = [
        {"results": [result("S1", "hf_eager", None, 1.0, skipped="ImportError: x"), result("S1", "dense", 2.0, 2.0),
                     result("S1", "moefx_ref", None, 1.0, skipped="CPU")]},
        {"results": [result("S1", "hf_eager", 4.0, 2.0), result("S1", "dense", 2.0, 2.0),
                     result("S1", "moefx_ref", None, 1.0, skipped="CPU")]},
    ]
    rows = {r["impl"]: r for r in summarize(runs)}
    assert rows["hf_eager"]["ms"] == [4.0] and rows["hf_eager"]["median_dense_over_impl"] == 0.5
    assert rows["hf_eager"]["skipped"] is None
    assert rows["moefx_ref"]["median_ms"] is None and rows["moefx_ref"]["skipped"] == "CPU"


def test_bench_in_two_processes_reports_each_and_their_median(tmp_path):
    out = tmp_path / "bench.json"
    done = run(
        "bench", "--tokens", "64", "--d", "16", "--h", "8", "--experts", "4", "--top-k", "2",
        "--impls", "moefx", "dense", "--repeats", "2", "--warmup", "0", "--processes", "2", "--json", out, cwd=tmp_path,
    )
    assert done.code == 0, done.err
    assert "process 1/2:" in done.out and "process 2/2:" in done.out and "median over 2 processes" in done.out
    report = json.loads(out.read_text())
    assert len(report["processes"]) == 2
    each = [next(r for r in p["results"] if r["impl"] == "moefx") for p in report["processes"]]
    row = next(r for r in report["summary"] if r["impl"] == "moefx")
    assert row["ms"] == [e["median_ms"] for e in each]
    assert row["median_dense_over_impl"] == statistics.median(e["dense_over_impl"] for e in each)
