"""Paper tables: ``conf/table/<name>.yaml`` (rows = experiment + overrides + published values, optional
``seeds`` and ``orderings``), the state of each run in a table's output dir, and ``TABLE.md`` / ``table.csv``
/ ``runs.csv`` / ``table.json`` with paper value, ours and the difference side by side. The
``compress-table`` command that runs the missing rows is :mod:`compress_run.pipeline.table_cli`.

A table dir holds ``rows/<row>/`` (or ``rows/<row>/seed<s>/`` for every seed of a multi-seed table): an
ordinary compress-run output dir per run, so a killed run resumes from its checkpoints. Beside it, every
finished run leaves a small **record** (``records/<row>.json`` or ``records/<row>/seed<s>.json``: its metrics,
overrides, host and commit, never checkpoints), written as the run completes. Records can live in a
directory of their own (``records=`` of compress-table, e.g. committed under ``docs/``), so a table that spans
several sessions on machines that may be replaced is rebuilt from them (``--collect``) and only the runs
without a record are run again.

Metrics (all in the units of the published tables): ``top1`` (% test accuracy), ``macs_reduction`` (% of
the dense MACs removed), ``sparsity`` (% zeros in the prunable layers), ``params_reduction`` (% of the
original parameters removed), ``latency_ms`` (simulated batch-1 latency on the run's hardware profile),
``host_ms`` (measured batch-1 latency on the host that ran the evaluate stage), ``latency_ms/<profile>``
(simulated batch-1 latency on a profile the rows list in ``evaluate.hardware``). A multi-seed row reports
the mean and the sample standard deviation over its seeds.

``orderings`` state the papers' claims about rows (``rows: [a, b, c]`` claims a ≥ b ≥ c on ``metric``;
with ``within: x`` the claim is |a − b| ≤ x for every b after a). One rule judges every claim
(:func:`verdict`): the difference must clear the sum of the two rows' standard deviations — a "≥" claim
*holds* when Δ > s_a + s_b, is *reversed* when −Δ > s_a + s_b; a "within x" claim holds when
|Δ| + s_a + s_b ≤ x and does not hold when |Δ| − s_a − s_b > x; anything else is *not resolved*. Where the two
rows ran the same seeds, a paired verdict (the same rule on the per-seed differences and their std) stands
beside it. A claim is not judged when a row has a run of unknown code, and not resolved when its rows ran on
different CPUs (:func:`hosts_of`) or, on training CPU time, on different commits. On a metric where less is
better (perplexity, KL, bytes, latency:
``LOWER_IS_BETTER``) "a ≥ b" claims a is the lower, and Δ is counted in the claimed direction (positive when the
claim's order shows).

Provenance: each run's CPU (``host_key``), commit, dirty flag and the other processes' CPU share come from its
record; a finished run without a commit is refused unless the table sets ``unknown_code`` (the reason).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress_run.core.errors import UserError
from compress_run.pipeline.checkpoints import atomic_write_text
from compress_run.pipeline.provenance import QUIET_SHARE, host_key, host_model
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
    "deploy_ms": ("ONNX Runtime latency (ms, b1)", lambda m: m.get("latency_deploy_ms/b1")),
    "weight_kb": ("weights (KiB)", lambda m: _div(m.get("model/weight_bytes"), 1024.0)),
    "int8_top1": ("int8 graph top-1 (%)", lambda m: _pct(m.get("int8_host/test/acc"))),
    "int8_host_ms": ("int8 graph host latency (ms, b1)", lambda m: m.get("int8_host/latency_ms/b1")),
    "int8_speedup": ("int8 graph speedup vs float graph (b1)", lambda m: m.get("int8_host/speedup/b1")),
    "train_cpu_s": ("training CPU time (s)", lambda m: _training_cpu_seconds(m)),
    "input_values": ("input values / image", lambda m: m.get("input/values")),
    "input_bytes": ("input bytes / image", lambda m: m.get("input/bytes")),
    "macs_m": ("MACs (M, b1)", lambda m: _div(m.get("model/macs_effective"), 1e6)),
    # a network split across nodes (method=disco)
    "sent_kb": ("KiB sent between nodes per inference", lambda m: _div(m.get("method/bytes_sent"), 1024.0)),
    "node_macs_m": ("MACs of the busiest node (M, b1)", lambda m: _div(m.get("method/max_node_macs"), 1e6)),
    "node_weight_kb": ("weights of the largest node (KiB)", lambda m: _div(m.get("method/max_node_weight_bytes"),
                                                                            1024.0)),
    "split_ms": ("sim latency split across the nodes (ms, b1)", lambda m: m.get("method/split_latency_ms")),
    # causal LMs
    "ppl": ("test perplexity", lambda m: m.get("test/ppl")),
    "ood_ppl": ("out-of-domain perplexity", lambda m: m.get("ood/ppl")),
    "nll": ("test NLL (nats/token)", lambda m: m.get("test/nll")),
    "kl": ("KL to the uncompressed model (nats/token)", lambda m: m.get("test/kl")),
    "agreement": ("top-1 agreement with the uncompressed model (%)", lambda m: _pct(m.get("test/top1_agreement"))),
    "weight_mb": ("weights (MiB)", lambda m: _div(m.get("model/weight_bytes"), 2.0 ** 20)),
    "host_decode_tok_s": ("host decode (tokens/s, b1)", lambda m: m.get("host_tokens_per_s/decode")),
}
# host timing columns: read from the table's timing pass (compress-table --time), never from the runs themselves,
# which shared the cores with whatever else ran; deploy_ms and int8_host_ms have no timing pass yet (empty)
TIMING_COLUMNS = ("host_ms", "host_decode_tok_s", "deploy_ms", "int8_host_ms")
TIMED_BY_PASS = ("host_ms", "host_decode_tok_s")
# training CPU time compares only runs of one commit (and one host): a change of code changes the work per step
SAME_COMMIT_METRICS = ("train_cpu_s",)
# metrics where less is better: an ordering "a >= b" on them claims a's value is the lower one
LOWER_IS_BETTER = {"ppl", "ood_ppl", "nll", "kl", "weight_mb", "weight_kb", "latency_ms", "host_ms", "deploy_ms",
                   "int8_host_ms", "train_cpu_s", "input_values", "input_bytes", "macs_m", "sent_kb", "node_macs_m",
                   "node_weight_kb", "split_ms"}


def _training_cpu_seconds(metrics: dict[str, Any]) -> float | None:
    """Process CPU seconds of the stages up to the finished network (train, compress, finetune; of a training
    stage its train epochs, summed over resumes): unlike wall time, blind to a paused or shared host. None when
    a run that reached finetune recorded none (runs made before the clock existed)."""
    times = [metrics.get(f"time/{stage}_cpu_s") for stage in ("train", "compress", "finetune")
             if f"time/{stage}_s" in metrics]
    return sum(times) if times and None not in times else None


def metric_spec(name: str) -> tuple[str, Any] | None:
    """(label, value function) of a table metric: one of METRICS, or ``latency_ms/<profile>`` (the simulated
    batch-1 latency on that profile, which the run lists in ``evaluate.hardware``); None if unknown."""
    if name.startswith("latency_ms/") and name.count("/") == 1:
        profile = name.partition("/")[2]
        return f"sim latency {profile} (ms)", lambda m: m.get(f"latency_sim_ms/{profile}")
    if name.startswith("decode_tok_s/") and name.count("/") == 1:
        profile = name.partition("/")[2]
        return f"sim decode {profile} (tokens/s, b1)", lambda m: m.get(f"sim_tokens_per_s/{profile}/decode")
    noise = re.fullmatch(r"noise_top1/snr(inf|-?\d+(?:\.\d+)?)/k([1-9]\d*)", name)
    if noise and (noise.group(1) == "inf" or f"{float(noise.group(1)):g}" == noise.group(1)):
        # top-1 under noise (evaluate.noise_snr_db), K votes; the SNR written as the runs' keys write it (20, 2.5)
        snr, votes = noise.groups()
        return (f"top-1 at SNR {snr} dB, K={votes} (%)", lambda m: _pct(m.get(f"noise/top1/snr{snr}/k{votes}")))
    noisy_lm = re.fullmatch(r"noise_(ppl|ood_ppl)/snr(inf|-?\d+(?:\.\d+)?)", name)
    if noisy_lm and (noisy_lm.group(2) == "inf" or f"{float(noisy_lm.group(2)):g}" == noisy_lm.group(2)):
        split, snr = noisy_lm.groups()  # a language model's perplexity under noise
        key = "test_ppl" if split == "ppl" else "ood_ppl"
        return f"{key.replace('_ppl', '')} perplexity at SNR {snr} dB", lambda m: m.get(f"noise/{key}/snr{snr}")
    return METRICS.get(name)


EXTRA = ("macs_effective_M", "macs_dense_M", "latency_sim_ms")  # aggregated beside the compared metrics
SMOKE_OVERRIDES = ["debug=smoke", "dataset=synthetic", "logger=none", "evaluate.repeats=2", "evaluate.warmup=1"]
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RECORD_KEYS = ("status", "choices", "overrides", "seed", "started_at", "finished_at", "git", "host", "versions",
               "config_digest", "load", "hardware_profiles", "process_started_at")


@dataclass
class TableRow:
    name: str = MISSING                 # also the row's directory name under rows/
    experiment: str = MISSING           # a conf/experiment option
    overrides: list[str] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)   # metric -> published value (empty: no reference)
    note: str = ""
    level: Any = None                   # multi-level runs: report this level (a sparsity, or one per segment)
    run: str = ""                       # read the run of this other row (another level of it); not launched
    base: str = ""                      # a row whose finished train/compress/finetune this row's run takes over
    train_from: str = ""                # a row whose finished train stage this row's run takes over (equal train
    #                                     inputs, e.g. another method that trains plainly), so a seed trains once


@dataclass
class Ordering:
    rows: list[str] = MISSING           # the claimed order, best first (a >= b >= c)
    metric: str = "top1"
    within: float | None = None         # set: a closeness claim, |rows[0] - r| <= within for every other r
    claim: str = ""                     # the paper's statement, shown beside the verdict


@dataclass
class TableConfig:
    title: str = MISSING
    source: str = ""                    # where the published values come from
    metrics: list[str] = field(default_factory=lambda: ["top1"])  # compared metrics, the first is the headline
    smoke_overrides: list[str] = field(default_factory=list)     # added to SMOKE_OVERRIDES at scale=smoke
    smoke_base: list[str] | None = None  # replaces SMOKE_OVERRIDES (their image data: a causal-LM table's own)
    seeds: list[int] = field(default_factory=list)  # every row once per seed (empty: one run, the config's seed)
    orderings: list[Ordering] = field(default_factory=list)
    discussion: str = ""                # what the table shows, and the investigation of a claim that does not hold
    rows: list[TableRow] = field(default_factory=list)
    # non-empty: the reason runs whose code is unknown (records without a commit) may be collected; they are
    # shown as such and the claims on their rows are not judged. Empty: such a record is refused.
    unknown_code: str = ""


# ------------------------------------------------------------------------------------- loading
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
                        "use the keys title, source, metrics, smoke_overrides, seeds, orderings and rows (name, "
                        "experiment, overrides, paper, note, level, run, base, train_from) as in "
                        "conf/table/fmnist_sparse.yaml") from exc
    check_table(table, path)
    return table  # type: ignore[return-value]


def check_table(table: DictConfig, path: Path) -> None:
    unknown = [m for m in table.metrics if metric_spec(m) is None]
    if unknown or not table.metrics:
        raise UserError(f"table {path}: unknown metric(s) {unknown or '(none given)'}",
                        f"use metrics from: {', '.join(METRICS)}, latency_ms/<profile>, decode_tok_s/<profile>, "
                        "noise_top1/snr<dB or inf>/k<votes>, noise_ppl/snr<dB or inf>")
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
        if row.base:
            base = next((r for r in table.rows if r.name == row.base), None)
            if base is None or base.base or base.run or base.experiment != row.experiment or \
                    before_quantize(base.overrides) != before_quantize(row.overrides):
                raise UserError(f"table {path}, row '{row.name}': base '{row.base}' is not another row of the same "
                                "experiment whose overrides differ from this row's only in quant.* / evaluate.*",
                                "point base at the row that runs the same experiment without quantization")
        if row.train_from:
            source = next((r for r in table.rows if r.name == row.train_from), None)
            if source is None or source is row or source.run or source.base or source.train_from or row.base:
                raise UserError(f"table {path}, row '{row.name}': train_from '{row.train_from}' is not another row "
                                "that runs its own training (no run, base or train_from of its own), or the row "
                                "also names a base", "point train_from at the row whose train stage this row "
                                "shares (same model, data and train schedule), and give a row base or train_from, "
                                "not both")
        bad = [k for k in row.paper if k not in table.metrics]
        if bad:
            raise UserError(f"table {path}, row '{row.name}': paper values for {bad}, which the table does not "
                            "compare", f"list them under metrics (now {list(table.metrics)})")
        if any(o.split("=", 1)[0].lstrip("+~") == "seed" for o in row.overrides) and table.seeds:
            raise UserError(f"table {path}, row '{row.name}': a seed override in a table with seeds "
                            f"{list(table.seeds)}", "remove the row's seed= override (the table sets it per run)")
    if not table.rows:
        raise UserError(f"table {path} has no rows", "add rows: [{name: ..., experiment: ..., paper: {...}}]")
    if len(set(table.seeds)) != len(table.seeds):
        raise UserError(f"table {path}: seeds {list(table.seeds)} repeat a seed", "list every seed once")
    for ordering in table.orderings:
        missing = [r for r in ordering.rows if r not in seen]
        if len(ordering.rows) < 2 or missing or ordering.metric not in table.metrics:
            raise UserError(f"table {path}: ordering {list(ordering.rows)} on '{ordering.metric}' names "
                            f"{'unknown rows ' + str(missing) if missing else 'fewer than two rows or a metric '}"
                            "the table does not have", "list at least two of the table's rows and one of its metrics")


def before_quantize(overrides: list[str]) -> list[str]:
    """The overrides that act before the quantize stage (a base row and its quantized rows share these)."""
    after = ("quant", "evaluate", "hardware")
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in after)


# -------------------------------------------------------------------------------------- runs
def seeds_of(table: TableConfig) -> list[int | None]:
    return list(table.seeds) or [None]


def run_key(row_name: str, seed: int | None) -> str:
    """The run's path below rows/ and records/ (``row`` or ``row/seed<s>``)."""
    return row_name if seed is None else f"{row_name}/seed{seed}"


def run_dir_of(table_dir: Path, row: TableRow, seed: int | None = None) -> Path:
    return table_dir / "rows" / run_key(row.run or row.name, seed)


def record_path(records_dir: Path, row: TableRow, seed: int | None = None) -> Path:
    return records_dir / f"{run_key(row.run or row.name, seed)}.json"


def source_row(table: TableConfig, row: TableRow) -> TableRow | None:
    """The row whose run this row's run takes stages over from (``base`` or ``train_from``), if any."""
    name = row.base or row.train_from
    return next((r for r in table.rows if r.name == name), None) if name else None


def start_from(table: TableConfig, table_dir: Path, row: TableRow, seed: int | None) -> list[str]:
    """``start_from=<the source row's run>`` when that run has finished the last stage this row takes over (the
    base's finetune, the train_from row's train); else the row runs in full."""
    source = source_row(table, row)
    if source is None:
        return []
    source_dir = run_dir_of(table_dir, source, seed)
    needed = source_dir / "stages" / f"{'finetune' if row.base else 'train'}.json"
    return [f"start_from={source_dir}"] if needed.is_file() else []


def launched_runs(table: TableConfig) -> list[tuple[TableRow, int | None]]:
    """(row, seed) of every run the table launches (rows with ``run`` read another row's runs)."""
    return [(row, seed) for row in table.rows if not row.run for seed in seeds_of(table)]


def row_overrides(table: TableConfig, row: TableRow, smoke: bool, seed: int | None = None) -> list[str]:
    """The overrides that define a run's job (without where it runs)."""
    base = SMOKE_OVERRIDES if table.smoke_base is None else list(table.smoke_base)
    extra = [*base, *table.smoke_overrides] if smoke else []
    return [f"experiment={row.experiment}", *row.overrides, *([f"seed={seed}"] if seed is not None else []), *extra]


def small_record(results: dict[str, Any]) -> dict[str, Any]:
    """What a table needs of a run's results.json: scalar metrics, levels, overrides, host, commit."""
    record = {k: results[k] for k in RECORD_KEYS if k in results}
    if "overrides" in record:  # start_from names a run dir of this machine and changes no result
        record["overrides"] = [o for o in record["overrides"] if not o.startswith("start_from=")]
    record["metrics"] = {k: v for k, v in results.get("metrics", {}).items()
                         if isinstance(v, int | float | str | bool) or v is None}
    if results.get("levels"):
        record["levels"] = results["levels"]
    if results.get("level_mixes"):
        record["level_mixes"] = results["level_mixes"]
    return record


def write_record(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(small_record(results), indent=1, sort_keys=True) + "\n")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_state(run_dir: Path, record: Path | None, expected: list[str]) -> tuple[str, dict[str, Any], str]:
    """('done' | 'failed' | 'missing' | 'stale', results or record, where it came from: 'run' | 'record').

    The run dir's results.json wins; without it, the run's record (if any) stands in. 'stale': finished
    with other overrides than the table now asks for (the table config changed); it is neither reused nor
    silently replaced."""
    source, path = "run", run_dir / "results.json"
    if not path.is_file() and record is not None and record.is_file():
        source, path = "record", record
    if not path.is_file():
        return "missing", {}, source
    results = _read(path)
    if results is None:
        return "failed", {"error": f"unreadable {path.name}"}, source
    given = set(results.get("overrides", []))
    smoke_run = "debug=smoke" in given and "debug=smoke" not in expected
    if not set(expected) <= given or smoke_run:
        return "stale", results, source
    return ("failed" if results.get("status") == "failed" else "done"), results, source


def row_state(row_dir: Path, expected: list[str]) -> tuple[str, dict[str, Any]]:
    """State of a run dir alone (no record): ('done' | 'failed' | 'missing' | 'stale', results)."""
    state, results, _ = run_state(row_dir, None, expected)
    return state, results


# ------------------------------------------------------------------------------------ values
def level_metrics(results: dict[str, Any], level: Any) -> dict[str, Any]:
    """The run's metrics as they are for one level (a sparsity) or one switch (a sparsity per segment) of a
    multi-level model ({} if it has no such level)."""
    if isinstance(level, list | tuple) or hasattr(level, "__len__"):
        wanted = [float(v) for v in level]
        row = next((m for m in results.get("level_mixes", []) if len(m["target_sparsity"]) == len(wanted)
                    and all(abs(a - b) < 1e-9 for a, b in zip(m["target_sparsity"], wanted, strict=True))), None)
    else:
        row = next((r for r in results.get("levels", []) if r.get("target_sparsity") is not None
                    and abs(r["target_sparsity"] - level) < 1e-9), None)
    if row is None:
        return {}
    return {**results.get("metrics", {}), **{k: v for k, v in row.items() if "/" in k},
            "model/prunable_sparsity": row["sparsity"]}


def run_values(table: TableConfig, row: TableRow, results: dict[str, Any]) -> dict[str, Any]:
    """The metric values of one finished run ({} for an empty result)."""
    metrics = results.get("metrics", {})
    if row.level is not None and results:
        metrics = level_metrics(results, row.level)
    hardware, latency = simulated_latency(metrics)
    values: dict[str, Any] = {"macs_effective_M": _div(metrics.get("model/macs_effective"), 1e6),
                              "macs_dense_M": _div(metrics.get("model/macs_dense"), 1e6),
                              "latency_sim_ms": latency, "hardware": hardware}
    for metric in table.metrics:
        values[metric] = metric_spec(metric)[1](metrics) if metrics else None
    return values


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def read_timing(table_dir: Path, records_dir: Path | None) -> dict[str, Any] | None:
    """The table's timing pass (``timing.json`` beside its records, else in the table dir), if it had one."""
    for folder in (records_dir, table_dir):
        if folder is not None and (folder / "timing.json").is_file():
            return _read(folder / "timing.json")
    return None


def collect_runs(table: TableConfig, table_dir: Path, records_dir: Path | None,
                 smoke: bool) -> list[dict[str, Any]]:
    """One entry per (row, seed): its state, values, where it lives, and (for a run dir) a fresh record. The
    timing columns (:data:`TIMING_COLUMNS`) come from the table's timing pass only."""
    timed = (read_timing(table_dir, records_dir) or {}).get("runs", {})
    runs = []
    for row in table.rows:
        owner = next(r for r in table.rows if r.name == (row.run or row.name))
        for seed in seeds_of(table):
            run_dir = run_dir_of(table_dir, row, seed)
            record = record_path(records_dir, row, seed) if records_dir else None
            state, results, source = run_state(run_dir, record, row_overrides(table, owner, smoke, seed))
            if state == "done" and row.level is not None and not level_metrics(results, row.level):
                state, results = "failed", {"error": f"the run has no level {row.level}"}
            if state == "done" and source == "run" and record is not None and not row.run:
                previous = _read(record) if record.is_file() else None
                if previous != small_record(results):
                    write_record(record, results)
            done = state == "done"
            entry = {"row": row.name, "seed": seed, "status": state, "source": source,
                     "error": results.get("error", "") if state == "failed" else "",
                     "run_dir": str(run_dir.relative_to(table_dir)), "finished_at": results.get("finished_at"),
                     "host": _host(results) if done else None,
                     "host_key": host_key(results.get("host")) if done else None,
                     "cpu": host_model(results.get("host")) if done else None,
                     "commit": (results.get("git") or {}).get("commit") if done else None,
                     "dirty": (results.get("git") or {}).get("dirty") if done else None,
                     "load_share": (results.get("load") or {}).get("others_share") if done else None,
                     "method": results.get("choices", {}).get("method") if done else None}
            entry.update(run_values(table, row, results if state == "done" else {}))
            for metric in set(table.metrics) & set(TIMING_COLUMNS):
                found = timed.get(run_key(row.run or row.name, seed), {})
                same_run = found.get("finished_at") == results.get("finished_at")  # not a run made again since
                entry[metric] = found.get("value") if done and same_run and found.get("metric") == metric else None
            runs.append(entry)
    return runs


def aggregate(table: TableConfig, runs: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """One entry per row: mean and std of every metric over its finished seeds, paper value, difference."""
    rows = []
    for row in table.rows:
        mine = [r for r in runs if r["row"] == row.name]
        done = [r for r in mine if r["status"] == "done"]
        failed = [r for r in mine if r["status"] == "failed"]
        if len(done) == len(mine):
            status = "done"
        elif failed:
            status = "failed"
        elif any(r["status"] == "stale" for r in mine):
            status = "stale"
        else:
            status = "partial" if done else "missing"
        owner = row.run or row.name
        values: dict[str, Any] = {"row": row.name, "experiment": row.experiment, "status": status,
                                  "seeds_done": len(done), "seeds": len(mine), "note": row.note,
                                  "error": failed[0]["error"] if failed else "",
                                  "run_dir": f"rows/{owner}",
                                  "method": next((r["method"] for r in done if r["method"]), None),
                                  "hardware": next((r["hardware"] for r in done if r["hardware"]), None),
                                  "finished_at": max((r["finished_at"] for r in done if r["finished_at"]),
                                                     default=None),
                                  "host": next((r["host"] for r in done if r["host"]), None),
                                  "hosts": sorted({r["host_key"] or "unknown" for r in done}),
                                  "cpus": sorted({r["cpu"] or "unknown" for r in done}),
                                  "commits": sorted({r["commit"] for r in done if r["commit"]}),
                                  "code_unknown": sum(r["commit"] is None for r in done)}
        for metric in [*table.metrics, *EXTRA]:
            mean, std = mean_std([r[metric] for r in done if r.get(metric) is not None])
            key = metric if metric in EXTRA else f"{metric}_ours"
            values[key] = mean
            values[f"{metric}_std"] = std
            if metric in table.metrics:
                paper = None if smoke else row.paper.get(metric)
                values[f"{metric}_paper"] = paper
                values[f"{metric}_diff"] = mean - paper if mean is not None and paper is not None else None
        rows.append(values)
    return rows


def verdict(delta: float, spread: float | None, within: float | None) -> str:
    """One rule for every claim: the difference must clear the ±1 std band (``spread``: the two rows' stds
    summed, or the std of the paired differences). "a ≥ b": Δ > spread holds, −Δ > spread is reversed. "|a − b|
    ≤ x": |Δ| + spread ≤ x holds, |Δ| − spread > x does not hold. Anything else is not resolved."""
    if spread is None:
        return "one seed: no std to judge by"
    if within is None:
        if delta > spread:
            return "holds (beyond one std)"
        return "reversed (beyond one std)" if -delta > spread else "not resolved (within one std)"
    if abs(delta) + spread <= within:
        return "holds (|Δ| + std within the bound)"
    return "does not hold (beyond one std)" if abs(delta) - spread > within else "not resolved (within one std)"


def hosts_of(*rows: dict[str, Any]) -> list[str]:
    """The hosts two rows ran on: full host keys when every run has one, else the CPU models (records written
    before the key existed name only the model)."""
    keys = sorted({k for r in rows for k in r.get("hosts", [])})
    return keys if all(" (" in k for k in keys) else sorted({c for r in rows for c in r.get("cpus", [])})


def evaluate_orderings(table: TableConfig, rows: list[dict[str, Any]],
                       runs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The verdict on every claimed ordering (see the module docstring and :func:`verdict`), unpaired and, where
    the rows share seeds, paired; not judged where a row's code is unknown or the rows ran on different hosts."""
    by_name = {r["row"]: r for r in rows}
    per_seed = {(r["row"], r["seed"]): r for r in runs or [] if r["status"] == "done"}
    verdicts = []
    for ordering in table.orderings:
        names = list(ordering.rows)
        pairs = [(names[0], b) for b in names[1:]] if ordering.within is not None else \
            list(zip(names, names[1:], strict=False))
        for a, b in pairs:
            ra, rb, metric = by_name[a], by_name[b], ordering.metric
            ma, mb = ra[f"{metric}_ours"], rb[f"{metric}_ours"]
            sa, sb = ra[f"{metric}_std"], rb[f"{metric}_std"]
            entry = {"better": a, "worse": b, "metric": metric, "within": ordering.within, "claim": ordering.claim,
                     "mean_a": ma, "std_a": sa, "n_a": ra["seeds_done"], "mean_b": mb, "std_b": sb,
                     "n_b": rb["seeds_done"], "delta": None, "paired": None}
            lower = metric in LOWER_IS_BETTER or metric.startswith(("latency_ms/", "noise_ppl/", "noise_ood_ppl/"))
            hosts = hosts_of(ra, rb)
            if ma is None or mb is None:
                entry["verdict"] = "not run"
            else:
                delta = entry["delta"] = (mb - ma) if lower else (ma - mb)  # > 0: in the claimed direction
                spread = None if sa is None or sb is None else sa + sb
                entry["verdict"] = verdict(delta, spread, ordering.within)
                entry["paired"] = paired_verdict(per_seed, a, b, metric, lower, ordering.within)
                unknown = ra.get("code_unknown", 0) + rb.get("code_unknown", 0)
                commits = set(ra.get("commits", [])) | set(rb.get("commits", []))
                blocked = f"not judged (code unknown for {unknown} run(s))" if unknown else \
                    f"not resolved (hosts differ: {' vs '.join(hosts)})" \
                    if len(hosts) > 1 and metric not in TIMED_BY_PASS else \
                    f"not resolved (training time from {len(commits)} commits)" \
                    if metric in SAME_COMMIT_METRICS and len(commits) > 1 else None
                if blocked:
                    entry["verdict"] = blocked
                    if entry["paired"]:
                        entry["paired"]["verdict"] = blocked
            entry["hosts"] = hosts
            verdicts.append(entry)
    return verdicts


def paired_verdict(per_seed: dict[tuple[str, Any], dict[str, Any]], a: str, b: str, metric: str, lower: bool,
                   within: float | None) -> dict[str, Any] | None:
    """The claim judged on per-seed differences where both rows ran the same seeds (at least two): each seed's
    rows share their data order and, with base/train_from, their trained network."""
    seeds = sorted({s for (row, s) in per_seed if row == a} & {s for (row, s) in per_seed if row == b},
                   key=lambda s: (s is None, s))
    diffs = []
    for seed in seeds:
        va, vb = per_seed[(a, seed)].get(metric), per_seed[(b, seed)].get(metric)
        if va is not None and vb is not None:
            diffs.append((vb - va) if lower else (va - vb))
    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    return {"n": len(diffs), "delta": mean, "std": std, "verdict": verdict(mean, std, within)}


# ------------------------------------------------------------------------------------ output
def write_table(table: TableConfig, name: str, table_dir: Path, smoke: bool,
                records_dir: Path | None = None) -> list[dict[str, Any]]:
    """Collect every run (run dir, else record) into ``table.csv``, ``runs.csv``, ``TABLE.md`` and
    ``table.json``; writes the record of every finished run dir that lacks an up-to-date one."""
    runs = collect_runs(table, table_dir, records_dir, smoke)
    unknown = [run_key(r["row"], r["seed"]) for r in runs if r["status"] == "done" and r["commit"] is None]
    if unknown and not smoke and not table.unknown_code:
        raise UserError(f"{len(unknown)} finished run(s) of table {name} do not say which code produced them (no "
                        f"commit in their record): {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}",
                        "run them again from a git checkout or an installed copy built by this version (both record "
                        "the commit), or set `unknown_code: <reason>` in the table config to publish them marked "
                        "as such, with the claims on their rows left unjudged")
    rows = aggregate(table, runs, smoke)
    orderings = evaluate_orderings(table, rows, runs)
    columns = ["row", "experiment", "method", "status", "seeds_done", "seeds"]
    for metric in table.metrics:
        columns += [f"{metric}_paper", f"{metric}_ours", f"{metric}_std", f"{metric}_diff"]
    columns += ["macs_effective_M", "macs_dense_M", "latency_sim_ms", "hardware", "error", "run_dir", "note"]
    _write_csv(table_dir / "table.csv", columns, rows)
    run_columns = ["row", "seed", "status", "source", *table.metrics, *EXTRA, "hardware", "error", "run_dir",
                   "finished_at", "commit", "dirty", "cpu", "host_key", "load_share"]
    _write_csv(table_dir / "runs.csv", run_columns, runs)
    timing = timing_summary(table, read_timing(table_dir, records_dir))
    atomic_write_text(table_dir / "TABLE.md", render_markdown(table, name, rows, smoke, orderings, timing))
    meta = {"name": name, "title": table.title, "source": table.source, "metrics": list(table.metrics),
            "discussion": table.discussion,
            "seeds": list(table.seeds), "smoke": smoke,
            "command": table_command(name, table_dir, records_dir, smoke),
            "hosts": sorted({r["host"] for r in runs if r["host"]}),
            "cpus": cpu_counts(runs),
            "finished": sorted(r["finished_at"] for r in runs if r["finished_at"]),
            "commits": sorted({r["commit"] for r in runs if r["commit"]}),
            "code_unknown": unknown, "unknown_code_reason": table.unknown_code,
            "timing": timing,
            "loaded_runs": sorted(run_key(r["row"], r["seed"]) for r in runs
                                  if r["load_share"] is not None and r["load_share"] >= QUIET_SHARE),
            "rows": rows, "runs": runs, "orderings": orderings}
    atomic_write_text(table_dir / "table.json", json.dumps(meta, indent=1) + "\n")
    return rows


def table_command(name: str, table_dir: Path, records_dir: Path | None, smoke: bool) -> str:
    """The command that rebuilds this table from its records (paths relative to the working directory when they
    lie below it, so a command printed for a repository's records works pasted in that repository)."""
    def shown(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)
    if records_dir is None:
        return f"compress-table table={name}{' scale=smoke' if smoke else ''} output_dir={shown(table_dir)}"
    return (f"compress-table table={name}{' scale=smoke' if smoke else ''} records={shown(records_dir)} "
            f"output_dir={shown(table_dir)} --collect")


def timing_summary(table: TableConfig, timing: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the table's timing columns come from (None: the table has none)."""
    columns = [m for m in table.metrics if m in TIMING_COLUMNS]
    if not columns:
        return None
    if timing is None:
        return {"columns": columns, "measured": False}
    load = timing.get("load") or {}
    return {"columns": columns, "measured": True, "date": str(timing.get("finished_at", ""))[:10],
            "rounds": timing.get("rounds"), "cpu": host_key(timing.get("host")),
            "threads": timing.get("torch_threads"), "others_share": load.get("others_share"),
            "commit": (timing.get("git") or {}).get("commit"), "runs": len(timing.get("runs", {}))}


def cpu_counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    """How many finished runs ran on each CPU (model, with its key where the records have one)."""
    counts: dict[str, int] = {}
    for r in runs:
        if r["status"] == "done":
            label = r["host_key"] or "unknown"
            counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _host(results: dict[str, Any]) -> str:
    host = results.get("host", {})
    threads = results.get("metrics", {}).get("latency_host/threads")
    torch_version = results.get("versions", {}).get("torch", "?")
    text = f"{host.get('system', '?')} {host.get('machine', '?')}"
    text += f", {host['processor']}" if host.get("processor") else ""
    text += f", {host['cpus']} CPUs" if host.get("cpus") else ""
    text += f", GPU {host['gpu']}" if host.get("gpu") else ""
    return f"{text}, torch {torch_version}" + (f", latency measured with {threads} thread(s)" if threads else "")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def _fmt_mean(mean: Any, std: Any) -> str:
    return _fmt(mean) if std is None or mean is None else f"{mean:.2f} ± {std:.2f}"


def render_markdown(table: Any, name: str, rows: list[dict[str, Any]], smoke: bool,
                    orderings: list[dict[str, Any]] | None = None, timing: dict[str, Any] | None = None) -> str:
    """TABLE.md of a table (a TableConfig, or the same keys read back from table.json)."""
    seeds = list(table.get("seeds", []) if isinstance(table, dict | DictConfig) else table.seeds)
    done = sum(r["status"] == "done" for r in rows)
    lines = [f"# {table.title}{' — SMOKE SCALE' if smoke else ''}", ""]
    if smoke:
        lines += ["**Smoke scale** (`scale=smoke`: a few batches of synthetic data, tiny widths): these rows test "
                  "the pipeline and are never compared with the published values.", ""]
    if table.source:
        lines += [f"Published values: {table.source}.", ""]
    lines += [f"`compress-table table={name}{' scale=smoke' if smoke else ''}` — {done} of {len(rows)} rows done.", ""]
    if seeds:
        lines += [f"Every row ran with seeds {', '.join(map(str, seeds))}; values are mean ± sample standard "
                  "deviation over the seeds that finished.", ""]
    hosts = sorted({h for r in rows for h in r.get("hosts", []) if h != "unknown"})
    if hosts:
        lines += [f"Ran on: {'; '.join(hosts)} (from the runs' records).", ""]
    if timing and timing.get("measured"):
        share = timing.get("others_share")
        lines += [f"Timing columns ({', '.join(timing['columns'])}): the timing pass of {timing['date']} on "
                  f"{timing['cpu']}, {timing['threads']} thread(s), median of {timing['rounds']} interleaved rounds"
                  + (f", other processes {100 * share:.1f}% of the CPUs" if share is not None else "") + ".", ""]
    elif timing:
        passable = [c for c in timing["columns"] if c in TIMED_BY_PASS]
        others = [c for c in timing["columns"] if c not in TIMED_BY_PASS]
        if passable:
            lines += [f"Timing columns ({', '.join(passable)}): not measured apart yet (`compress-table table={name} "
                      "... --time` on a quiet machine with the run dirs); the runs' own timings shared the cores and "
                      "are not shown.", ""]
        if others:
            lines += [f"Timing columns ({', '.join(others)}): no timing pass measures them yet; the runs' own timings "
                      "shared the cores and are not shown.", ""]
    compared = [m for m in table.metrics if any(r.get(f"{m}_paper") is not None for r in rows)]
    header = ["row", "experiment"]
    for metric in table.metrics:  # paper and difference columns only where a published value exists
        label = metric_spec(metric)[0]
        header += [f"{label} paper", f"{label} ours", "Δ"] if metric in compared else [label]
    header += ["MACs (M, effective)", "sim latency (ms, b1)", "status", "run dir"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["row"], f"`{r['experiment']}`"]
        for metric in table.metrics:
            ours = _fmt_mean(r[f"{metric}_ours"], r.get(f"{metric}_std"))
            cells += [_fmt(r[f"{metric}_paper"]), ours, _fmt(r[f"{metric}_diff"], -2)] if metric in compared else [ours]
        latency = f"{r['latency_sim_ms']:.3f} ({r['hardware']})" if r["latency_sim_ms"] is not None else "–"
        status = r["status"] + (f" ({r['seeds_done']}/{r['seeds']} seeds)" if seeds else "")
        status += f", code unknown for {r['code_unknown']}" if r.get("code_unknown") else ""
        status += f": {r['error']}" if r["error"] else ""
        cells += [_fmt(r["macs_effective_M"]), latency, status.replace("|", "\\|"), f"`{r['run_dir']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if orderings:
        lines += ["", "Claimed orderings (one rule for every claim: the difference must clear the rows' two stds "
                  "summed — a ≥ claim holds when Δ > s_a + s_b, a within-x claim when |Δ| + s_a + s_b ≤ x; the paired "
                  "verdict uses the std of the per-seed differences; rows from different CPUs or of unknown code "
                  "are not judged):", ""]
        for o in orderings:
            relation = f"|Δ| ≤ {o['within']:g}" if o["within"] is not None else "≥"
            detail = "" if o["delta"] is None else (
                f": {_fmt_mean(o['mean_a'], o['std_a'])} vs {_fmt_mean(o['mean_b'], o['std_b'])}, "
                f"Δ = {o['delta']:+.2f}")
            claim = f" ({o['claim']})" if o["claim"] else ""
            paired = o.get("paired")
            pairing = "" if not paired else (f"; paired over {paired['n']} seeds: Δ = {paired['delta']:+.2f} ± "
                                             f"{paired['std']:.2f} — {paired['verdict']}")
            lines.append(f"* {o['better']} {relation} {o['worse']} on {o['metric']}{claim}{detail} — "
                         f"**{o['verdict']}**{pairing}")
    notes = [f"* {r['row']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Notes:", *notes]
    discussion = table.get("discussion", "") if isinstance(table, dict | DictConfig) else table.discussion
    if discussion:
        lines += ["", str(discussion).strip()]
    return "\n".join(lines) + "\n"


class TableRecords(Callback):
    """Hydra callback: when a table's job ends, write its small record into ``records_dir`` (set by
    compress-table), so a finished run is kept even if the table run is killed before it collects."""

    def __init__(self, records_dir: str | None = None) -> None:
        self.records_dir = records_dir

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not self.records_dir:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        results = _read(run_dir / "results.json")
        if results and results.get("status") == "ok":
            write_record(Path(self.records_dir) / f"{config.hydra.sweep.subdir}.json", results)
