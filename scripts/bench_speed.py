"""What the network-speed benchmarks (bench_compaction.py, bench_lowrank.py) share: interleaved timing rounds of
every variant, speedups and efficiencies against the variant's dense model measured in the same run, the JSON
record and the summary table. Each variant is timed in two forms: eager PyTorch and, with ``deployed``, the same
network exported to ONNX and run by ONNX Runtime (src/hardware/deploy.py: the form a deployment would ship, where
batch norm is folded and no Python runs between ops); each form's speedups are against the dense network in the
same form."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.hardware.deploy import export_float, latency_ms, session
from compress_run.hardware.macs import count_macs
from compress_run.hardware.measure import machine_description, model_latency_ms
from compress_run.kernels.fold import fold_batchnorm

Variants = dict[str, tuple[nn.Module, tuple[int, ...]]]  # "<model>/<variant>" -> (network, one sample's shape)


def time_variants(variants: Variants, batches: tuple[int, ...], rounds: int, repeats: int,
                  log: Callable[[str], None] | None = None,
                  deployed: bool = False, folding: dict[str, str] | None = None,
                  ) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Milliseconds per form ("eager", and "deployed" with ``deployed``), variant, batch and round; rounds
    interleave the variants and forms so drift hits them alike. The eager form has its batch norms folded
    (kernels/fold.py; ONNX Runtime folds them itself); ``folding`` receives what was folded per variant."""
    forms = ("eager", "deployed") if deployed else ("eager",)
    times = {form: {key: {b: [] for b in batches} for key in variants} for form in forms}
    eager = {}  # the executed form evaluate times: batch norms folded into the conv before them
    for key, (model, shape) in variants.items():
        eager[key], note = fold_batchnorm(model.eval(), torch.randn(2, *shape))
        if folding is not None:
            folding[key] = note
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        if deployed:
            for i, (key, (model, shape)) in enumerate(variants.items()):
                if log:
                    log(f"exporting {key} to ONNX")
                path = Path(tmp) / f"{i}.onnx"
                export_float(model.eval(), shape, path)
                sessions[key] = session(path, torch.get_num_threads())
        for r in range(rounds):
            for key, (_, shape) in variants.items():
                if log:
                    log(f"round {r + 1}/{rounds}: timing {key}")
                for batch in batches:
                    times["eager"][key][batch].append(model_latency_ms(eager[key], (batch, *shape), warmup=2,
                                                                       repeats=repeats))
                    if deployed:
                        times["deployed"][key][batch].append(latency_ms(sessions[key], (batch, *shape), warmup=2,
                                                                        repeats=repeats))
    return times


def speed_rows(variants: Variants, times: dict[str, dict[str, dict[int, list[float]]]],
               batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per variant: MACs, MAC speedup, and per form (eager: ``latency_ms``, ``speedup_b<N>``, ``efficiency_b<N>``;
    deployed: the same keys with ``deployed_`` in front) the fastest round per batch, the speedup and efficiency
    against ``<model>/dense`` in the same form (efficiency = measured speedup / MAC speedup)."""
    macs = {key: count_macs(model, (1, *shape)).effective for key, (model, shape) in variants.items()}
    rows = []
    for key, (model, _) in variants.items():
        dense = f"{key.split('/')[0]}/dense"
        row = {"variant": key, "macs": macs[key], "mac_speedup": macs[dense] / macs[key],
               "params": sum(p.numel() for p in model.parameters())}
        for form, form_times in times.items():
            prefix = "" if form == "eager" else f"{form}_"
            row[f"{prefix}latency_ms"], row[f"{prefix}rounds_ms"] = {}, {}
            for batch in batches:
                ms, dense_ms = min(form_times[key][batch]), min(form_times[dense][batch])
                row[f"{prefix}latency_ms"][f"b{batch}"] = ms
                row[f"{prefix}rounds_ms"][f"b{batch}"] = form_times[key][batch]
                row[f"{prefix}speedup_b{batch}"] = dense_ms / ms
                row[f"{prefix}efficiency_b{batch}"] = row[f"{prefix}speedup_b{batch}"] / row["mac_speedup"]
        rows.append(row)
    return rows


def efficiencies(rows: list[dict[str, Any]], batches: tuple[int, ...], select: str = "",
                 form: str = "eager") -> list[float]:
    """Every efficiency of the compressed variants (names containing ``select``) in one form."""
    prefix = "" if form == "eager" else f"{form}_"
    return [r[f"{prefix}efficiency_b{b}"] for r in rows for b in batches
            if not r["variant"].endswith("/dense") and select in r["variant"] and f"{prefix}efficiency_b{b}" in r]


def write_result(out: Path, benchmark: str, command: str, batches: tuple[int, ...], rounds: int, repeats: int,
                 rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    result = {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(), "command": command, "batches": list(batches), "rounds": rounds,
              "repeats": repeats, "variants": rows, **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_speed_table(rows: list[dict[str, Any]], batches: tuple[int, ...], title: str, console: Console) -> None:
    table = Table(title=title)
    deployed = any("deployed_speedup_b1" in row for row in rows)
    prefixes = ("", "deployed_") if deployed else ("",)
    for col in ("variant", "MACs (M)", "MAC speedup",
                *[f"{p.replace('_', ' ')}{kind} b{b}" for p in prefixes for kind in ("speedup", "efficiency")
                  for b in batches]):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["variant"], f"{row['macs'] / 1e6:.1f}", f"{row['mac_speedup']:.2f}x",
                      *[f"{row[f'{p}{kind}_b{b}']:.2f}" + ("x" if kind == "speedup" else "")
                        for p in prefixes for kind in ("speedup", "efficiency") for b in batches])
    console.print(table)
