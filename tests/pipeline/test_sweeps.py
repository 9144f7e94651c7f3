"""Sweep summary: every multirun ends with summary.csv / summary.md, one row per job, failed jobs
recorded with their reason while the rest of the sweep goes on."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress_run.pipeline.plots import pareto_front
from compress_run.pipeline.sweeps import write_summary
from tests.conftest import REPO, cli_path, run_cli, run_cli_forked

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


def _slurm_sweep(tmp_path, tools: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), *(p for p in os.environ["PATH"].split(os.pathsep)
                                            if not (Path(p) / "srun").exists())])
    env = {**os.environ, "PATH": path, "COMPRESS_RUN_SLURM_PARTITION": "gpu-a100", "COMPRESS_RUN_SLURM_GPUS": "4",
           "COMPRESS_RUN_SLURM_TIMEOUT_MIN": "90"}
    return run_cli_forked(["-m", "hydra/launcher=slurm", "hydra.launcher.mem_gb=128", "method=magnitude,gmp", *FAST,
                           "output_dir=sweep"], tmp_path, timeout=300, env=env)


def test_slurm_launcher_generates_the_job_script_a_cluster_would_run(tmp_path):
    """hydra/launcher=slurm with stand-in ``srun`` and ``sbatch`` (which keeps the script it is given, then refuses
    it): the array job script carries the partition, GPUs, CPUs, memory, time limit and job name from the config
    and the environment, one array task per sweep job, and runs submitit's job runner; the refusal is exit 2."""
    kept = tmp_path / "kept.sh"
    proc = _slurm_sweep(tmp_path, {"srun": "exit 0", "sbatch": f"cp \"$1\" {kept}\n"
                                   "echo 'sbatch: error: invalid partition specified: gpu-a100' >&2\nexit 1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())
    assert "sbatch refused the sweep's job script: sbatch: error: invalid partition" in err and "Traceback" not in err
    script = kept.read_text()
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=128GB", "#SBATCH --time=90", "#SBATCH --array=0-1", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in script, f"{line!r} not in the job script:\n{script}"
    assert "#SBATCH --job-name=" in script and "submitit.core._submit" in script
    assert str(tmp_path / "sweep" / ".submitit") in script  # logs and results under the sweep dir


def test_slurm_launcher_off_a_cluster_is_one_paragraph_and_exit_2(tmp_path):
    proc = _slurm_sweep(tmp_path, {})
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())
    assert "this machine has no srun" in err and "hydra/launcher=joblib" in err and "Traceback" not in err
