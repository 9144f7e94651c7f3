"""compress-table: table configs, finished rows reused, killed tables completed, force, bad input, and the
two ImageNet paper tables at smoke scale (slow, in `make test-slow`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from compress_run.core.errors import UserError
from compress_run.pipeline.table_cli import run as run_table
from compress_run.pipeline.tables import experiment_names, load_table, metric_spec, table_names
from tests.conftest import read_json, run_cli_forked

TINY_ROWS = [{"name": "magnitude", "experiment": "fmnist_magnitude"},
             {"name": "gmp", "experiment": "fmnist_gmp", "overrides": ["method.sparsity=0.5"]},
             {"name": "dense", "experiment": "fmnist_dense"}]
FAST = ["evaluate.measure_latency=false"]


def compress_table_forked(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """compress-table's main() in a forked child (no second import of torch and Lightning): for the bad-input
    checks that end before any run; test_the_forked_table_cli_matches_the_installed_script checks it is the same."""
    from compress_run.pipeline import table_cli

    return run_cli_forked(args, cwd, timeout=120, entry=table_cli.main, program="compress-table")


def compress_table(args: list[str], cwd: Path, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("compress-table")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          **kw)


def tiny_table(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create({"title": "tiny", "metrics": ["top1", "sparsity"],
                                     "smoke_overrides": ["schedule.train.epochs=1"], "rows": TINY_ROWS}), path)
    return path


def launches(table_dir: Path) -> list[dict]:
    path = table_dir / "launches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("name", table_names())
def test_every_table_config_loads_and_names_real_experiments(name):
    table = load_table(name)
    assert table.rows and table.title and table.source
    assert all(metric_spec(m) is not None for m in table.metrics)
    assert {row.experiment for row in table.rows} <= experiment_names()
    if name in ("gap_imagenet", "rigl_imagenet", "chex_imagenet"):  # every published row has its value
        assert all("top1" in row.paper for row in table.rows)


def test_latency_on_any_profile_is_a_metric():
    label, value = metric_spec("latency_ms/a100")
    assert "a100" in label
    assert value({"latency_sim_ms/a100": 0.25, "latency_sim_ms/host_cpu": 1.5}) == 0.25
    assert metric_spec("latency_ms/") is None or metric_spec("latency_ms/")[1]({}) is None
    assert metric_spec("latency_ms/a100/b8") is None and metric_spec("speed") is None


def test_paper_tables_have_all_their_rows():
    assert len(load_table("gap_imagenet").rows) == 6
    assert len(load_table("rigl_imagenet").rows) == 12
    chex = load_table("chex_imagenet")
    assert len(chex.rows) == 8 and chex.rows[3].paper == {"top1": 77.4, "macs_reduction": 50.0}


@pytest.mark.slow  # an integration test of minutes: in `make test-slow`
def test_rows_are_reused_and_a_killed_table_completes_only_missing_rows(tmp_path):
    table, out = tiny_table(tmp_path), tmp_path / "out"
    args = [f"table={table}", "scale=smoke", f"output_dir={out}", *FAST]
    # start the table, kill it (and its row process) once the first row has finished
    proc = subprocess.Popen([str(Path(sys.executable).with_name("compress-table")), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "rows" / "magnitude" / "results.json"
    deadline = time.time() + 600
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file()
    assert not (out / "rows" / "dense" / "results.json").is_file()
    stamp = first.stat().st_mtime_ns

    done = compress_table(args, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert launches(out)[-1]["rows"] == ["gmp", "dense"] or launches(out)[-1]["rows"] == ["dense"]
    assert first.stat().st_mtime_ns == stamp
    csv_rows = (out / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and all(",done," in line for line in csv_rows[1:])
    text = (out / "TABLE.md").read_text()
    assert "SMOKE SCALE" in text and "3 of 3 rows done" in text
    assert read_json(out / "rows" / "gmp" / "results.json")["metrics"]["model/prunable_sparsity"] == pytest.approx(
        0.5, abs=1e-3)

    before = len(launches(out))
    again = compress_table(args, tmp_path)
    assert again.returncode == 0 and len(launches(out)) == before  # nothing re-run
    assert first.stat().st_mtime_ns == stamp

    forced = compress_table([*args, "force=true"], tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert launches(out)[-1]["rows"] == ["magnitude", "gmp", "dense"]
    replaced = list((out / "replaced").iterdir())  # earlier runs and their records kept, not deleted
    assert sum(p.is_dir() for p in replaced) == 3 and sum(p.suffix == ".json" for p in replaced) == 3
    meta = read_json(out / "table.json")
    assert meta["smoke"] and len(meta["rows"]) == 3 and meta["hosts"]


@pytest.mark.slow  # three smoke rows in parallel, then one again
def test_rows_run_in_parallel_and_a_rerun_reuses_the_finished_ones(tmp_path):
    table, out = tiny_table(tmp_path), tmp_path / "out"
    args = [f"table={table}", "scale=smoke", f"output_dir={out}", *FAST, "hydra/launcher=joblib_local",
            "hydra.launcher.n_jobs=2"]
    first = compress_table(args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert launches(out)[-1]["rows"] == ["magnitude", "gmp", "dense"]
    stamps = {row["name"]: (out / "rows" / row["name"] / "results.json").stat().st_mtime_ns for row in TINY_ROWS}
    shutil.rmtree(out / "rows" / "gmp")
    (out / "records" / "gmp.json").unlink()
    again = compress_table(args, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert launches(out)[-1]["rows"] == ["gmp"]  # the finished rows are not run again, the missing one is
    for name in ("magnitude", "dense"):
        assert (out / "rows" / name / "results.json").stat().st_mtime_ns == stamps[name]
    assert "3 of 3 rows done" in (out / "TABLE.md").read_text()


def test_changed_table_marks_row_stale_and_collect_only_gathers(tmp_path):
    table, out = tiny_table(tmp_path), tmp_path / "out"
    row_dir = out / "rows" / "gmp"
    row_dir.mkdir(parents=True)
    (row_dir / "results.json").write_text(json.dumps({"status": "ok", "overrides": [
        "experiment=fmnist_gmp", "method.sparsity=0.9"], "metrics": {"test/acc": 0.5}}))
    proc = compress_table([f"table={table}", f"output_dir={out}", "--collect"], tmp_path)
    assert proc.returncode == 1
    assert "other overrides" in proc.stdout
    assert not (out / "launches.jsonl").exists()
    status = {line.split(",")[0]: line.split(",")[3] for line in (out / "table.csv").read_text().splitlines()[1:]}
    assert not (out / "records" / "gmp.json").exists()  # a stale run leaves no record
    assert status == {"magnitude": "missing", "gmp": "stale", "dense": "missing"}


@pytest.mark.parametrize(("args", "message"), [
    (["table=nope"], "unknown table 'nope'"),
    (["table=gap_imagenet", "scale=huge"], "scale=huge is not a scale"),
    (["table=gap_imagenet", "--fast"], "unknown flag '--fast'"),
    (["scale=smoke"], "no table given"),
])
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, args, message):
    proc = compress_table_forked(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("compress-table: error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_forked_table_cli_matches_the_installed_script(tmp_path):
    args = ["table=nope"]
    forked, installed = compress_table_forked(args, tmp_path), compress_table(args, tmp_path, timeout=120)
    assert (forked.returncode, forked.stderr) == (installed.returncode, installed.stderr) and forked.returncode == 2


def test_slurm_launcher_config_composes(tmp_path, monkeypatch):
    exe = Path(sys.executable).with_name("compress-run")
    monkeypatch.setenv("COMPRESS_RUN_SLURM_PARTITION", "gpu-a100")  # read by the config's oc.env interpolations
    monkeypatch.setenv("COMPRESS_RUN_SLURM_GPUS", "4")
    env = dict(os.environ)
    proc = subprocess.run([str(exe), "hydra/launcher=slurm", "hydra.launcher.mem_gb=128", "--cfg", "hydra"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    launcher = OmegaConf.create(proc.stdout).hydra.launcher  # its env interpolations resolve on access
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.mem_gb) == ("gpu-a100", 4, 128)


def _smoke_table(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    started = time.time()
    proc = compress_table([f"table={name}", "scale=smoke", f"output_dir={out}", "evaluate.repeats=2"], tmp_path,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = load_table(name).rows
    text = (out / "TABLE.md").read_text()
    assert f"{len(rows)} of {len(rows)} rows done" in text and "SMOKE SCALE" in text
    assert launches(out)[0]["rows"] == [row.name for row in rows]
    print(f"{name} at smoke scale: {time.time() - started:.0f} s")
    shutil.rmtree(out / "rows")  # keep tmp small: the checkpoints of ResNet-scale rows


@pytest.mark.slow
def test_gap_imagenet_table_at_smoke_scale(tmp_path):
    _smoke_table("gap_imagenet", tmp_path)


@pytest.mark.slow
def test_chex_imagenet_table_at_smoke_scale(tmp_path):
    _smoke_table("chex_imagenet", tmp_path)


@pytest.mark.slow  # a multi-run integration test: in `make test-slow`
def test_level_rows_read_one_multilevel_run(tmp_path):
    path, out = tmp_path / "levels.yaml", tmp_path / "out"
    rows = [{"name": "ml_95", "experiment": "fmnist_multilevel", "level": 0.95},
            {"name": "ml_80", "experiment": "fmnist_multilevel", "level": 0.8, "run": "ml_95"},
            {"name": "ml_70", "experiment": "fmnist_multilevel", "level": 0.7, "run": "ml_95"}]
    OmegaConf.save(OmegaConf.create({"title": "levels", "metrics": ["top1", "sparsity"], "rows": rows}), path)
    run_dir = out / "rows" / "ml_95"
    run_dir.mkdir(parents=True)
    levels = [{"level": k, "target_sparsity": s, "sparsity": s, "test/acc": acc, "model/macs_effective": macs}
              for k, (s, acc, macs) in enumerate([(0.95, 0.80, 1e6), (0.8, 0.85, 3e6)])]
    (run_dir / "results.json").write_text(json.dumps({
        "status": "ok", "overrides": ["experiment=fmnist_multilevel"], "levels": levels,
        "metrics": {"test/acc": 0.85, "model/prunable_sparsity": 0.8, "model/macs_dense": 4e6}}))
    proc = compress_table([f"table={path}", f"output_dir={out}", "--collect"], tmp_path)
    assert proc.returncode == 1  # ml_70: the run has no such level
    table = {r["row"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    assert table["ml_95"]["top1_ours"] == pytest.approx(80.0) and table["ml_95"]["sparsity_ours"] == pytest.approx(95.0)
    assert table["ml_80"]["top1_ours"] == pytest.approx(85.0) and table["ml_80"]["macs_effective_M"] == 3.0
    assert table["ml_70"]["status"] == "failed" and "no level 0.7" in table["ml_70"]["error"]
    assert not (out / "rows" / "ml_80").exists() and not (out / "launches.jsonl").exists()
    rows[1]["run"] = "nope"
    OmegaConf.save(OmegaConf.create({"title": "levels", "metrics": ["top1"], "rows": rows}), path)
    bad = compress_table([f"table={path}", f"output_dir={out}", "--collect"], tmp_path)
    assert bad.returncode == 2 and "is not another row" in " ".join(bad.stderr.split())


def _fake_run(run_dir: Path, overrides: list[str], acc: float, seed: int, commit: str | None = "abc",
              host: dict | None = None, extra: dict | None = None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({
        "status": "ok", "overrides": overrides, "seed": seed, "choices": {"method": "magnitude"},
        "finished_at": "2026-12-01T10:00:00+00:00", "git": {"commit": commit, "dirty": False},
        "host": host or {"processor": "AMD EPYC", "cpus": 2},
        "metrics": {"test/acc": acc, "model/prunable_sparsity": 0.9, "model/macs_dense": 4e6,
                    "model/macs_effective": 1e6, "latency_per_layer_unused": 1.0, **(extra or {})},
        "latency_per_layer": {"big": [1, 2, 3]}}))


def seeded_table(tmp_path: Path) -> Path:
    path = tmp_path / "seeded.yaml"
    rows = [{"name": "a", "experiment": "fmnist_gmp"}, {"name": "b", "experiment": "fmnist_magnitude"},
            {"name": "c", "experiment": "fmnist_dense"}]
    orderings = [{"rows": ["a", "b"], "claim": "a beats b"}, {"rows": ["b", "c"]},
                 {"rows": ["a", "c"], "within": 1.0}]
    OmegaConf.save(OmegaConf.create({"title": "seeded", "metrics": ["top1", "sparsity"], "seeds": [0, 1, 2],
                                     "orderings": orderings, "rows": rows}), path)
    return path


def test_seeded_table_reports_mean_std_and_judges_each_ordering(tmp_path):
    out = tmp_path / "out"
    accs = {"a": [0.90, 0.91, 0.92], "b": [0.85, 0.86, 0.84], "c": [0.86, 0.845, 0.87]}
    experiment = {"a": "fmnist_gmp", "b": "fmnist_magnitude", "c": "fmnist_dense"}
    for row, values in accs.items():
        for seed, acc in enumerate(values):
            _fake_run(out / "rows" / row / f"seed{seed}", [f"experiment={experiment[row]}", f"seed={seed}"], acc, seed)
    proc = compress_table([f"table={seeded_table(tmp_path)}", f"output_dir={out}", "--collect"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = read_json(out / "table.json")
    rows = {r["row"]: r for r in meta["rows"]}
    assert rows["a"]["top1_ours"] == pytest.approx(91.0) and rows["a"]["top1_std"] == pytest.approx(1.0)
    assert rows["b"]["top1_std"] == pytest.approx(1.0) and rows["a"]["seeds_done"] == 3
    verdicts = {(o["better"], o["worse"]): o["verdict"] for o in meta["orderings"]}
    assert verdicts[("a", "b")] == "holds (beyond one std)"        # 91 - 85 > 1 + 1
    assert verdicts[("b", "c")] == "not resolved (within one std)"  # 85 vs 85.83 +- 1.25
    assert verdicts[("a", "c")] == "does not hold (beyond one std)"  # |91 - 85.83| - 1 - 1.25 > 1
    text = (out / "TABLE.md").read_text()
    assert "91.00 ± 1.00" in text and "holds (beyond one std)" in text and "a beats b" in text
    assert str(tmp_path) not in text and str(tmp_path) not in (out / "table.json").read_text()  # no machine paths
    assert len((out / "runs.csv").read_text().splitlines()) == 10
    record = read_json(out / "records" / "a" / "seed1.json")  # written for every finished run
    assert record["metrics"]["test/acc"] == 0.91 and "latency_per_layer" not in record


def _judged(tmp_path: Path, accs: dict[str, list[float]], orderings: list[dict], metrics: tuple = ("top1",),
            **run_keys) -> dict:
    out, path = tmp_path / "judged", tmp_path / "judged.yaml"
    rows = [{"name": n, "experiment": "fmnist_dense", "overrides": [f"method.sparsity={i / 10}"]}
            for i, n in enumerate(accs)]
    OmegaConf.save(OmegaConf.create({"title": "judged", "metrics": list(metrics), "seeds": [0, 1, 2],
                                     "orderings": orderings, "rows": rows,
                                     "unknown_code": run_keys.pop("unknown_code", "")}), path)
    for i, (row, values) in enumerate(accs.items()):
        for seed, acc in enumerate(values):
            keys = {k: v(row, seed) for k, v in run_keys.items()}
            _fake_run(out / "rows" / row / f"seed{seed}", ["experiment=fmnist_dense", f"method.sparsity={i / 10}",
                                                           f"seed={seed}"], acc, seed, **keys)
    try:  # in-process: the collect path starts no run
        run_table([f"table={path}", f"output_dir={out}", f"records={tmp_path / 'records'}", "--collect"],
                  Console(file=io.StringIO()))
        error = None
    except UserError as exc:
        error = exc.paragraph()
    shutil.rmtree(out / "rows")
    shutil.rmtree(tmp_path / "records", ignore_errors=True)
    return {"error": error, "meta": read_json(out / "table.json") if error is None else None}


def test_one_rule_for_every_claim_paired_seeds_hosts_and_unknown_code(tmp_path):
    # within 1.0: the means differ by 0.5, but the stds (0.5 each) put the band past the bound
    accs = {"a": [0.900, 0.905, 0.910], "b": [0.893, 0.899, 0.905]}
    within = _judged(tmp_path, {"a": [0.900, 0.905, 0.910], "b": [0.895, 0.900, 0.905]},
                     [{"rows": ["a", "b"], "within": 1.0}])["meta"]["orderings"][0]
    assert within["delta"] == pytest.approx(0.5) and within["verdict"] == "not resolved (within one std)"
    # the rows' stds (0.5, 0.6) hide a difference the paired seeds show: +0.7, +0.6, +0.5
    claim = _judged(tmp_path, accs, [{"rows": ["a", "b"]}])["meta"]["orderings"][0]
    assert claim["verdict"] == "not resolved (within one std)"
    assert claim["paired"]["n"] == 3 and claim["paired"]["delta"] == pytest.approx(0.6)
    assert claim["paired"]["std"] == pytest.approx(0.1) and claim["paired"]["verdict"] == "holds (beyond one std)"
    # rows on two CPUs are not compared; a run without a commit is refused, or kept out of the claims
    intel = {"processor": "Intel Xeon", "cpus": 2}
    hosts = _judged(tmp_path, {"a": [0.95] * 3, "b": [0.80] * 3}, [{"rows": ["a", "b"]}],
                    host=lambda row, seed: intel if row == "b" else None)["meta"]
    assert hosts["orderings"][0]["verdict"] == "not resolved (hosts differ: AMD EPYC vs Intel Xeon)"
    assert hosts["cpus"] == {"AMD EPYC": 3, "Intel Xeon": 3}
    refused = _judged(tmp_path, {"a": [0.95] * 3, "b": [0.80] * 3}, [{"rows": ["a", "b"]}],
                      commit=lambda row, seed: None if (row, seed) == ("b", 1) else "abc")["error"]
    assert "b/seed1" in refused and "unknown_code" in refused
    allowed = _judged(tmp_path, {"a": [0.95] * 3, "b": [0.80] * 3}, [{"rows": ["a", "b"]}],
                      commit=lambda row, seed: None if (row, seed) == ("b", 1) else "abc",
                      unknown_code="runs from an installed copy before commits were stamped")["meta"]
    assert allowed["orderings"][0]["verdict"] == "not judged (code unknown for 1 run(s))"
    assert allowed["code_unknown"] == ["b/seed1"] and allowed["commits"] == ["abc"]
    assert allowed["command"].endswith("--collect") and "records=" in allowed["command"]
    # training CPU time compares only runs of one commit; top-1 across commits is judged
    across = [{"rows": ["a", "b"]}, {"rows": ["a", "b"], "metric": "train_cpu_s"}]
    timed = _judged(tmp_path, {"a": [0.95] * 3, "b": [0.80] * 3}, across, metrics=["top1", "train_cpu_s"],
                    commit=lambda row, seed: "def" if row == "b" else "abc",
                    extra=lambda row, seed: {"time/train_s": 9.0, "time/train_cpu_s": 5.0 if row == "a" else 9.0})
    verdicts = [o["verdict"] for o in timed["meta"]["orderings"]]
    assert verdicts == ["holds (beyond one std)", "not resolved (training time from 2 commits)"]


def test_force_unknown_code_selects_only_the_runs_without_a_commit(tmp_path):
    out, path = tmp_path / "out", tmp_path / "t.yaml"
    OmegaConf.save(OmegaConf.create({"title": "t", "metrics": ["top1"], "seeds": [0, 1], "unknown_code": "old runs",
                                     "rows": [{"name": "a", "experiment": "fmnist_dense"}]}), path)
    for seed in (0, 1):
        _fake_run(out / "rows" / "a" / f"seed{seed}", ["experiment=fmnist_dense", f"seed={seed}"], 0.9, seed,
                  commit=None if seed == 1 else "abc")
    printed = io.StringIO()
    run_table([f"table={path}", f"output_dir={out}", "force=unknown_code", "--collect"], Console(file=printed))
    assert "1 runs not done (a/seed1)" in " ".join(printed.getvalue().split())
    bad = compress_table_forked([f"table={path}", f"output_dir={out}", "force=maybe"], tmp_path)
    assert bad.returncode == 2 and "force=unknown_code" in " ".join(bad.stderr.split())


@pytest.mark.slow  # a multi-run integration test: CI runs it in its slow set (Makefile CI_SLOW_TESTS)
def test_a_table_is_rebuilt_from_its_records_alone_and_runs_only_what_has_none(tmp_path):
    out, records = tmp_path / "out", tmp_path / "records"
    table = seeded_table(tmp_path)
    experiment = {"a": "fmnist_gmp", "b": "fmnist_magnitude", "c": "fmnist_dense"}
    for row in ("a", "b", "c"):
        for seed in (0, 1, 2):
            if (row, seed) != ("c", 2):
                _fake_run(out / "rows" / row / f"seed{seed}", [f"experiment={experiment[row]}", f"seed={seed}"],
                          0.8, seed)
    first = compress_table([f"table={table}", f"output_dir={out}", f"records={records}", "--collect"], tmp_path)
    assert first.returncode == 1 and "c/seed2" in first.stdout
    assert len(list(records.rglob("*.json"))) == 8
    shutil.rmtree(out)  # a fresh machine: only the committed records are left
    again = compress_table([f"table={table}", f"output_dir={out}", f"records={records}", "--collect"], tmp_path)
    assert again.returncode == 1
    runs = {(r["row"], r["seed"]): r for r in read_json(out / "table.json")["runs"]}
    assert runs[("a", 0)]["status"] == "done" and runs[("a", 0)]["source"] == "record"
    assert runs[("c", 2)]["status"] == "missing"
    assert read_json(out / "table.json")["rows"][2]["status"] == "partial"


@pytest.mark.slow  # a multi-run integration test: CI runs it in its slow set (Makefile CI_SLOW_TESTS)
def test_seeded_rows_run_once_per_seed_and_leave_records(tmp_path):
    path, out = tmp_path / "one.yaml", tmp_path / "out"
    OmegaConf.save(OmegaConf.create({"title": "one", "metrics": ["top1"], "seeds": [3, 4],
                                     "smoke_overrides": ["schedule.train.epochs=1"],
                                     "rows": [{"name": "dense", "experiment": "fmnist_dense"}]}), path)
    proc = compress_table([f"table={path}", "scale=smoke", f"output_dir={out}", *FAST], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for seed in (3, 4):
        assert read_json(out / "rows" / "dense" / f"seed{seed}" / "results.json")["seed"] == seed
        assert read_json(out / "records" / "dense" / f"seed{seed}.json")["seed"] == seed
    assert read_json(out / "table.json")["rows"][0]["seeds_done"] == 2


@pytest.mark.slow  # a multi-run integration test: in `make test-slow`
def test_rows_share_a_train_stage_through_train_from(tmp_path):
    path, out = tmp_path / "shared.yaml", tmp_path / "out"
    rows = [{"name": "svd", "experiment": "fmnist_svd", "train_from": "magnitude"},
            {"name": "magnitude", "experiment": "fmnist_magnitude"}]
    OmegaConf.save(OmegaConf.create({"title": "shared", "metrics": ["top1"], "seeds": [0, 1], "rows": rows}), path)
    proc = compress_table([f"table={path}", "scale=smoke", f"output_dir={out}", *FAST], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [launch["rows"] for launch in launches(out)] == [["magnitude/seed0", "magnitude/seed1"],
                                                             ["svd/seed0", "svd/seed1"]]  # the source first
    for seed in (0, 1):
        source = json.loads((out / "rows" / "magnitude" / f"seed{seed}" / "stages" / "train.json").read_text())
        train = json.loads((out / "rows" / "svd" / f"seed{seed}" / "stages" / "train.json").read_text())
        assert train["taken_from"] == str(out / "rows" / "magnitude" / f"seed{seed}")  # its own seed's network
        assert train["metrics"] == source["metrics"]
        assert json.loads((out / "rows" / "svd" / f"seed{seed}" / "stages" / "compress.json").read_text())["status"] \
            == "done"


def test_committed_results_carry_no_path_of_the_machine_that_made_them():
    from tests.conftest import REPO

    files = [REPO / "RESULTS.md", *(REPO / "docs").rglob("*.md"), *(REPO / "docs").rglob("*.json"),
             *(REPO / "docs").rglob("*.csv"), *(REPO / "bench_results").rglob("*.json")]
    for path in files:
        text = path.read_text()
        for marker in ("/work/", "/home/", "/root/", "/tmp/", "/Users/"):
            assert marker not in text, f"{path.relative_to(REPO)} holds a machine path ({marker}...)"


@pytest.mark.parametrize(("change", "message"), [
    ({"orderings": [{"rows": ["a", "nope"]}]}, "unknown rows ['nope']"),
    ({"orderings": [{"rows": ["a", "b"], "metric": "latency_ms"}]}, "a metric the table does not have"),
    ({"seeds": [0, 0]}, "repeat a seed"),
    ({"rows": [{"name": "a", "experiment": "fmnist_svd", "train_from": "nope"},
               {"name": "b", "experiment": "fmnist_magnitude"}]}, "train_from 'nope' is not another row"),
    ({"rows": [{"name": "a", "experiment": "fmnist_svd", "train_from": "b"},
               {"name": "b", "experiment": "fmnist_magnitude", "train_from": "a"}]},
     "train_from 'b' is not another row that runs its own training"),
    ({"rows": [{"name": "a", "experiment": "fmnist_gmp", "overrides": ["seed=3"]},
               {"name": "b", "experiment": "fmnist_magnitude"}, {"name": "c", "experiment": "fmnist_dense"}]},
     "a seed override in a table with seeds"),
])
def test_bad_seeds_and_orderings_are_refused(tmp_path, change, message):
    path = seeded_table(tmp_path)
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(path), OmegaConf.create(change)), path)
    proc = compress_table_forked([f"table={path}", f"output_dir={tmp_path / 'out'}", "--collect"], tmp_path)
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr[-2000:]


@pytest.mark.slow  # a multi-run integration test: in `make test-slow`
def test_quantized_rows_take_over_their_base_rows_trained_network(tmp_path):
    path, out = tmp_path / "quant.yaml", tmp_path / "out"
    rows = [{"name": "fp32", "experiment": "fmnist_magnitude"},
            {"name": "w8a8", "experiment": "fmnist_magnitude", "base": "fp32",
             "overrides": ["quant=w8a8", "quant.calib_size=64"]},
            {"name": "qat", "experiment": "fmnist_magnitude", "base": "fp32",
             "overrides": ["quant=qat_w4a8", "quant.calib_size=64", "quant.epochs=1"]}]
    OmegaConf.save(OmegaConf.create({"title": "quant", "metrics": ["top1", "weight_kb", "int8_top1"],
                                     "rows": rows}), path)
    proc = compress_table([f"table={path}", "scale=smoke", f"output_dir={out}", *FAST], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [launch["rows"] for launch in launches(out)] == [["fp32"], ["w8a8", "qat"]]  # the base first
    base_train = json.loads((out / "rows" / "fp32" / "stages" / "train.json").read_text())
    for name in ("w8a8", "qat"):
        train = json.loads((out / "rows" / name / "stages" / "train.json").read_text())
        assert train["taken_from"] == str(out / "rows" / "fp32")  # trained once, not again
        assert train["metrics"] == base_train["metrics"]
        assert (out / "rows" / name / "stages" / "quantize.json").is_file()
    record = json.loads((out / "records" / "w8a8.json").read_text())
    assert not any(o.startswith("start_from=") for o in record["overrides"])  # no path of this machine
    table = {r["row"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    # CSR: 1 + 2 index bytes per int8 weight against 4 + 2 per float one, plus row pointers and scales
    assert table["w8a8"]["weight_kb_ours"] < 0.7 * table["fp32"]["weight_kb_ours"]
    rows[1]["overrides"] = ["quant=w8a8", "method.sparsity=0.5"]  # not a quantization of the base row any more
    OmegaConf.save(OmegaConf.create({"title": "quant", "metrics": ["top1"], "rows": rows}), path)
    bad = compress_table([f"table={path}", f"output_dir={out}", "--collect"], tmp_path)
    assert bad.returncode == 2 and "differ from this row's only in quant" in " ".join(bad.stderr.split())


def test_two_tables_launched_in_the_same_second_keep_their_own_jobs(tmp_path, monkeypatch):
    """Two compress-table processes sharing a table dir (e.g. two tables into one output_dir) once read each
    other's jobs file when they launched in the same second; each launch must run the rows it asked for."""
    from compress_run.pipeline import table_cli
    commands: list[list[str]] = []
    monkeypatch.setattr(table_cli.time, "strftime", lambda *a: "20261203-021532")
    monkeypatch.setattr(table_cli.subprocess, "run",
                        lambda command, check: commands.append(command) or subprocess.CompletedProcess(command, 0))
    table = load_table(str(tiny_table(tmp_path)))
    for row in table.rows[:2]:
        assert table_cli.launch(table, [(row, None)], tmp_path / "out", tmp_path / "records", True, []) == 0
    files = [Path(arg.split("=", 1)[1]) for command in commands for arg in command
             if arg.startswith("hydra.sweeper.jobs_file=")]
    assert len(set(files)) == 2
    subdirs = [[arg for arg in OmegaConf.load(path)[0] if arg.startswith("hydra.sweep.subdir=")] for path in files]
    assert subdirs == [["hydra.sweep.subdir=magnitude"], ["hydra.sweep.subdir=gmp"]]
