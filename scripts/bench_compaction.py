#!/usr/bin/env python
"""Does a compacted network run as much faster as its MAC count says? Host latency of channel-compacted
ResNet-50 (224x224) and ResNet-20 (32x32) at 50% and 75% MAC reduction, against the dense network.

    python scripts/bench_compaction.py            # writes bench_results/compaction.json
    python scripts/bench_compaction.py --quick    # ResNet-20 only, fewer repeats (smoke)

Each variant is made by L1-norm filter pruning with ``target: flops`` (a uniform keep ratio found by
bisection for the MAC reduction, residual-tied channel groups included) and then compacted
(:mod:`compress_run.core.compaction`), once with exact channel counts and once with counts rounded
to multiples of 8 (``channel_multiple=8``: oneDNN blocks channels by 8/16, so odd widths waste
work); its weights are the random init, which does not change the time. Per variant and batch size
(1 and 32): efficiency = measured speedup over the dense network
(median latency, fastest of several interleaved rounds: contention from other tenants only adds time)
divided by the MAC-ratio speedup (dense MACs / compacted MACs). ``min_efficiency`` is the minimum over
all compacted variants and both batch sizes (``min_efficiency_exact`` / ``_x8`` per width rule); the
goal is >= 0.85. Default is one intra-op thread: on this 2-vCPU host a second thread adds ~0.1 ms of
synchronisation to every op, which makes small networks slower, not faster (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.hardware.macs import count_macs
from compress_run.hardware.measure import machine_description, model_latency_ms
from compress_run.methods.l1_filter import L1Filter
from compress_run.models import cifar_resnet, torchvision_models

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "resnet50": (lambda: torchvision_models.resnet50(1000, 3, 224), (3, 224, 224)),
    "resnet20": (lambda: cifar_resnet.resnet20(10, 3, 32), (3, 32, 32)),
}


def compacted(build: Callable[[], nn.Module], shape: tuple[int, int, int], reduction: float,
              multiple: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    method = L1Filter(target="flops", flops_reduction=reduction, channel_multiple=multiple)
    method.input_shape = shape
    return method.compress(model, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "compaction.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["resnet20"] if args.quick else list(MODELS)
    batches, rounds, repeats = ((1, 4), 1, 5) if args.quick else ((1, 32), args.rounds, 10)
    variants: dict[str, tuple[nn.Module, tuple[int, int, int]]] = {}
    for name in names:
        build, shape = MODELS[name]
        variants[f"{name}/dense"] = (build().eval(), shape)
        for reduction in (0.5, 0.75):
            for multiple in (1, 8):
                variants[f"{name}/macs-{round(reduction * 100)}%/x{multiple}"] = (
                    compacted(build, shape, reduction, multiple), shape)
    macs = {key: count_macs(model, (1, *shape)).effective for key, (model, shape) in variants.items()}
    times: dict[str, dict[int, list[float]]] = {key: {b: [] for b in batches} for key in variants}
    for _ in range(rounds):
        for key, (model, shape) in variants.items():
            for batch in batches:
                times[key][batch].append(model_latency_ms(model, (batch, *shape), warmup=2, repeats=repeats))
    rows, efficiencies = [], {1: [], 8: []}
    for key, (model, _) in variants.items():
        name = key.split("/")[0]
        dense = f"{name}/dense"
        row = {"variant": key, "macs": macs[key], "mac_speedup": macs[dense] / macs[key],
               "params": sum(p.numel() for p in model.parameters()), "latency_ms": {}, "rounds_ms": {}}
        for batch in batches:
            ms, dense_ms = min(times[key][batch]), min(times[dense][batch])
            row["latency_ms"][f"b{batch}"] = ms
            row["rounds_ms"][f"b{batch}"] = times[key][batch]
            row[f"speedup_b{batch}"] = dense_ms / ms
            row[f"efficiency_b{batch}"] = row[f"speedup_b{batch}"] / row["mac_speedup"]
            if key != dense:
                efficiencies[int(key.rpartition("/x")[2])].append(row[f"efficiency_b{batch}"])
        rows.append(row)
    result = {"benchmark": "compaction", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(), "command": "python scripts/bench_compaction.py" +
              (" --quick" if args.quick else ""), "batches": list(batches), "rounds": rounds, "repeats": repeats,
              "variants": rows, "min_efficiency": min(efficiencies[1] + efficiencies[8]),
              "min_efficiency_exact": min(efficiencies[1]), "min_efficiency_x8": min(efficiencies[8]),
              "goal_min_efficiency": 0.85,
              "note": "exact: kept channel counts as the MAC target gives them (channel_multiple=1); x8: rounded "
                      "to multiples of 8 (channel_multiple=8)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"compacted vs dense, host latency ({args.threads} threads)")
    for col in ("variant", "MACs (M)", "MAC speedup", *[f"speedup b{b}" for b in batches],
                *[f"efficiency b{b}" for b in batches]):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["variant"], f"{row['macs'] / 1e6:.1f}", f"{row['mac_speedup']:.2f}x",
                      *[f"{row[f'speedup_b{b}']:.2f}x" for b in batches],
                      *[f"{row[f'efficiency_b{b}']:.2f}" for b in batches])
    console = Console()
    console.print(table)
    console.print(f"min_efficiency = {result['min_efficiency']:.3f} "
                  f"(exact widths {result['min_efficiency_exact']:.3f}, "
                  f"multiples of 8 {result['min_efficiency_x8']:.3f}; goal >= 0.85) -> {args.out}")


if __name__ == "__main__":
    main()
