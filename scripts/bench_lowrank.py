#!/usr/bin/env python
"""Does a factorized network run as much faster as its MAC count says? Host latency of low-rank ResNet-20
(32x32), ResNet-50 and DeiT-S (224x224) at 2x and 3x fewer MACs, against the dense network.

    python scripts/bench_lowrank.py            # writes bench_results/lowrank.json
    python scripts/bench_lowrank.py --quick    # ResNet-20 only, fewer repeats (smoke)

Variants (random weights: the values do not change the time):
* CNNs, ``svd``: two-factor channel form (k×k conv to r channels, then 1×1) of every conv except the first,
  ranks from one singular-energy threshold found for the MAC target (the ``svd`` method's compress);
* CNNs, ``tucker2``: Tucker-2 (1×1 → k×k core → 1×1) at the uniform rank ratio giving the MAC target
  (the network ``elrt`` trains);
* DeiT-S, ``comcat``: every block's attention as COMCAT's narrow-head attention and its MLP as two-factor
  SVD linears, all at the same fraction of their full rank, found by bisection for the MAC target.
Per variant and batch size (1 and 32): efficiency = measured speedup over the dense network (median
latency, fastest of interleaved rounds) / MAC-ratio speedup. ``min_efficiency`` is the minimum over all
factorized variants and both batch sizes; the goal is >= 0.85. One intra-op thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.hardware.macs import count_macs
from compress_run.hardware.measure import machine_description, model_latency_ms
from compress_run.methods.comcat import COMCAT
from compress_run.methods.elrt import ELRT
from compress_run.methods.svd import SVD
from compress_run.models import cifar_resnet, torchvision_models

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "resnet20": (lambda: cifar_resnet.resnet20(10, 3, 32), (3, 32, 32)),
    "resnet50": (lambda: torchvision_models.resnet50(1000, 3, 224), (3, 224, 224)),
    "deit_small": (lambda: timm.create_model("deit_small_patch16_224", pretrained=False), (3, 224, 224)),
}


def cnn_variant(build: Callable[[], nn.Module], shape: tuple[int, int, int], form: str, reduction: float) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    if form == "svd":
        method = SVD(target="flops", flops_reduction=reduction)
        method.input_shape = shape
        return method.compress(model, None).eval()
    method = ELRT(target="flops", flops_reduction=reduction)
    method.input_shape = shape
    return method.prepare(model).eval()


def vit_variant(build: Callable[[], nn.Module], shape: tuple[int, int, int], reduction: float) -> nn.Module:
    torch.manual_seed(0)
    dense = build().eval()
    goal = (1 - reduction) * count_macs(dense, (1, *shape)).effective

    def at(fraction: float) -> nn.Module:
        model = copy.deepcopy(dense)
        method = COMCAT()
        choices = method.factorize(model)
        for hook in method.hooks:
            hook.remove()
        for choice in choices:
            choice.chosen = max(1, round(fraction * choice.full))
            method.truncate(choice)
        return model.eval()

    low, high = 0.0, 1.0
    for _ in range(12):
        mid = (low + high) / 2
        low, high = (mid, high) if count_macs(at(mid), (1, *shape)).effective <= goal else (low, mid)
    return at(low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "lowrank.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["resnet20"] if args.quick else list(MODELS)
    batches, rounds, repeats = ((1, 4), 1, 3) if args.quick else ((1, 32), args.rounds, args.repeats)
    variants: dict[str, tuple[nn.Module, tuple[int, int, int]]] = {}
    console = Console()
    for name in names:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        variants[f"{name}/dense"] = (build().eval(), shape)
        for speedup in (2, 3):
            reduction = 1 - 1 / speedup
            forms = ("comcat",) if name.startswith("deit") else ("svd", "tucker2")
            for form in forms:
                console.log(f"building {name} {form} at {speedup}x fewer MACs")
                model = vit_variant(build, shape, reduction) if form == "comcat" else \
                    cnn_variant(build, shape, form, reduction)
                variants[f"{name}/{form}/{speedup}x"] = (model, shape)
    macs = {key: count_macs(model, (1, *shape)).effective for key, (model, shape) in variants.items()}
    times: dict[str, dict[int, list[float]]] = {key: {b: [] for b in batches} for key in variants}
    for r in range(rounds):
        for key, (model, shape) in variants.items():
            console.log(f"round {r + 1}/{rounds}: timing {key}")
            for batch in batches:
                times[key][batch].append(model_latency_ms(model, (batch, *shape), warmup=2, repeats=repeats))
    rows, efficiencies = [], []
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
            if key != dense:
                efficiencies.append(row[f"efficiency_b{batch}"])
        rows.append(row)
    per_form = {form: min(r[f"efficiency_b{b}"] for r in rows if f"/{form}/" in r["variant"] for b in batches)
                for form in ("svd", "tucker2", "comcat") if any(f"/{form}/" in r["variant"] for r in rows)}
    result = {"benchmark": "lowrank", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(), "command": "python scripts/bench_lowrank.py" +
              (" --quick" if args.quick else ""), "batches": list(batches), "rounds": rounds, "repeats": repeats,
              "variants": rows, "min_efficiency": min(efficiencies), "min_efficiency_per_form": per_form,
              "goal_min_efficiency": 0.85}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"factorized vs dense, host latency ({args.threads} threads)")
    for col in ("variant", "MACs (M)", "MAC speedup", *[f"speedup b{b}" for b in batches],
                *[f"efficiency b{b}" for b in batches]):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["variant"], f"{row['macs'] / 1e6:.1f}", f"{row['mac_speedup']:.2f}x",
                      *[f"{row[f'speedup_b{b}']:.2f}x" for b in batches],
                      *[f"{row[f'efficiency_b{b}']:.2f}" for b in batches])
    console.print(table)
    console.print(f"min_efficiency = {result['min_efficiency']:.3f} per form {per_form} (goal >= 0.85) -> {args.out}")


if __name__ == "__main__":
    main()
