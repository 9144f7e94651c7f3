#!/usr/bin/env python
"""Calibrate conf/hardware/host_cpu.yaml on this machine (microbenchmark sweep + fit, a few minutes).

    python scripts/calibrate_hardware.py                  # full sweep, rewrites conf/hardware/host_cpu.yaml
    python scripts/calibrate_hardware.py --sparse-from bench_results/sparse_kernels.json
        # full sweep, the sparse formats fitted from the sparse-kernel benchmark instead of the built-in sweep
    python scripts/calibrate_hardware.py --sparse-from bench_results/sparse_kernels.json --sparse-only
        # seconds: re-fit only sparse_formats of the existing profile from the benchmark
    python scripts/calibrate_hardware.py --select-only
        # a minute: re-fit only the select/sort classes of the existing profile, scaled by the host's drift
    python scripts/calibrate_hardware.py --tiny --out /tmp/host.yaml   # seconds; for tests
"""

from __future__ import annotations

import argparse
import json
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
# the link between two hosts splitting a network (DISCO): 10 Gigabit Ethernet (IEEE 802.3ae); stated, not measured
HOST_LINK_GBPS = 10.0


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
    parser.add_argument("--sparse-from", type=Path, default=None,
                        help="fit the sparse formats from this scripts/bench_sparse_kernels.py JSON")
    parser.add_argument("--sparse-only", action="store_true",
                        help="with --sparse-from: keep every other field of the existing profile at --out")
    parser.add_argument("--select-only", action="store_true",
                        help="keep every other field of the existing profile at --out; fit select/sort (topk, sort)")
    args = parser.parse_args()
    if args.select_only:
        refit_selection_only(args.out, args.tiny, parser)
        return
    if args.sparse_only and not args.sparse_from:
        parser.error("--sparse-only re-fits the sparse formats from a benchmark: add --sparse-from "
                     "bench_results/sparse_kernels.json")
    if args.sparse_from:
        bench = _read_bench(args.sparse_from, parser)
    if args.sparse_only:
        refit_sparse_only(args.out, args.sparse_from, bench, parser)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    start = time.perf_counter()
    min_time = 0.002 if args.tiny else 0.05
    progress = lambda stage: console.log(f"calibrating: {stage}")  # noqa: E731
    samples = calibrate.sweep(tiny=args.tiny, progress=progress, min_time_s=min_time,
                              passes=1 if args.tiny else args.passes)
    if args.sparse_from:
        if bench.get("threads") != torch.get_num_threads():
            parser.error(f"{args.sparse_from} was measured with {bench.get('threads')} threads but this calibration "
                         f"runs {torch.get_num_threads()}: rerun the benchmark with --threads "
                         f"{torch.get_num_threads()} (or calibrate with --threads {bench.get('threads')})")
        sparse = calibrate.sparse_samples_from_bench(bench)
    else:
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
               "link_gbps": HOST_LINK_GBPS,
               "calibrated": f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} on {machine['cpu']} "
                             f"(torch {machine['torch']}, {torch.get_num_threads()} threads)"}
    load_profile(OmegaConf.create(profile))  # validate before writing
    header = ("# Written by scripts/calibrate_hardware.py -- do not edit by hand; rerun it on the target host.\n"
              "# Source of every number: a microbenchmark sweep on this host, fitted by\n"
              "# compress_run.hardware.calibrate (see its docstring for what each field is fitted from).\n"
              f"# Median relative error of the per-class fits: {errors}\n"
              + (f"# Sparse formats fitted from {_shown(args.sparse_from)} ({bench['date']}).\n"
                 if args.sparse_from else "") +
              f"# Sweep took {time.perf_counter() - start:.0f} s.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(header + OmegaConf.to_yaml(OmegaConf.create(profile), sort_keys=False))
    tmp.replace(args.out)
    console.log(f"wrote {args.out} in {time.perf_counter() - start:.0f} s; fit errors {errors}")


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _read_bench(path: Path, parser: argparse.ArgumentParser) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read the sparse-kernel benchmark {path} ({exc}): run python "
                     "scripts/bench_sparse_kernels.py first, or point --sparse-from at its JSON")


def refit_sparse_only(out: Path, source: Path, bench: dict, parser: argparse.ArgumentParser) -> None:
    """Replace ``sparse_formats`` of the profile at ``out`` by a fit of the benchmark; keep everything else."""
    if not out.is_file():
        parser.error(f"--sparse-only updates an existing profile, and {out} does not exist: run the full "
                     "calibration first (python scripts/calibrate_hardware.py)")
    text = out.read_text()
    profile = OmegaConf.to_container(OmegaConf.create(text))
    if bench.get("threads") != profile.get("threads"):
        parser.error(f"{source} was measured with {bench.get('threads')} threads, the profile {out} with "
                     f"{profile.get('threads')}: rerun the benchmark with --threads {profile.get('threads')}")
    try:
        samples = calibrate.sparse_samples_from_bench(bench)
    except ValueError as exc:
        parser.error(str(exc))
    formats, errors = calibrate.fit_sparse_formats(samples, profile["peak_tflops"]["fp32"])
    profile["sparse_formats"] = formats
    load_profile(OmegaConf.create(profile))  # validate before writing
    header = [line for line in text.splitlines() if line.startswith("#") and "Sparse formats" not in line]
    header.append(f"# Sparse formats re-fitted from {_shown(source)} ({bench['date']}), median relative "
                  f"errors {errors}.")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(profile), sort_keys=False))
    tmp.replace(out)
    Console(stderr=True).log(f"re-fitted sparse_formats of {out} from {source}: {errors}")


def refit_selection_only(out: Path, tiny: bool, parser: argparse.ArgumentParser) -> None:
    """Add or replace the ``select`` and ``sort`` classes of the profile at ``out``; keep everything else."""
    if not out.is_file():
        parser.error(f"--select-only updates an existing profile, and {out} does not exist: run the full "
                     "calibration first (python scripts/calibrate_hardware.py)")
    text = out.read_text()
    profile = OmegaConf.to_container(OmegaConf.create(text))
    if profile.get("threads") != torch.get_num_threads():
        parser.error(f"the profile {out} was calibrated with {profile.get('threads')} threads and torch runs "
                     f"{torch.get_num_threads()} here: set OMP_NUM_THREADS={profile.get('threads')}")
    console = Console(stderr=True)
    fields, drift = calibrate.selection_refit(load_profile(OmegaConf.create(profile)), tiny=tiny,
                                              progress=lambda stage: console.log(f"calibrating: {stage}"),
                                              min_time_s=0.002 if tiny else 0.05, passes=1 if tiny else 3)
    errors = fields.pop("fit_median_rel_error")
    profile["peak_tflops"]["fp32"].update(fields["peak_tflops"]["fp32"])
    profile["class_overhead_us"].update(fields["class_overhead_us"])
    load_profile(OmegaConf.create(profile))  # validate before writing
    header = [line for line in text.splitlines() if line.startswith("#") and "select/sort" not in line]
    header.append(f"# select/sort classes fitted alone {datetime.now(timezone.utc).date()}, scaled by the host's "
                  f"drift since the sweep ({drift:.2f}x, GEMMs timed in the same run); median relative errors "
                  f"{errors}.")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(profile), sort_keys=False))
    tmp.replace(out)
    console.log(f"re-fitted select/sort of {out}: drift {drift:.2f}x, errors {errors}")


if __name__ == "__main__":
    main()
