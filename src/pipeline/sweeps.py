"""Sweep summary: at the end of every multirun, ``summary.csv`` and ``summary.md`` in the sweep dir.

One row per job (in job order): its overrides, ``ok`` or ``failed`` with the first line of the error,
and the headline metrics from its ``results.json``. A job that left no ``results.json`` (killed, or a
launcher that lost it) is listed as ``missing``. Registered as a Hydra callback in
``conf/hydra/default.yaml``, so it runs with every launcher (basic, joblib, submitit); the same table
can be rebuilt later with ``python -m compress_run.pipeline.sweeps <sweep dir>``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from compress_run.pipeline.checkpoints import atomic_write_text

METRICS = ("test/acc", "val/acc", "model/prunable_sparsity", "model/params_nonzero", "model/macs_dense",
           "model/macs_effective", "latency_host_ms/b1")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Numbered job dirs (Hydra's default subdir), else named ones (compress-table's rows/<row>)."""
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if jobs:
        return sorted(jobs, key=lambda p: int(p.name))
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and ((p / "results.json").is_file()
                                                                  or (p / ".hydra").is_dir()))


def simulated_latency(metrics: dict[str, Any]) -> tuple[str | None, float | None]:
    """(hardware profile, batch-1 simulated ms) of the run's primary profile."""
    hardware = metrics.get("hardware")
    if hardware and f"latency_sim_ms/{hardware}" in metrics:
        return hardware, metrics[f"latency_sim_ms/{hardware}"]
    for key, value in metrics.items():
        if key.startswith("latency_sim_ms/") and key.count("/") == 1:
            return key.partition("/")[2], value
    return None, None


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in _job_dirs(sweep_dir):
        row: dict[str, Any] = {"job": int(job.name) if job.name.isdigit() else job.name}
        path = job / "results.json"
        if not path.is_file():
            row.update(status="missing", error="no results.json (the job was killed or never started)")
            rows.append(row)
            continue
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            row.update(status="failed", error=f"unreadable results.json: {exc}")
            rows.append(row)
            continue
        row["overrides"] = " ".join(results.get("overrides", []))
        row["method"] = results.get("choices", {}).get("method")
        failed = results.get("status") == "failed"
        row["status"] = "failed" if failed else "ok"
        row["error"] = results.get("error", "") if failed else ""
        row["bad_input"] = bool(results.get("bad_input", False))
        metrics = results.get("metrics", {})
        for key in METRICS:
            row[key] = metrics.get(key)
        row["hardware"], row["latency_sim_ms"] = simulated_latency(metrics)
        row["output_dir"] = str(job)
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = summary_rows(sweep_dir)
    columns = ["job", "status", "method", "overrides", *METRICS, "latency_sim_ms", "hardware", "error", "output_dir"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "summary.csv", buffer.getvalue())
    shown = ["job", "status", "overrides", "test/acc", "model/prunable_sparsity", "model/macs_effective",
             "latency_sim_ms", "error"]
    common = set.intersection(*(set(r.get("overrides", "").split()) for r in rows)) if rows else set()
    for row in rows:  # the table shows what differs between jobs; summary.csv keeps every override
        row["varied"] = " ".join(t for t in row.get("overrides", "").split() if t not in common)
    shown[shown.index("overrides")] = "varied"
    ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# Sweep summary: {sweep_dir}", "", f"{ok} ok, {len(rows) - ok} failed or missing, of {len(rows)} jobs.",
             f"Overrides common to all jobs: `{' '.join(sorted(common)) or '(none)'}`", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in shown) + " |")
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


# (output dir, error, bad input) of the failed jobs of the last multirun in this process: jobs that ran in
# other processes (joblib, submitit) cannot report to the CLI directly, their results.json can.
FAILED: list[tuple[str, str, bool]] = []


class SweepSummary(Callback):
    """Hydra callback: write the summary when a multirun ends (failed jobs included)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = write_summary(sweep_dir)
            FAILED[:] = [(r.get("output_dir") or str(sweep_dir / str(r["job"])), r["error"], r.get("bad_input", False))
                         for r in rows if r["status"] != "ok"]
            print(f"compress-run: sweep summary ({len(rows)} jobs): {sweep_dir / 'summary.md'}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m compress_run.pipeline.sweeps <sweep dir>")
    write_summary(Path(sys.argv[1]))
