"""What the network-speed benchmarks (bench_compaction.py, bench_lowrank.py) share: interleaved timing rounds of
every variant, speedups and efficiencies against the variant's dense model measured in the same run, the JSON
record and the summary table."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.hardware.macs import count_macs
from compress_run.hardware.measure import machine_description, model_latency_ms

Variants = dict[str, tuple[nn.Module, tuple[int, ...]]]  # "<model>/<variant>" -> (network, one sample's shape)


def time_variants(variants: Variants, batches: tuple[int, ...], rounds: int, repeats: int,
                  log: Callable[[str], None] | None = None) -> dict[str, dict[int, list[float]]]:
    """Milliseconds per round, batch and variant; rounds interleave the variants so drift hits them alike."""
    times: dict[str, dict[int, list[float]]] = {key: {b: [] for b in batches} for key in variants}
    for r in range(rounds):
        for key, (model, shape) in variants.items():
            if log:
                log(f"round {r + 1}/{rounds}: timing {key}")
            for batch in batches:
                times[key][batch].append(model_latency_ms(model, (batch, *shape), warmup=2, repeats=repeats))
    return times


def speed_rows(variants: Variants, times: dict[str, dict[int, list[float]]],
               batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per variant: MACs, MAC speedup, fastest round per batch, host speedup and efficiency against
    ``<model>/dense`` (efficiency = host speedup / MAC speedup)."""
    macs = {key: count_macs(model, (1, *shape)).effective for key, (model, shape) in variants.items()}
    rows = []
    for key, (model, _) in variants.items():
        dense = f"{key.split('/')[0]}/dense"
        row = {"variant": key, "macs": macs[key], "mac_speedup": macs[dense] / macs[key],
               "params": sum(p.numel() for p in model.parameters()), "latency_ms": {}, "rounds_ms": {}}
        for batch in batches:
            ms, dense_ms = min(times[key][batch]), min(times[dense][batch])
            row["latency_ms"][f"b{batch}"] = ms
            row["rounds_ms"][f"b{batch}"] = times[key][batch]
            row[f"speedup_b{batch}"] = dense_ms / ms
            row[f"efficiency_b{batch}"] = row[f"speedup_b{batch}"] / row["mac_speedup"]
        rows.append(row)
    return rows


def efficiencies(rows: list[dict[str, Any]], batches: tuple[int, ...], select: str = "") -> list[float]:
    """Every efficiency of the compressed variants (names containing ``select``)."""
    return [r[f"efficiency_b{b}"] for r in rows for b in batches
            if not r["variant"].endswith("/dense") and select in r["variant"]]


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
    for col in ("variant", "MACs (M)", "MAC speedup", *[f"speedup b{b}" for b in batches],
                *[f"efficiency b{b}" for b in batches]):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["variant"], f"{row['macs'] / 1e6:.1f}", f"{row['mac_speedup']:.2f}x",
                      *[f"{row[f'speedup_b{b}']:.2f}x" for b in batches],
                      *[f"{row[f'efficiency_b{b}']:.2f}" for b in batches])
    console.print(table)
