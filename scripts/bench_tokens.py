#!/usr/bin/env python
"""Does token pruning make a ViT faster on this host, and does the simulator say so? Host latency of E-ViT's and
SPViT's dropped-token forward against the dense network, beside the host_cpu profile's prediction.

    python scripts/bench_tokens.py            # writes bench_results/tokens.json
    python scripts/bench_tokens.py --quick    # the Fashion-MNIST ViT only, one round (smoke)

Models (random weights: the values change which tokens are kept, not how many, so not the time): the small
Fashion-MNIST ViT of ``table=fmnist_vit_tokens`` (96 wide, 3 heads, depth 6, 50 tokens) and DeiT-Tiny and
DeiT-Small at 224x224 (197 tokens). Variants of each:
* ``evit``: Tri-level E-ViT's inference network (``method=evit`` defaults: 70% of the tokens kept at blocks 3/6/9
  of 12, scaled to the depth, and 30% of the attention links kept in every block);
* ``evit_tokens``: the same with its token level only (``attention_keep=1``);
* ``spvit``: SPViT's selectors at its blocks 3/6/9 (cumulative keep 0.617/0.369/0.137, the paper's DeiT
  setting; 0.7/0.49/0.343 on the Fashion-MNIST ViT, as in the table), dropping tokens as at inference.
Sparse attention runs in the form the host profile prices cheaper (src/hardware/report.py), as the evaluate stage
times it. Per variant and batch size (1 and 16): measured speedup over the dense network (fastest of interleaved
rounds, each the median of ``--repeats`` runs after warm-up), the host_cpu profile's simulated speedup, and the MAC
speedup. Goal: wherever the measured latency differs from dense by more than 10%, the simulator predicts the same
direction (faster or slower). None of these token-pruned networks is in the host profile's calibration
(scripts/calibrate_hardware.py times single ops and dense networks); they were chosen before their first
measurement with this script. Runs at the host profile's thread count by default (``--threads``), so the
measured and the simulated latency are of the same setting.

Training steps (the quiet measurement behind the training-time column of ``table=fmnist_vit_tokens``): one
optimizer step (forward, cross-entropy, backward, AdamW) of the Fashion-MNIST ViT at batch 128 on one thread, as
the table's runs train, for ``dense``, ``evit`` at its final ratios, ``evit_warmup`` (its keep-rate warm-up's
start: every ratio at 1, the mask-building blocks computing their attention explicitly) and ``spvit`` in
training mode (the soft, masked form its finetune runs); interleaved rounds, each the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.core.compression_info import compression_infos
from compress_run.core.tokens import gathered_links, set_token_anneal
from compress_run.hardware.macs import count_macs
from compress_run.hardware.measure import machine_description, model_latency_ms
from compress_run.hardware.profile import load_profile
from compress_run.hardware.report import attention_forms, cheapest_form
from compress_run.hardware.simulator import layer_bits
from compress_run.methods.evit import EViT
from compress_run.methods.spvit import SPViT
from compress_run.models.timm_models import vit

ROOT = Path(__file__).resolve().parents[1]
IMAGENET, FMNIST = (3, 224, 224), (1, 28, 28)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], list[float]]] = {
    "vit_fmnist": (lambda: vit("deit_tiny_patch16_224", 10, 1, 28, patch_size=4, embed_dim=96, num_heads=3,
                               depth=6, mlp_ratio=4.0), FMNIST, [0.7, 0.49, 0.343]),
    "deit_tiny": (lambda: vit("deit_tiny_patch16_224", 1000, 3, 224), IMAGENET, [0.617, 0.369, 0.137]),
    "deit_small": (lambda: vit("deit_small_patch16_224", 1000, 3, 224), IMAGENET, [0.617, 0.369, 0.137]),
}


def variants(build: Callable[[], nn.Module], spvit_keep: list[float]) -> dict[str, nn.Module]:
    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return {"dense": fresh().eval(),
            "evit": EViT().prepare(fresh()).eval(),
            "evit_tokens": EViT(attention_keep=1.0).prepare(fresh()).eval(),
            "spvit": SPViT(keep_targets=spvit_keep).compress(fresh(), None).eval()}


def simulated(model: nn.Module, shape: tuple[int, ...], batches: tuple[int, ...]) -> tuple[str, dict[int, float]]:
    """The attention form host_cpu prices cheaper (or "-" without sparse attention) and its latency per batch."""
    forms = attention_forms(model, shape, batches)
    form, sims = cheapest_form(forms, load_profile("host_cpu"), compression_infos(model), layer_bits(model))
    return (form if len(forms) > 1 else "-"), {b: sims[b].total_ms for b in batches}


def train_step_ms(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """Median time of one optimizer step (forward, cross-entropy, backward, AdamW) at ``batch``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, *shape, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def train_steps(rounds: int, repeats: int, console: Console) -> dict[str, Any]:
    """Training-step time of the Fashion-MNIST ViT's variants on one thread, interleaved rounds."""
    build, shape, spvit_keep = MODELS["vit_fmnist"]
    nets = variants(build, spvit_keep)
    warm = EViT().prepare(variants(build, spvit_keep)["dense"])
    set_token_anneal(warm, 1.0)
    models = {"dense": nets["dense"], "evit": nets["evit"], "evit_warmup": warm, "spvit": nets["spvit"]}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    measured: dict[str, list[float]] = {name: [] for name in models}
    try:
        for round_ in range(rounds):
            for name, model in models.items():
                measured[name].append(train_step_ms(model.train(), shape, 128, repeats))
            console.log(f"train steps: round {round_ + 1}/{rounds} done")
    finally:
        torch.set_num_threads(previous)
    dense = min(measured["dense"])
    return {"model": "vit_fmnist", "batch": 128, "threads": 1,
            "variants": {name: {"step_ms": round(min(times), 2), "speedup": round(dense / min(times), 3),
                                "rounds_ms": [round(t, 2) for t in times]} for name, times in measured.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: the host_cpu profile's threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "tokens.json")
    args = parser.parse_args()
    args.threads = args.threads or load_profile("host_cpu").threads
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    names = ["vit_fmnist"] if args.quick else list(MODELS)
    batches, rounds, repeats = ((1, 4), 1, 3) if args.quick else ((1, 16), args.rounds, args.repeats)
    prepared: list[dict[str, Any]] = []
    for name in names:
        build, shape, spvit_keep = MODELS[name]
        for variant, model in variants(build, spvit_keep).items():
            form, sim_ms = simulated(model, shape, batches)
            prepared.append({"model": name, "variant": variant, "network": model, "shape": shape, "form": form,
                             "macs": count_macs(model, (1, *shape)).effective, "sim_ms": sim_ms,
                             "rounds_ms": {b: [] for b in batches}})
            console.log(f"prepared {name}/{variant}: attention form {form}")
    start = time.perf_counter()
    with torch.inference_mode():
        for round_ in range(rounds):  # interleaved, so drift on the shared host hits every variant alike
            for entry in prepared:
                with gathered_links(entry["form"] == "gathered"):
                    for b in batches:
                        entry["rounds_ms"][b].append(model_latency_ms(entry["network"], (b, *entry["shape"]),
                                                                      warmup=2, repeats=repeats))
            console.log(f"round {round_ + 1}/{rounds} done ({time.perf_counter() - start:.0f} s)")
    rows = []
    for entry in prepared:
        dense = next(e for e in prepared if e["model"] == entry["model"] and e["variant"] == "dense")
        row: dict[str, Any] = {"model": entry["model"], "variant": entry["variant"], "attention_form": entry["form"],
                               "macs": round(entry["macs"]), "mac_speedup": round(dense["macs"] / entry["macs"], 3)}
        for b in batches:
            measured, dense_measured = min(entry["rounds_ms"][b]), min(dense["rounds_ms"][b])
            row[f"b{b}"] = {"measured_ms": round(measured, 3), "sim_ms": round(entry["sim_ms"][b], 3),
                            "measured_speedup": round(dense_measured / measured, 3),
                            "sim_speedup": round(dense["sim_ms"][b] / entry["sim_ms"][b], 3),
                            "rounds_ms": [round(x, 3) for x in entry["rounds_ms"][b]]}
        rows.append(row)
    checked = [(r, b) for r in rows if r["variant"] != "dense" for b in batches
               if abs(r[f"b{b}"]["measured_speedup"] - 1) > 0.10]
    agree = [(r, b) for r, b in checked if (r[f"b{b}"]["measured_speedup"] > 1) == (r[f"b{b}"]["sim_speedup"] > 1)]
    training = train_steps(1 if args.quick else rounds, 3 if args.quick else repeats, console)
    result = {"benchmark": "tokens", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(), "command": "python scripts/bench_tokens.py" +
              (" --quick" if args.quick else ""), "batches": list(batches), "rounds": rounds, "repeats": repeats,
              "estimator": "measured_ms = fastest of the interleaved rounds, each the median of repeats after "
                           "warm-up; speedups are against the same model's dense network in the same run",
              "goal": "where the measured speedup differs from 1 by more than 10%, the host_cpu simulator predicts "
                      "the same direction",
              "direction_checked": len(checked), "direction_agrees": len(agree),
              "direction_disagrees": [f"{r['model']}/{r['variant']}/b{b}" for r, b in checked if (r, b) not in agree],
              "variants": rows, "train_steps": training}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = Table(title=f"token-pruned vs dense, host latency ({args.threads} thread(s)); speedup = dense / variant")
    for col in ("model", "variant", "attention form", "MACs (M)", "MAC speedup",
                *[f"{kind} b{b}" for b in batches for kind in ("measured ms", "measured", "simulated")]):
        table.add_column(col, justify="left" if col in ("model", "variant", "attention form") else "right")
    for r in rows:
        table.add_row(r["model"], r["variant"], r["attention_form"], f"{r['macs'] / 1e6:.1f}",
                      f"{r['mac_speedup']:.2f}x",
                      *[v for b in batches for v in (f"{r[f'b{b}']['measured_ms']:.2f}",
                                                       f"{r[f'b{b}']['measured_speedup']:.2f}x",
                                                       f"{r[f'b{b}']['sim_speedup']:.2f}x")])
    Console(width=200).print(table)
    steps = Table(title="training step of the Fashion-MNIST ViT (batch 128, 1 thread); speedup = dense / variant")
    for col in ("variant", "step ms", "speedup"):
        steps.add_column(col, justify="left" if col == "variant" else "right")
    for name, entry in training["variants"].items():
        steps.add_row(name, f"{entry['step_ms']:.1f}", f"{entry['speedup']:.2f}x")
    Console(width=200).print(steps)
    Console().print(f"direction: simulator agrees on {len(agree)} of {len(checked)} variant/batch cases where the "
                    f"measured speedup is beyond +-10% {result['direction_disagrees'] or ''} -> {args.out}")


if __name__ == "__main__":
    main()
