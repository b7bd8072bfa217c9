"""The benchmark command (bench/run.py) at a few MiB: every row present, every output checked,
peers skipped (not run) when their predicted memory does not fit, a corrupted output caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
DENSE_STEPS = ["cp", "to_meg", "to_hf", "relayout", "peer_to_meg", "peer_to_hf", "peer_relayout"]
MOE_STEPS = ["cp", "peer_deepseek", "to_deepseek", "peer_bf16", "to_bf16"]


def run_bench(tmp_path, *args):
    r = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--workdir", str(tmp_path / "work"),
                        "--cache", "warm", "--settle", "0", "--json", str(tmp_path / "out.json"), *args],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "out.json") as f:
        return json.load(f), r


def test_suite_runs_checks_and_reports_every_row(tmp_path):
    info, r = run_bench(tmp_path, "--sizes", "8MiB", "--moe-size", "8MiB", "--ranks", "1",
                        "--markdown", str(tmp_path / "table.md"), "--plots", str(tmp_path / "plots"))
    rows = {(row["kind"], row["step"]): row for row in info["rows"]}
    assert sorted(rows) == sorted([("dense", s) for s in DENSE_STEPS] + [("moe_fp8", s) for s in MOE_STEPS])
    for (kind, step), row in rows.items():
        assert "skipped" not in row, (step, row.get("skipped"))
        assert [run["returncode"] for run in row["runs"]] == [0], step
        assert row["bytes_written"] > 0 and row["wall_s"] > 0 and row["cpu_s"] > 0, step
        assert row["peak_rss_anon_bytes"] > 0 and row["runs"][0]["status_samples"] > 0, step
        if step.startswith("peer_") and kind == "moe_fp8":
            continue  # judged through the pyconv step compared with its output
        assert row["check"]["ok"] is True, (step, row["check"])
    # The outputs that must match the reference algorithms did, by the strongest check available.
    assert rows[("moe_fp8", "to_deepseek")]["check"]["how"].startswith("byte-identical")
    assert "bitwise" in rows[("moe_fp8", "to_bf16")]["check"]["how"]
    for step in ("to_meg", "to_hf", "relayout"):
        assert rows[("dense", step)]["check"]["how"].startswith("pyconv verify (bitwise")
        assert rows[("dense", step)]["peer_speedup"] > 0
    # Ratios to cp use the cp of the same source; the peers' own processes hold the whole model.
    assert rows[("dense", "to_meg")]["ratio_to_cp"] == pytest.approx(
        rows[("dense", "to_meg")]["wall_s"] / rows[("dense", "cp")]["wall_s"])
    assert info["all_outputs_checked"] is True
    assert {t["step"] for t in info["targets"]} == {"to_meg", "to_hf", "relayout", "to_deepseek", "to_bf16"}
    assert info["loadavg1"] is not None and info["machine"]["cpus"] >= 1
    table, targets = (tmp_path / "table.md").read_text().split("\n\n", 1)
    assert table.count("\n") == 1 + len(rows)  # header, rule, one line per row
    assert "wall <= 1.25x cp" in targets and len(targets.split("\n\n")[0].splitlines()) == 2 + 5  # 5 pyconv rows
    assert sorted(os.listdir(tmp_path / "plots")) == ["memory_vs_size.png", "throughput_vs_size.png"]
    # Sources and outputs are removed after each size (the children's bytecode cache stays).
    assert os.listdir(tmp_path / "work") == ["pycache"]


def test_peers_that_do_not_fit_are_skipped_and_said_so(tmp_path):
    info, _ = run_bench(tmp_path, "--sizes", "8MiB", "--moe-size", "", "--ranks", "1", "--mem-margin-gib", "100000")
    rows = {row["step"]: row for row in info["rows"]}
    for step in ("peer_to_meg", "peer_to_hf", "peer_relayout"):
        assert rows[step]["skipped"].startswith("needs ~") and "wall_s" not in rows[step]
    assert rows["to_meg"]["peer_speedup"] is None and rows["to_meg"]["peer_skipped"].startswith("needs ~")
    assert rows["to_meg"]["check"]["ok"] is True


def test_checks_catch_a_changed_byte(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import run
    finally:
        sys.path.remove(BENCH)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x.bin").write_bytes(bytes(range(256)) * 16)
    assert run.same_files(str(a), str(b))["ok"] is True
    (b / "x.bin").write_bytes(bytes(range(256)) * 15 + bytes([1]) + bytes(range(1, 256)))
    assert run.same_files(str(a), str(b))["ok"] is False
    (b / "y.bin").write_bytes(b"")
    assert "file lists differ" in run.same_files(str(a), str(b))["error"]
