#!/usr/bin/env python
"""Fault matrix: SIGKILL a run at a random moment, run the same command again, and compare with an uninterrupted run.

    python scripts/fault_matrix.py            # 5 method families x 4 trials: bench_results/fault_matrix.json
    python scripts/fault_matrix.py --quick    # 2 families x 1 trial, nothing written (the CI slow test)
    python scripts/fault_matrix.py --trainer ddp_cpu --family "sparse training (GMP)"  # two gloo processes

For each method family (sparse training: GMP; channel pruning: L1 filter pruning with compaction; low rank: SVD;
patterns: 2:4 magnitude; multi-level) one uninterrupted reference run is timed stage by stage (when each stage's
record appears); the trials aim at the stages it ran in turn (train, finetune, compress, evaluate, ...): each
starts the same command and kills its whole process group with SIGKILL at a random moment (seeded) of the aimed
stage, drawn from the first 90% of that stage's duration in the reference and counted from the moment the trial
itself began the stage (it watches its run's records) — in training steps, checkpoint writes, compression,
evaluation — notes the stage the run was really in (a stage may be faster than in the reference), and reruns the
same command until it exits (a rerun may itself be killed when ``--kills`` > 1; its records already exist, so
its kill counts from its start). A trial survives when the rerun exits 0 and its
test/val metrics and every tensor of its final checkpoint are bit-identical to the reference (deterministic CPU
trainer, digits data, 8 + 2 epochs). Anything else is counted as lost, with the reason. A run that ended before
its kill is reported as such ("finished"): that trial tested nothing. ``--trainer ddp_cpu`` runs every run as
two gloo processes (the kill takes the spawned ranks with it): bit-exact resume of distributed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from results_benchmarks import fault_counts, fault_verdict  # a module beside this script
from rich.console import Console
from rich.table import Table

from compress_run.hardware.measure import machine_description
from compress_run.pipeline.checkpoints import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["dataset=digits", "schedule=fmnist", "schedule.batch_size=64", "schedule.train.epochs=8",
          "schedule.finetune.epochs=2", "logger=csv", "trainer.deterministic=true",
          "evaluate.measure_latency=false"]
FAMILIES = {
    "sparse training (GMP)": ["method=gmp", "method.frequency=3", "method.sparsity=0.8"],
    "channel (L1 filter, compacted)": ["method=l1_filter", "method.sparsity=0.5"],
    "low rank (SVD)": ["method=svd"],
    "pattern (2:4 magnitude)": ["method=magnitude", "method.pattern=nm:2:4", "method.sparsity=0.5"],
    "multi-level": ["method=multilevel", "method.levels=[0.9,0.7,0.5]", "schedule.finetune.epochs=3"],
}
QUICK = ("sparse training (GMP)", "channel (L1 filter, compacted)")
METRICS = ("test/acc", "test/loss", "val/acc", "val/loss")
STAGES = ("train", "compress", "finetune", "quantize", "evaluate")
TARGET_ORDER = ("train", "finetune", "compress", "evaluate", "quantize")  # trials aim at these in turn


def command(args: list[str], out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("compress-run")
    return [str(exe) if exe.exists() else "compress-run", *args, f"output_dir={out}"]


def run_to_end(args: list[str], out: Path, cwd: Path) -> tuple[int, float]:
    started = time.perf_counter()
    proc = subprocess.run(command(args, out), cwd=cwd, capture_output=True, text=True, timeout=1800)
    return proc.returncode, time.perf_counter() - started


def timed_reference(args: list[str], out: Path, cwd: Path) -> tuple[int, dict[str, tuple[float, float]]]:
    """Run to the end, watching when each stage's record appears: (exit code, {stage: (start s, end s)}) for the
    stages that ran (a stage starts when the one before it ended; train when run.json appeared)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command(args, out), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    while proc.poll() is None or len(seen) < len(STAGES) + 1:
        now = time.perf_counter() - started
        for name in ("run", *STAGES):
            path = out / "run.json" if name == "run" else out / "stages" / f"{name}.json"
            if name not in seen and path.is_file():
                seen[name] = now
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    windows, start = {}, seen.get("run", 0.0)
    for stage in STAGES:
        if stage not in seen:
            continue
        record = json.loads((out / "stages" / f"{stage}.json").read_text())
        if record.get("status") == "done":
            windows[stage] = (start, seen[stage])
        start = seen[stage]
    return proc.returncode, windows


def started(out: Path, stage: str) -> bool:
    """Whether a run in ``out`` has begun ``stage`` (train: once run.json exists; a later stage: once the stage
    before it left its record, done or skipped)."""
    index = STAGES.index(stage)
    return (out / "run.json").is_file() if index == 0 else (out / "stages" / f"{STAGES[index - 1]}.json").is_file()


def killed_in(args: list[str], out: Path, cwd: Path, stage: str, delay: float) -> str:
    """Start the run, SIGKILL its process group ``delay`` seconds after it began ``stage``; the stage it was really
    in ("start-up", a stage, "results": writing results.json, "finished": it ended first)."""
    proc = subprocess.Popen(command(args, out), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.perf_counter() + 1800
    while not started(out, stage) and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    try:
        proc.wait(timeout=delay)
        return "finished"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not (out / "run.json").is_file():
        return "start-up"
    finished = {s for s in STAGES if (out / "stages" / f"{s}.json").is_file()}
    return next((s for s in STAGES if s not in finished), "results")


def final_state(out: Path) -> dict[str, Any]:
    for stage in ("quantize", "finetune", "compress", "train"):
        path = out / "checkpoints" / f"{stage}.ckpt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {}


def compare(reference: Path, out: Path) -> str | None:
    """None when the rerun's metrics and final weights equal the reference's, else what differs."""
    results = out / "results.json"
    if not results.is_file():
        return "no results.json"
    ref, ours = json.loads((reference / "results.json").read_text()), json.loads(results.read_text())
    for key in METRICS:
        if ref["metrics"].get(key) != ours["metrics"].get(key):
            return f"{key}: {ref['metrics'].get(key)} -> {ours['metrics'].get(key)}"
    a, b = final_state(reference), final_state(out)
    if a.keys() != b.keys():
        return "final checkpoint holds other tensors"
    for key in a:
        same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        if not same:
            return f"final weights differ ({key})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=4, help="trials per family")
    parser.add_argument("--kills", type=int, default=1, help="kills per trial (each rerun but the last is killed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", default="cpu", help="trainer config of every run (ddp_cpu: two processes)")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only these families")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "fault_matrix.json")
    args = parser.parse_args()
    families = tuple(args.family) if args.family else QUICK if args.quick else tuple(FAMILIES)
    trials = 1 if args.quick else args.trials
    rng, console, rows = random.Random(args.seed), Console(), []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for family in families:
            run_args = [*COMMON, f"trainer={args.trainer}", *FAMILIES[family]]
            reference = work / f"{len(rows)}-reference"
            code, windows = timed_reference(run_args, reference, work)
            if code != 0:
                raise SystemExit(f"{family}: the uninterrupted reference run failed (exit {code})")
            targets = [stage for stage in TARGET_ORDER if stage in windows]
            wall = max(end for _, end in windows.values())
            for trial in range(trials):
                out, kills = work / f"{len(rows)}-{trial}", []
                for kill in range(args.kills):
                    aimed = targets[(trial * args.kills + kill) % len(targets)]
                    begin, end = windows[aimed]
                    delay = rng.uniform(0.0, 0.9) * (end - begin)
                    kills.append({"aimed_at": aimed, "after_stage_began_s": round(delay, 3),
                                  "stage": killed_in(run_args, out, work, aimed, delay)})
                code, _ = run_to_end(run_args, out, work)
                lost = f"rerun exited {code}" if code != 0 else compare(reference, out)
                rows.append({"family": family, "trial": trial, "reference_s": round(wall, 1),
                             "reference_stages_s": {k: [round(a, 2), round(b, 2)] for k, (a, b) in windows.items()},
                             "kills": kills,
                             "survived": lost is None, "lost": lost})
                console.log(f"{family} trial {trial}: killed in {', '.join(str(k['stage']) for k in kills)} -> "
                            f"{'identical to the uninterrupted run' if lost is None else 'LOST: ' + lost}")
                shutil.rmtree(out, ignore_errors=True)
    table = Table(title="fault matrix: SIGKILL at a random moment, then the same command again")
    for col in ("family", "trials", "stages hit", "killed, survived", "lost"):
        table.add_column(col, justify="left" if col in ("family", "stages hit") else "right")
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        hit = sorted({str(k["stage"]) for r in mine for k in r["kills"]}, key=lambda s: (s not in STAGES, s))
        counts = fault_counts(mine)
        table.add_row(family, str(counts["trials"]), ", ".join(hit), str(counts["survived"]), str(counts["lost"]))
    console.print(table)
    totals = fault_counts(rows)
    console.print(fault_verdict(totals, bold=False))
    if not args.quick:
        result = {"benchmark": "fault_matrix", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine_description(),
                  "command": "python scripts/fault_matrix.py" + "".join(
                      f" --{k} {getattr(args, k)}" for k in ("trials", "kills", "seed", "trainer")
                      if getattr(args, k) != parser.get_default(k)) + "".join(
                      f' --family "{f}"' for f in args.family or ()),
                  "settings": {"common": [*COMMON, f"trainer={args.trainer}"],
                               "families": {f: FAMILIES[f] for f in families}},
                  **{k: totals[k] for k in ("trials", "killed", "survived", "lost")}, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        console.print(f"written: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    sys.exit(1 if totals["lost"] else 0)


if __name__ == "__main__":
    main()
