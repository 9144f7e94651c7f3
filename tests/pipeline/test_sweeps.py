"""Sweep summary: every multirun ends with summary.csv / summary.md, one row per job, failed jobs
recorded with their reason while the rest of the sweep goes on."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest

from compress_run.pipeline.plots import pareto_front
from compress_run.pipeline.sweeps import write_summary
from tests.conftest import REPO, cli_path, run_cli

FAST = ["debug=smoke", "dataset=digits", "logger=none", "evaluate.measure_latency=false"]


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # a multi-run integration test: CI runs it in its slow set (Makefile CI_SLOW_TESTS)
def test_methods_by_sparsity_sweep_writes_six_rows(tmp_path):
    proc = run_cli(["-m", "method=magnitude,gmp,gap", "method.sparsity=0.5,0.9", *FAST, "output_dir=sweep"],
                   tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "sweep" / "summary.csv")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert [r["job"] for r in rows] == [str(i) for i in range(6)]
    assert {" ".join(r["overrides"].split()[:2]) for r in rows} == {
        f"method={m} method.sparsity={s}" for m in ("magnitude", "gmp", "gap") for s in ("0.5", "0.9")}
    assert all(abs(float(r["model/prunable_sparsity"]) - float(
        r["overrides"].split("method.sparsity=")[1].split()[0])) < 0.01 for r in rows)
    assert "6 ok, 0 failed" in (tmp_path / "sweep" / "summary.md").read_text()
    assert {r["method"] for r in rows} == {"magnitude", "gmp", "gap"}

    # the Pareto figure and the per-layer chart are drawn from this real (tiny) sweep
    script = [sys.executable, str(REPO / "scripts" / "plot_pareto.py")]
    subprocess.run([*script, str(tmp_path / "sweep"), "--out", str(tmp_path / "fig" / "pareto")], check=True,
                   capture_output=True, text=True, timeout=300)
    png = tmp_path / "fig" / "pareto.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = _rows(tmp_path / "fig" / "pareto.csv")
    assert len(points) == 6 and any(p["pareto_macs"] == "True" for p in points)
    subprocess.run([*script, "--layers", str(tmp_path / "sweep" / "0" / "results.json"), "--out",
                    str(tmp_path / "fig" / "layers")], check=True, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "fig" / "layers.png").stat().st_size > 10_000


@pytest.mark.slow  # an integration run (~15 s): in the CI slow set
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run_cli(["-m", "method=magnitude", "method.sparsity=0.1,0.3,1.5,0.5,0.7,0.9", *FAST, "output_dir=sweep"],
                   tmp_path, timeout=900)
    assert proc.returncode != 0
    rows = _rows(tmp_path / "sweep" / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert "method.sparsity" in rows[2]["error"] and "1.5" in rows[2]["error"]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "5 ok, 1 failed or missing, of 6 jobs" in summary


@pytest.mark.slow  # 50 smoke jobs, 2 at a time (~3 min on 2 cores): in the CI slow set
def test_fifty_job_parallel_sweep_completes_and_leaves_no_process(tmp_path):
    sparsities = ",".join(f"{0.3 + 0.01 * i:.2f}" for i in range(50))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_RUN_JOBS": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([cli_path(), "-m", "hydra/launcher=joblib_local", "method=magnitude",
                             f"method.sparsity={sparsities}", *FAST, "output_dir=sweep"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 0, stderr[-3000:]
    rows = _rows(tmp_path / "sweep" / "summary.csv")
    assert [r["job"] for r in rows] == [str(i) for i in range(50)] and all(r["status"] == "ok" for r in rows)
    assert sorted(round(float(r["model/prunable_sparsity"]), 2) for r in rows) == \
        [round(0.3 + 0.01 * i, 2) for i in range(50)]
    assert "50 ok, 0 failed" in (tmp_path / "sweep" / "summary.md").read_text()
    deadline = time.time() + 60  # the pool's workers notice the sweep's end and exit; none may stay behind
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _session_alive(proc.pid), "worker processes of the sweep are still running"


def _session_alive(session: int) -> bool:
    """Whether any process is left in the session (process group) that the sweep was started in."""
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return False
    return True


def test_summary_lists_jobs_without_results_as_missing(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text('{"status": "done", "overrides": ["a=1"], "metrics": '
                                                 '{"test/acc": 0.5, "latency_sim_ms/a100": 1.0}}')
    (tmp_path / "1").mkdir()
    rows = write_summary(tmp_path)
    assert rows[0]["status"] == "ok" and rows[0]["hardware"] == "a100" and rows[0]["latency_sim_ms"] == 1.0
    assert rows[1]["status"] == "missing"


def test_pareto_front_keeps_only_undominated_points():
    pts = [{"top1": 90.0, "macs_M": 10.0}, {"top1": 92.0, "macs_M": 20.0}, {"top1": 91.0, "macs_M": 25.0},
           {"top1": 89.0, "macs_M": 5.0}, {"top1": 92.0, "macs_M": 30.0}]
    assert [(p["macs_M"], p["top1"]) for p in pareto_front(pts, "macs_M")] == [(5.0, 89.0), (10.0, 90.0),
                                                                               (20.0, 92.0)]
