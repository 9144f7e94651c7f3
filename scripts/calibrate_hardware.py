#!/usr/bin/env python
"""Calibrate conf/hardware/host_cpu.yaml on this machine (microbenchmark sweep + fit, a few minutes).

    python scripts/calibrate_hardware.py                  # full sweep, rewrites conf/hardware/host_cpu.yaml
    python scripts/calibrate_hardware.py --tiny --out /tmp/host.yaml   # seconds; for tests
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console

from compress_run.hardware import calibrate
from compress_run.hardware.measure import machine_description
from compress_run.hardware.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]


def simd_fp32_lanes() -> int:
    """fp32 lanes of the widest vector unit (oneDNN blocks channels by this): 16 with AVX-512, else 8."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "conf" / "hardware" / "host_cpu.yaml")
    parser.add_argument("--tiny", action="store_true", help="a few shapes only (seconds; for tests)")
    parser.add_argument("--passes", type=int, default=3, help="sweep repetitions; each sample keeps its fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    start = time.perf_counter()
    min_time = 0.002 if args.tiny else 0.05
    progress = lambda stage: console.log(f"calibrating: {stage}")  # noqa: E731
    samples = calibrate.sweep(tiny=args.tiny, progress=progress, min_time_s=min_time,
                              passes=1 if args.tiny else args.passes)
    sparse = calibrate.sparse_sweep(tiny=args.tiny, progress=progress, min_time_s=min_time,
                                    passes=1 if args.tiny else 2)
    fitted = calibrate.fit(samples, sparse, calibrate.last_level_cache_mb())
    composites = calibrate.composite_sweep(tiny=args.tiny, progress=progress, min_time_s=4 * min_time,
                                           passes=1 if args.tiny else 2 * args.passes)
    fitted["context_factor"] = calibrate.context_factor(fitted, composites)
    machine = machine_description()
    errors = fitted.pop("fit_median_rel_error")
    profile = {"defaults": ["base_hardware"], "name": "host_cpu",
               "description": f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, PyTorch eager fp32",
               "kind": "cpu", "dtype": "fp32", "rank_granularity": simd_fp32_lanes(),
               "threads": torch.get_num_threads(), **fitted,
               "fuse_epilogue": False,
               "calibrated": f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} on {machine['cpu']} "
                             f"(torch {machine['torch']}, {torch.get_num_threads()} threads)"}
    load_profile(OmegaConf.create(profile))  # validate before writing
    header = ("# Written by scripts/calibrate_hardware.py -- do not edit by hand; rerun it on the target host.\n"
              "# Source of every number: a microbenchmark sweep on this host, fitted by\n"
              "# compress_run.hardware.calibrate (see its docstring for what each field is fitted from).\n"
              f"# Median relative error of the per-class fits: {errors}\n"
              f"# Sweep took {time.perf_counter() - start:.0f} s.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(header + OmegaConf.to_yaml(OmegaConf.create(profile), sort_keys=False))
    tmp.replace(args.out)
    console.log(f"wrote {args.out} in {time.perf_counter() - start:.0f} s; fit errors {errors}")


if __name__ == "__main__":
    main()
