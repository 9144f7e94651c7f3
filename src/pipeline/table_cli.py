"""``compress-table``: run the missing rows of a paper table, then write ``TABLE.md`` and ``table.csv``.

    compress-table table=gap_imagenet dataset.root=/data/imagenet        # run what is missing, then tabulate
    compress-table table=gap_imagenet scale=smoke                         # every row at smoke scale (minutes)
    compress-table table=gap_imagenet --collect                           # only gather finished rows
    compress-table table=chex_imagenet hydra/launcher=joblib hydra.launcher.n_jobs=2   # rows in parallel
    compress-table table=gap_imagenet hydra/launcher=slurm                # one SLURM job per row (submitit)

    compress-table table=fmnist_sparse records=docs/records/fmnist_small --collect   # rebuild from records
    compress-table table=fmnist_vit_block --time        # time the finished runs apart, on a quiet machine

Options (key=value): ``table`` (a conf/table option or a YAML path), ``scale`` (full | smoke),
``force`` (false: finished rows are reused; true: they are moved to ``replaced/`` and run again;
unknown_code: only the finished runs whose record names no commit),
``plot`` (false; true writes the Pareto figures next to the table), ``output_dir`` (default
``logs/tables/<table>``, ``logs/tables/<table>-smoke`` at smoke scale), ``records`` (default
``<output_dir>/records``: where every finished run's small record is written as it completes, and read
from when its run dir is gone). Every other ``key=value`` goes to each row's compress-run (launcher,
dataset root, trainer settings). Runs (rows, times seeds for a table with ``seeds``) go as one Hydra
multirun with the rows sweeper (``hydra_plugins.compress_run_rows``), each in ``<output_dir>/rows/<row>``
(``rows/<row>/seed<s>``); a killed table is completed by running the same command again (unfinished
runs resume from their checkpoints, runs with a record are not run again).
``--time`` (implies ``--collect``): the timing pass (:mod:`compress_run.pipeline.timing`) — every finished run
whose run dir is here, rebuilt and timed in ``time_rounds`` (5) interleaved rounds, refused when other processes
use more than ``time_max_load`` (0.05) of the CPUs; the table's timing columns come from it alone.
Exit status: 0 when every row is done, 1 when a row failed or is still missing, 2 for bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from compress_run.core.errors import EXIT_BAD_INPUT, UserError
from compress_run.pipeline.checkpoints import atomic_write_text
from compress_run.pipeline.tables import (
    TIMING_COLUMNS,
    TableConfig,
    TableRow,
    launched_runs,
    load_table,
    record_path,
    row_overrides,
    run_dir_of,
    run_key,
    run_state,
    source_row,
    start_from,
    write_table,
)

OPTIONS = {"table": None, "scale": "full", "force": "false", "plot": "false", "output_dir": None, "records": None,
           "time_rounds": "5", "time_max_load": "0.05"}


def parse_args(argv: list[str]) -> tuple[dict[str, str | None], list[str], bool, bool]:
    options, passthrough, collect, timing = dict(OPTIONS), [], False, False
    for arg in argv:
        if arg == "--collect":
            collect = True
        elif arg == "--time":
            collect = timing = True
        elif arg.startswith("-"):
            raise UserError(f"unknown flag '{arg}'", "the only flags are --collect, --time and --help; options are "
                            "key=value (table=, scale=, force=, plot=, output_dir=, records=, time_rounds=, "
                            "time_max_load=)")
        elif "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value", "write e.g. table=gap_imagenet scale=smoke")
        else:
            key, _, value = arg.partition("=")
            if key in options:
                options[key] = value
            else:
                passthrough.append(arg)
    if not options["table"]:
        raise UserError("no table given", "add table=<name>; the tables are the files of conf/table/")
    if options["scale"] not in ("full", "smoke"):
        raise UserError(f"scale={options['scale']} is not a scale", "use scale=full (default) or scale=smoke")
    if str(options["force"]).lower() not in ("true", "false", "unknown_code"):
        raise UserError(f"force={options['force']} is not a choice", "use force=false (default), force=true (run every "
                        "finished run again) or force=unknown_code (only the runs whose record names no commit)")
    if str(options["plot"]).lower() not in ("true", "false"):
        raise UserError(f"plot={options['plot']} is not a boolean", "use plot=true or plot=false")
    try:
        rounds, max_load = int(str(options["time_rounds"])), float(str(options["time_max_load"]))
    except ValueError:
        rounds, max_load = 0, -1.0
    if rounds < 1 or not 0.0 <= max_load <= 1.0:
        raise UserError(f"time_rounds={options['time_rounds']} / time_max_load={options['time_max_load']} out of "
                        "range", "use time_rounds=<an integer >= 1> and time_max_load=<a share of the CPUs in [0, 1]>")
    return options, passthrough, collect, timing


def launch(table: TableConfig, todo: list[tuple[TableRow, int | None]], table_dir: Path, records_dir: Path,
           smoke: bool, passthrough: list[str]) -> int:
    """Run the (row, seed) runs as one multirun of compress-run; returns its exit code."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs = [[*row_overrides(table, row, smoke, seed), *start_from(table, table_dir, row, seed),
             f"hydra.sweep.subdir={run_key(row.name, seed)}"] for row, seed in todo]
    names = [run_key(row.name, seed) for row, seed in todo]
    (table_dir / "jobs").mkdir(parents=True, exist_ok=True)
    # a name of its own even when another compress-table launches into this table dir in the same second
    handle, name = tempfile.mkstemp(prefix=f"{stamp}-", suffix=".yaml", dir=table_dir / "jobs")
    os.close(handle)
    jobs_file = Path(name)
    atomic_write_text(jobs_file, OmegaConf.to_yaml(OmegaConf.create(jobs)))
    command = [sys.executable, "-m", "compress_run.pipeline.cli", "-m", "hydra/sweeper=rows",
               f"hydra.sweeper.jobs_file={jobs_file}", f"hydra.sweep.dir={table_dir / 'rows'}",
               f"hydra.callbacks.table_records.records_dir={records_dir}", *passthrough]
    started = time.time()
    code = subprocess.run(command, check=False).returncode
    with open(table_dir / "launches.jsonl", "a") as log:  # one line per launch: which rows ran, how it ended
        log.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                              "seconds": round(time.time() - started, 1), "rows": names, "returncode": code,
                              "command": command}) + "\n")
    return code


def run(argv: list[str], console: Console) -> int:
    options, passthrough, collect, timing = parse_args(argv)
    name, smoke = str(options["table"]), options["scale"] == "smoke"
    table = load_table(name)
    name = Path(name).stem
    table_dir = Path(options["output_dir"] or f"logs/tables/{name}{'-smoke' if smoke else ''}").absolute()
    records_dir = Path(options["records"]).absolute() if options["records"] else table_dir / "records"
    runs = launched_runs(table)
    found = {run_key(row.name, seed): run_state(run_dir_of(table_dir, row, seed), record_path(records_dir, row, seed),
                                                row_overrides(table, row, smoke, seed))
             for row, seed in runs}
    states = {key: state for key, (state, _, _) in found.items()}
    unknown_code = {key for key, (state, results, _) in found.items()
                    if state == "done" and not (results.get("git") or {}).get("commit")}
    force_all = str(options["force"]).lower() == "true"
    force_unknown = str(options["force"]).lower() == "unknown_code"

    def forced(key: str) -> bool:
        return (force_all and states[key] in ("done", "stale")) or (force_unknown and key in unknown_code)

    todo = [(row, seed) for row, seed in runs
            if states[run_key(row.name, seed)] in ("missing", "failed") or forced(run_key(row.name, seed))]
    stale = [key for key, s in states.items() if s == "stale" and not force_all]
    bad_input = False
    console.print(f"[bold]{table.title}[/bold]{' (smoke scale)' if smoke else ''}: {len(table.rows)} rows "
                  f"({len(states)} runs), {sum(s == 'done' for s in states.values())} runs done; "
                  f"table dir {table_dir}")
    for key in stale:
        console.print(f"[yellow]run {key}: its run dir (or record) holds a run with other overrides than the table "
                      "now asks for; it is left as it is (force=true moves it to replaced/ and runs it again)")
    todo_names = [run_key(row.name, seed) for row, seed in todo]
    if todo and not collect:
        table_dir.mkdir(parents=True, exist_ok=True)
        for row, seed in todo:
            key = run_key(row.name, seed)
            if forced(key):
                stamp = time.strftime('%Y%m%d-%H%M%S')
                for source in (run_dir_of(table_dir, row, seed), record_path(records_dir, row, seed)):
                    if source.exists():
                        target = table_dir / "replaced" / f"{key.replace('/', '-')}-{stamp}{source.suffix}"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(str(source), str(target))
                        console.print(f"run {key}: earlier {source.name} moved to {target}")
        console.print(f"running {len(todo)} of {len(states)} runs: {', '.join(todo_names)}")
        # rows with a base or train_from row run after it, so they take over its finished stages
        pending = {(r.name, s) for r, s in todo}
        first = [(row, seed) for row, seed in todo
                 if (source := source_row(table, row)) is None or (source.name, seed) not in pending]
        second = [run for run in todo if run not in first]
        for batch in (first, second):
            if batch and launch(table, batch, table_dir, records_dir, smoke, passthrough) == EXIT_BAD_INPUT:
                bad_input = True
    elif collect and todo:
        console.print(f"--collect: {len(todo)} runs not done ({', '.join(todo_names)}); not running them")
    table_dir.mkdir(parents=True, exist_ok=True)
    if timing:
        time_table(table, table_dir, records_dir, smoke, int(str(options["time_rounds"])),
                   float(str(options["time_max_load"])), console)
    rows = write_table(table, name, table_dir, smoke, records_dir)
    summarize(rows, console)
    if str(options["plot"]).lower() == "true":
        from compress_run.pipeline.plots import plot_pareto

        done = [r for r in rows if r["status"] == "done"]
        png = plot_pareto(done, table_dir / "pareto", title=table.title + (" (smoke)" if smoke else ""))
        console.print(f"Pareto figures: {png}")
    console.print(f"table: {table_dir / 'TABLE.md'} and {table_dir / 'table.csv'}; records: {records_dir}")
    if bad_input:  # every job that failed was rejected as bad input (its paragraph is printed above)
        return EXIT_BAD_INPUT
    return 0 if all(r["status"] == "done" for r in rows) else 1


def time_table(table: TableConfig, table_dir: Path, records_dir: Path, smoke: bool, rounds: int, max_load: float,
               console: Console) -> None:
    """The timing pass: every finished run whose run dir is here, timed apart (:mod:`compress_run.pipeline.timing`);
    timing.json goes into the table dir and beside the records."""
    from compress_run.pipeline.timing import time_runs

    if not set(table.metrics) & set(TIMING_COLUMNS):
        raise UserError(f"table {table.title!r} has no timing column ({', '.join(TIMING_COLUMNS)})",
                        "time a table whose metrics include host_ms or host_decode_tok_s")
    run_dirs = {run_key(row.name, seed): run_dir_of(table_dir, row, seed) for row, seed in launched_runs(table)
                if run_state(run_dir_of(table_dir, row, seed), None, row_overrides(table, row, smoke, seed))[0]
                == "done"}  # finished and made with the table's settings: not a failed or stale run
    missing = [key for row, seed in launched_runs(table) if (key := run_key(row.name, seed)) not in run_dirs]
    if not run_dirs:
        raise UserError(f"no finished run dir of the table under {table_dir / 'rows'}",
                        "the timing pass rebuilds each run's network from its run dir: run the table here first")
    if missing:
        console.print(f"[yellow]timing: {len(missing)} runs have no run dir here and are not timed: "
                      f"{', '.join(missing)}")
    console.print(f"timing {len(run_dirs)} runs, {rounds} interleaved rounds")
    timing = time_runs(run_dirs, rounds, max_load, console)
    text = json.dumps(timing, indent=1) + "\n"
    for folder in (table_dir, records_dir):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "timing.json", text)


def summarize(rows: list[dict], console: Console) -> None:
    metric_keys = [k[:-5] for k in rows[0] if k.endswith("_ours")] if rows else []
    view = Table(title="rows (ours / paper)", title_justify="left")
    for col in ["row", "status", *metric_keys, "MACs (M)", "sim ms"]:
        view.add_column(col, justify="left" if col in ("row", "status") else "right")

    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "–" if value is None else format(value, spec)

    def ours(r: dict, m: str) -> str:
        std = r.get(f"{m}_std")
        return fmt(r[f"{m}_ours"]) + ("" if std is None else f" ± {std:.2f}")

    for r in rows:
        pairs = [f"{ours(r, m)} / {fmt(r[f'{m}_paper'])}" for m in metric_keys]
        status = r["status"] + (f" {r['seeds_done']}/{r['seeds']}" if r["seeds"] > 1 else "")
        view.add_row(r["row"], status, *pairs, fmt(r["macs_effective_M"]), fmt(r["latency_sim_ms"], ".3f"))
    console.print(view)


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    console = Console()
    try:
        code = run(sys.argv[1:], console)
    except UserError as exc:
        print(exc.paragraph().replace("compress-run:", "compress-table:", 1), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code)


if __name__ == "__main__":
    main()
