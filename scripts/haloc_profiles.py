#!/usr/bin/env python
"""Do different hardware profiles make HALOC choose different ranks? One trained network, one search per
profile from the same weights and the same data order, ranks and costs side by side.

    python scripts/haloc_profiles.py          # writes bench_results/haloc_profiles.json

The network is ResNet-20 trained for a few epochs on scikit-learn's digits (real data, upsampled to
16×16); each search uses the profile's simulated latency at batch ``--lut-batch`` as the LUT, granularity
8, target 30% of the searched layers' dense latency, ``--epochs`` search epochs. Reported per profile:
chosen ranks, the chosen network's simulated cost as a fraction of the dense layers', its MAC fraction,
and the LUT's spread (cost of the largest candidate / the smallest, averaged over layers) — a flat LUT
leaves the choice to the cross-entropy, a steep one pulls ranks down. A profile on which no Tucker-2 rank is
cheaper than the dense conv (overhead-bound small layers), or the target is out of reach, is reported as
refused with HALOC's reason.
"""

from __future__ import annotations

import argparse
import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits

from compress_run.core.errors import UserError
from compress_run.core.factorized import set_module
from compress_run.hardware.macs import count_macs
from compress_run.hardware.measure import machine_description
from compress_run.methods.haloc import HALOC
from compress_run.models.cifar_resnet import resnet20

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("host_cpu", "mobile_a78", "a100", "systolic_asic")


def digits_batches(batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear").repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return list(zip(x[order].split(batch), y[order].split(batch), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=2.0, help="search epochs per profile")
    parser.add_argument("--lut-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "haloc_profiles.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    batches = digits_batches()
    torch.manual_seed(0)
    net = resnet20(10, 3, 16)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    net.train()
    for epoch in range(4):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        console.log(f"dense training epoch {epoch + 1}/4 done")
    dense_macs = count_macs(net, (1, 3, 16, 16)).effective
    results = {}
    for profile in PROFILES:
        model = copy.deepcopy(net)
        torch.manual_seed(1)
        method = HALOC(hardware=profile, granularity=8, search_epochs=args.epochs, lut_batch=args.lut_batch)
        method.input_shape = (3, 16, 16)
        try:
            wrapped = method.wrap(model)
        except UserError as exc:  # no Tucker-2 rank beats the dense convs there, or the target is out of reach
            results[profile] = {"refused": exc.cause, "left_dense": len(method.left_dense)}
            console.log(f"{profile}: refused ({exc.cause[:120]})")
            continue
        method.search(model, wrapped, batches)
        for name, layer in wrapped.items():
            method.ranks[name] = layer.ranks[int(layer.logits.argmax())]
            set_module(model, name, layer.branches[int(layer.logits.argmax())])
        summary = method.summary()
        spread = sum(max(lut["costs"]) / min(lut["costs"]) for lut in method.luts.values()) / len(method.luts)
        results[profile] = {"ranks": summary["ranks"], "chosen_cost_fraction": summary["chosen_cost_fraction"],
                            "mac_fraction": round(count_macs(model, (1, 3, 16, 16)).effective / dense_macs, 4),
                            "lut_spread": round(spread, 3), "left_dense": len(method.left_dense),
                            "mean_rank": round(sum(method.ranks.values()) / len(method.ranks), 2),
                            "expected_cost_first_last": [method.history[0]["expected_cost"],
                                                         method.history[-1]["expected_cost"]]}
        console.log(f"{profile}: mean rank {results[profile]['mean_rank']}")
    out = {"benchmark": "haloc_profiles", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_description(), "command": "python scripts/haloc_profiles.py",
           "search_epochs": args.epochs, "lut_batch": args.lut_batch, "profiles": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    table = Table(title="HALOC ranks per hardware profile (ResNet-20, digits 16x16, same trained weights)")
    for col in ("profile", "mean rank", "LUT spread", "chosen cost / dense", "MACs / dense", "ranks"):
        table.add_column(col)
    for profile, r in results.items():
        if "refused" in r:
            table.add_row(profile, "-", "-", "-", "-", f"refused: {r['refused'][:70]}")
            continue
        table.add_row(profile, str(r["mean_rank"]), f"{r['lut_spread']:.2f}", f"{r['chosen_cost_fraction']:.3f}",
                      f"{r['mac_fraction']:.3f}", " ".join(str(v) for v in r["ranks"].values()))
    console.print(table)
    console.print(f"-> {args.out}")


if __name__ == "__main__":
    main()
