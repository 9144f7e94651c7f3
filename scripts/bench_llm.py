#!/usr/bin/env python
"""The SmolLM2 W8A8 bars: one whole run of `compress-run model=smollm2_135m dataset=shakespeare quant=w8a8_mixed`
(128 calibration windows of 512 tokens, perplexity on the test plays and on Milton) must finish within 10 minutes
on 2 cores with at most 4 GiB peak memory. Runs it as a child process in a fresh output dir and measures its wall
time and peak resident memory (the child's ru_maxrss), with the host and the load beside them.

    python scripts/bench_llm.py                 # writes bench_results/llm.json (needs `make llm-data`)
    python scripts/bench_llm.py --keep DIR      # keep the run's output dir
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from compress_run.pipeline.provenance import code_version, host_info
from compress_run.pipeline.results import versions

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["model=smollm2_135m", "dataset=shakespeare", "quant=w8a8_mixed", "logger=none"]
BARS = {"wall_s": 600.0, "peak_rss_gib": 4.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="run in this dir and keep it")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "llm.json")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("COMPRESS_RUN_DATA_DIR", ROOT / "data")).resolve()
    if not (data_dir / "llm" / "smollm2").is_dir():
        sys.exit(f"bench_llm: no SmolLM2 under {data_dir}/llm: run `make llm-data` first")
    run_dir = args.keep or Path(tempfile.mkdtemp(prefix="bench_llm_"))
    shutil.rmtree(run_dir, ignore_errors=True)
    exe = str(Path(sys.executable).with_name("compress-run"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    child = subprocess.run([exe, *COMMAND, f"paths.data_dir={data_dir}", f"output_dir={run_dir}"],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    wall = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if child.returncode != 0:
        sys.exit(f"bench_llm: the run failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    m = results["metrics"]
    record = {
        "what": "compress-run " + " ".join(COMMAND),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": code_version(), "host": host_info(), "versions": versions(), "load_before": load_before,
        "load_after": os.getloadavg(), "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 3),
        "stage_s": {s: r.get("wall_s") for s, r in results["stages"].items() if r.get("status") == "done"},
        "calibration_windows": results["quant"].get("resolved", {}).get("calib_size"),
        "test_tokens": m.get("test/tokens"), "ood_tokens": m.get("ood/tokens"),
        "test_ppl": m.get("test/ppl"), "test_kl": m.get("test/kl"), "ood_ppl": m.get("ood/ppl"),
        # the quantized layers as int8 GEMMs against the float model, alternating rounds, batch 1
        "int8": {k.removeprefix("int8_host/"): v for k, v in m.items() if k.startswith("int8_host/")},
        "bars": BARS, "meets": {"wall_s": wall <= BARS["wall_s"], "peak_rss_gib": peak_gib <= BARS["peak_rss_gib"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("wall_s", "peak_rss_gib", "stage_s", "meets", "test_ppl")}, indent=2))
    if args.keep is None:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
