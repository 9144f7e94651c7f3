"""Paper tables: ``conf/table/<name>.yaml`` (rows = experiment + overrides + published values), the state
of each row in a table's output dir, and ``TABLE.md`` / ``table.csv`` with paper value, ours and the
difference side by side. The ``compress-table`` command that runs the missing rows is
:mod:`compress_run.pipeline.table_cli`.

A table dir holds ``rows/<row name>/`` (an ordinary compress-run output dir per row, so a killed row
resumes from its checkpoints), ``TABLE.md``, ``table.csv`` and, with ``plot=true``, the Pareto figures.
Metrics (all in the units of the published tables): ``top1`` (% test accuracy), ``macs_reduction`` (% of
the dense MACs removed), ``sparsity`` (% zeros in the prunable layers), ``params_reduction`` (% of the
original parameters removed), ``latency_ms`` (simulated batch-1 latency on the run's hardware profile),
``host_ms`` (measured batch-1 latency on the host that ran the evaluate stage).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress_run.pipeline.checkpoints import atomic_write_text
from compress_run.pipeline.errors import UserError
from compress_run.pipeline.sweeps import simulated_latency


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _macs_reduction(m: dict[str, Any]) -> float | None:
    dense, effective = m.get("model/macs_dense"), m.get("model/macs_effective")
    return 100.0 * (1.0 - effective / dense) if dense and effective is not None else None


METRICS: dict[str, tuple[str, Any]] = {
    "top1": ("top-1 (%)", lambda m: _pct(m.get("test/acc"))),
    "macs_reduction": ("MAC reduction (%)", _macs_reduction),
    "sparsity": ("sparsity (%)", lambda m: _pct(m.get("model/prunable_sparsity"))),
    "params_reduction": ("param reduction (%)", lambda m: _pct(m.get("model/params_reduction"))),
    "latency_ms": ("sim latency (ms)", lambda m: simulated_latency(m)[1]),
    "host_ms": ("host latency (ms, b1)", lambda m: m.get("latency_host_ms/b1")),
}
SMOKE_OVERRIDES = ["debug=smoke", "dataset=synthetic", "logger=none", "evaluate.repeats=2", "evaluate.warmup=1"]
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TableRow:
    name: str = MISSING                 # also the row's directory name under rows/
    experiment: str = MISSING           # a conf/experiment option
    overrides: list[str] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)   # metric -> published value (empty: no reference)
    note: str = ""
    level: float | None = None          # multi-level runs: report this level (its sparsity) of the run
    run: str = ""                       # read the run of this other row (another level of it); not launched


def run_dir_of(table_dir: Path, row: TableRow) -> Path:
    return table_dir / "rows" / (row.run or row.name)


@dataclass
class TableConfig:
    title: str = MISSING
    source: str = ""                    # where the published values come from
    metrics: list[str] = field(default_factory=lambda: ["top1"])  # compared metrics, the first is the headline
    smoke_overrides: list[str] = field(default_factory=list)     # added to SMOKE_OVERRIDES at scale=smoke
    rows: list[TableRow] = field(default_factory=list)


def table_names() -> list[str]:
    return sorted(p.name[:-5] for p in files("compress_run.conf").joinpath("table").iterdir()
                  if p.name.endswith(".yaml"))


def experiment_names() -> set[str]:
    return {p.name[:-5] for p in files("compress_run.conf").joinpath("experiment").iterdir()
            if p.name.endswith(".yaml")}


def load_table(name: str) -> TableConfig:
    """The validated table config ``conf/table/<name>.yaml`` (or a path to a YAML file)."""
    path = Path(name)
    if not (path.suffix == ".yaml" and path.is_file()):
        if name not in table_names():
            raise UserError(f"unknown table '{name}'", f"choose one of: {', '.join(table_names())} "
                            "(conf/table/<name>.yaml), or give the path of a table YAML file")
        path = Path(str(files("compress_run.conf").joinpath("table", f"{name}.yaml")))
    try:
        table = OmegaConf.merge(OmegaConf.structured(TableConfig), OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid table config {path}: {str(exc).splitlines()[0]}",
                        "use the keys title, source, metrics, smoke_overrides and rows (name, experiment, overrides, "
                        "paper, note, level, run) as in conf/table/gap_imagenet.yaml") from exc
    check_table(table, path)
    return table  # type: ignore[return-value]


def check_table(table: DictConfig, path: Path) -> None:
    unknown = [m for m in table.metrics if m not in METRICS]
    if unknown or not table.metrics:
        raise UserError(f"table {path}: unknown metric(s) {unknown or '(none given)'}",
                        f"use metrics from: {', '.join(METRICS)}")
    experiments, seen = experiment_names(), set()
    for row in table.rows:
        if not ROW_NAME.match(row.name) or row.name in seen:
            raise UserError(f"table {path}: row name '{row.name}' is empty, repeated or not a plain file name",
                            "give every row a unique name of letters, digits, '_', '-' and '.'")
        seen.add(row.name)
        if row.experiment not in experiments:
            raise UserError(f"table {path}, row '{row.name}': unknown experiment '{row.experiment}'",
                            "use a file name from conf/experiment/ without .yaml")
        if row.run:
            owner = next((r for r in table.rows if r.name == row.run), None)
            if owner is None or owner.run or owner.experiment != row.experiment or \
                    list(owner.overrides) != list(row.overrides):
                raise UserError(f"table {path}, row '{row.name}': run '{row.run}' is not another row with the "
                                "same experiment and overrides", "point run at the row that runs the experiment")
        bad = [k for k in row.paper if k not in table.metrics]
        if bad:
            raise UserError(f"table {path}, row '{row.name}': paper values for {bad}, which the table does not "
                            "compare", f"list them under metrics (now {list(table.metrics)})")
    if not table.rows:
        raise UserError(f"table {path} has no rows", "add rows: [{name: ..., experiment: ..., paper: {...}}]")


def row_overrides(table: TableConfig, row: TableRow, smoke: bool) -> list[str]:
    """The overrides that define a row's job (without where it runs)."""
    extra = [*SMOKE_OVERRIDES, *table.smoke_overrides] if smoke else []
    return [f"experiment={row.experiment}", *row.overrides, *extra]


def row_state(row_dir: Path, expected: list[str]) -> tuple[str, dict[str, Any]]:
    """('done' | 'failed' | 'missing' | 'stale', results). 'stale': finished with other overrides than the
    table now asks for (the table config changed); it is neither reused nor silently replaced."""
    path = row_dir / "results.json"
    if not path.is_file():
        return "missing", {}
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return "failed", {"error": "unreadable results.json"}
    given = set(results.get("overrides", []))
    smoke_run = "debug=smoke" in given and "debug=smoke" not in expected
    if not set(expected) <= given or smoke_run:
        return "stale", results
    return ("failed" if results.get("status") == "failed" else "done"), results


def level_metrics(results: dict[str, Any], level: float) -> dict[str, Any]:
    """The run's metrics as they are for one level of a multi-level model ({} if it has no such level)."""
    row = next((r for r in results.get("levels", []) if r.get("target_sparsity") is not None
                and abs(r["target_sparsity"] - level) < 1e-9), None)
    if row is None:
        return {}
    return {**results.get("metrics", {}), **{k: v for k, v in row.items() if "/" in k},
            "model/prunable_sparsity": row["sparsity"]}


def row_values(table: TableConfig, row: TableRow, results: dict[str, Any], smoke: bool) -> dict[str, Any]:
    metrics = results.get("metrics", {})
    if row.level is not None and results:
        metrics = level_metrics(results, row.level)
    hardware, latency = simulated_latency(metrics)
    values: dict[str, Any] = {"row": row.name, "experiment": row.experiment,
                              "method": results.get("choices", {}).get("method"),
                              "macs_effective_M": _div(metrics.get("model/macs_effective"), 1e6),
                              "macs_dense_M": _div(metrics.get("model/macs_dense"), 1e6),
                              "latency_sim_ms": latency, "hardware": hardware}
    for metric in table.metrics:
        ours = METRICS[metric][1](metrics) if metrics else None
        paper = None if smoke else row.paper.get(metric)
        values[f"{metric}_paper"] = paper
        values[f"{metric}_ours"] = ours
        values[f"{metric}_diff"] = ours - paper if ours is not None and paper is not None else None
    return values


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def write_table(table: TableConfig, name: str, table_dir: Path, smoke: bool) -> list[dict[str, Any]]:
    """Collect every row's results into ``table.csv`` and ``TABLE.md``; returns the rows."""
    rows = []
    for row in table.rows:
        row_dir = run_dir_of(table_dir, row)
        state, results = row_state(row_dir, row_overrides(table, row, smoke))
        if state == "done" and row.level is not None and not level_metrics(results, row.level):
            state, results = "failed", {"error": f"the run has no level {row.level}"}
        values = row_values(table, row, results if state == "done" else {}, smoke)
        values.update(status=state, error=results.get("error", "") if state == "failed" else "",
                      run_dir=str(row_dir), note=row.note, finished_at=results.get("finished_at"),
                      host=_host(results) if state == "done" else None)
        rows.append(values)
    columns = ["row", "experiment", "method", "status"]
    for metric in table.metrics:
        columns += [f"{metric}_paper", f"{metric}_ours", f"{metric}_diff"]
    columns += ["macs_effective_M", "macs_dense_M", "latency_sim_ms", "hardware", "error", "run_dir", "note"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(table_dir / "table.csv", buffer.getvalue())
    atomic_write_text(table_dir / "TABLE.md", render_markdown(table, name, rows, smoke))
    meta = {"name": name, "title": table.title, "source": table.source, "metrics": list(table.metrics),
            "smoke": smoke, "command": f"compress-table table={name}{' scale=smoke' if smoke else ''}",
            "hosts": sorted({r["host"] for r in rows if r["host"]}),
            "finished": sorted(r["finished_at"] for r in rows if r["finished_at"]), "rows": rows}
    atomic_write_text(table_dir / "table.json", json.dumps(meta, indent=1) + "\n")
    return rows


def _host(results: dict[str, Any]) -> str:
    host = results.get("host", {})
    threads = results.get("metrics", {}).get("latency_host/threads")
    torch_version = results.get("versions", {}).get("torch", "?")
    text = f"{host.get('system', '?')} {host.get('machine', '?')}"
    text += f", {host['processor']}" if host.get("processor") else ""
    text += f", {host['cpus']} CPUs" if host.get("cpus") else ""
    text += f", GPU {host['gpu']}" if host.get("gpu") else ""
    return f"{text}, torch {torch_version}" + (f", latency measured with {threads} thread(s)" if threads else "")


def render_markdown(table: Any, name: str, rows: list[dict[str, Any]], smoke: bool) -> str:
    """TABLE.md of a table (a TableConfig, or the same keys read back from table.json)."""
    done = sum(r["status"] == "done" for r in rows)
    lines = [f"# {table.title}{' — SMOKE SCALE' if smoke else ''}", ""]
    if smoke:
        lines += ["**Smoke scale** (`scale=smoke`: a few batches of synthetic data, tiny widths): these rows test "
                  "the pipeline and are never compared with the published values.", ""]
    if table.source:
        lines += [f"Published values: {table.source}.", ""]
    lines += [f"`compress-table table={name}{' scale=smoke' if smoke else ''}` — {done} of {len(rows)} rows done.", ""]
    compared = [m for m in table.metrics if any(r[f"{m}_paper"] is not None for r in rows)]
    header = ["row", "experiment"]
    for metric in table.metrics:  # paper and difference columns only where a published value exists
        label = METRICS[metric][0]
        header += [f"{label} paper", f"{label} ours", "Δ"] if metric in compared else [label]
    header += ["MACs (M, effective)", "sim latency (ms, b1)", "status", "run dir"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["row"], f"`{r['experiment']}`"]
        for metric in table.metrics:
            ours = _fmt(r[f"{metric}_ours"])
            cells += [_fmt(r[f"{metric}_paper"]), ours, _fmt(r[f"{metric}_diff"], -2)] if metric in compared else [ours]
        latency = f"{r['latency_sim_ms']:.3f} ({r['hardware']})" if r["latency_sim_ms"] is not None else "–"
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        cells += [_fmt(r["macs_effective_M"]), latency, status.replace("|", "\\|"), f"`{r['run_dir']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"* {r['row']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"
