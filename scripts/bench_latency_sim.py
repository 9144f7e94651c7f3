#!/usr/bin/env python
"""Simulated vs measured host latency on dense, narrower and masked (sparse-executed) model variants.

    python scripts/bench_latency_sim.py                      # writes bench_results/latency_sim.json
    python scripts/bench_latency_sim.py --quick              # 4 small variants, 1 round (smoke)
    python scripts/bench_latency_sim.py --split held_out     # only the models the profile never saw

Two splits: ``in_sample`` (:func:`_variants`, the models the host profile was developed against) and
``held_out`` (:func:`_held_out`, chosen before their first measurement and never used to fit or tune the
profile); the goal statistics are reported for each.

For every variant the host_cpu profile (conf/hardware/host_cpu.yaml, from scripts/calibrate_hardware.py)
simulates batch-1 latency; the model the simulator would deploy (masked layers whose sparse path wins run
through the CSR/BSR/gather-scatter kernels; masked variants use irregular, GS16 and 4x4-block magnitude
masks) is timed on this host: warm-up, median of repeats, in several interleaved rounds. The 2 cores are
shared with other tenants and contention only ever adds time, so a variant's measured latency is its fastest
round (every round is kept in the JSON) -- the same estimator the calibration uses for its microbenchmarks.
The same run evaluates a naive single-peak roofline (max(MACs / conv peak, bytes / DRAM bandwidth), no
overheads) as the baseline predictor.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau
from torch import nn

from compress_run.core.masks import magnitude_scores, prunable_layers, prune_by_score
from compress_run.hardware.measure import machine_description, model_latency_ms
from compress_run.hardware.profile import load_profile
from compress_run.hardware.simulator import simulate
from compress_run.hardware.trace import trace_model
from compress_run.kernels.sparse import to_executed
from compress_run.models import cifar_resnet, cifar_vgg, timm_models, torchvision_models

ROOT = Path(__file__).resolve().parents[1]
IMAGENET, CIFAR = (3, 224, 224), (3, 32, 32)


def _variants() -> list[tuple[str, Callable[[], nn.Module], tuple[int, int, int], float, str]]:
    """(name, builder, input shape, sparsity of a magnitude mask or 0, the mask's pattern or "")."""
    tv = torchvision_models
    return [
        ("resnet18", lambda: tv.resnet18(1000, 3, 224), IMAGENET, 0.0, ""),
        ("resnet50", lambda: tv.resnet50(1000, 3, 224), IMAGENET, 0.0, ""),
        ("mobilenet_v2", lambda: tv.mobilenet_v2(1000, 3, 224), IMAGENET, 0.0, ""),
        ("deit_tiny", lambda: timm_models.vit("deit_tiny_patch16_224", 1000, 3, 224), IMAGENET, 0.0, ""),
        ("deit_small", lambda: timm_models.vit("deit_small_patch16_224", 1000, 3, 224), IMAGENET, 0.0, ""),
        ("resnet20_cifar", lambda: cifar_resnet.resnet20(10, 3, 32), CIFAR, 0.0, ""),
        ("resnet56_cifar", lambda: cifar_resnet.resnet56(10, 3, 32), CIFAR, 0.0, ""),
        ("vgg16_bn_cifar", lambda: cifar_vgg.vgg16_bn(10, 3, 32), CIFAR, 0.0, ""),
        ("resnet18_w0.5", lambda: tv.resnet18(1000, 3, 224, width_mult=0.5), IMAGENET, 0.0, ""),
        ("resnet50_w0.5", lambda: tv.resnet50(1000, 3, 224, width_mult=0.5), IMAGENET, 0.0, ""),
        ("mobilenet_v2_w0.5", lambda: tv.mobilenet_v2(1000, 3, 224, width_mult=0.5), IMAGENET, 0.0, ""),
        ("deit_tiny_w0.5", lambda: timm_models.vit("deit_tiny_patch16_224", 1000, 3, 224, width_mult=0.5),
         IMAGENET, 0.0, ""),
        ("resnet18_masked90", lambda: tv.resnet18(1000, 3, 224), IMAGENET, 0.9, "irregular"),
        ("resnet50_masked90", lambda: tv.resnet50(1000, 3, 224), IMAGENET, 0.9, "irregular"),
        ("vgg16_bn_cifar_masked95", lambda: cifar_vgg.vgg16_bn(10, 3, 32), CIFAR, 0.95, "irregular"),
        ("deit_small_masked90", lambda: timm_models.vit("deit_small_patch16_224", 1000, 3, 224), IMAGENET, 0.9,
         "irregular"),
        ("resnet56_cifar_masked70", lambda: cifar_resnet.resnet56(10, 3, 32), CIFAR, 0.7, "irregular"),
        ("resnet50_gs16_masked90", lambda: tv.resnet50(1000, 3, 224), IMAGENET, 0.9, "gather_scatter:16"),
        ("resnet50_block4_masked90", lambda: tv.resnet50(1000, 3, 224), IMAGENET, 0.9, "block:4:4"),
        ("deit_small_gs16_masked90", lambda: timm_models.vit("deit_small_patch16_224", 1000, 3, 224), IMAGENET,
         0.9, "gather_scatter:16"),
    ]


def _held_out() -> list[tuple[str, Callable[[], nn.Module], tuple[int, int, int], float, str]]:
    """Models the host profile was never fitted or tuned on (chosen 2026-12-02, before the first measurement of
    any of them with this script): torchvision and timm architectures outside the calibration's composite
    networks and outside :func:`_variants` -- depthwise/large-kernel convs, LayerNorm/GELU MLP blocks, grouped
    convs, dense concatenation, window attention -- dense and with 90% magnitude masks."""
    def build(library, name: str) -> Callable[[], nn.Module]:
        return lambda: library.any_model(name, 1000, 3, 224)

    torchvision_names = ["convnext_tiny", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0", "mnasnet1_0",
                         "mobilenet_v3_large", "densenet121", "googlenet", "squeezenet1_1", "resnext50_32x4d",
                         "swin_t", "vit_b_32"]
    dense = ([(name, build(torchvision_models, name)) for name in torchvision_names]
             + [(f"timm_{name}", build(timm_models, name)) for name in ("convnext_atto", "regnetx_002")])
    masked = [(f"{name}_masked90", builder) for name, builder in dense
              if name in ("convnext_tiny", "regnet_y_400mf", "mobilenet_v3_large", "densenet121", "resnext50_32x4d",
                          "vit_b_32")]
    return ([(name, builder, IMAGENET, 0.0, "") for name, builder in dense]
            + [(name, builder, IMAGENET, 0.9, "irregular") for name, builder in masked])


SPLITS = {"in_sample": _variants, "held_out": _held_out}


def naive_roofline_ms(trace, profile) -> float:
    """Single peak, single bandwidth, no overheads: the predictor the profile is meant to beat."""
    flops = 2 * trace.macs
    nbytes = sum(op.in_bytes + op.out_bytes + op.weight_bytes for op in trace.ops)
    return max(flops / profile.peak("conv"), nbytes / (profile.memory_gbps * 1e9)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "latency_sim.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8, help="second batch size reported (not in the goal stats)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--split", choices=["both", *SPLITS], default="both",
                        help="in_sample: the variants the profile was developed against; held_out: never tuned on")
    args = parser.parse_args()
    console = Console(stderr=True)
    profile = load_profile("host_cpu")
    variants = [(split, *v) for split, build in SPLITS.items() if args.split in ("both", split) for v in build()]
    if args.quick:
        variants = [v for v in variants if "cifar" in v[1]][:4]
        args.rounds = 1
    torch.manual_seed(0)
    prepared = []
    for split, name, build, shape, sparsity, pattern in variants:
        model = build().eval()
        if sparsity:
            layers = prunable_layers(model)
            prune_by_score(layers, magnitude_scores(layers), sparsity, pattern=pattern)
        rows = {}
        for batch in (1, args.batch):
            trace = trace_model(model, (batch, *shape))
            sim = simulate(model, trace, profile)
            rows[batch] = {"sim_ms": sim.total_ms, "naive_ms": naive_roofline_ms(trace, profile), "sim": sim}
        executed = to_executed(copy.deepcopy(model), rows[1]["sim"].formats())
        prepared.append((split, name, shape, sparsity, pattern, executed, rows))
        console.log(f"prepared {split}/{name}: {len(rows[1]['sim'].formats())} layers run sparse")
    measured: dict[tuple[str, int], list[float]] = {}
    start = time.perf_counter()
    for round_ in range(args.rounds):
        for _, name, shape, _, _, executed, rows in prepared:
            for batch in rows:
                ms = model_latency_ms(executed, (batch, *shape), warmup=3, repeats=args.repeats)
                measured.setdefault((name, batch), []).append(ms)
        console.log(f"round {round_ + 1}/{args.rounds} done ({time.perf_counter() - start:.0f} s)")
    results = []
    for split, name, shape, sparsity, pattern, _, rows in prepared:
        sim1 = rows[1]["sim"]
        entry = {"variant": name, "split": split, "input": list(shape), "mask_sparsity": sparsity,
                 "mask_pattern": pattern or None, "formats": sorted(set(sim1.formats().values())),
                 "macs_dense": sim1.macs("dense"), "macs_effective": round(sim1.macs("effective")),
                 "macs_executed": round(sim1.macs("executed")), "sparse_layers": len(sim1.formats())}
        for batch in rows:
            m = min(measured[(name, batch)])
            entry[f"b{batch}"] = {"measured_ms": round(m, 3), "sim_ms": round(rows[batch]["sim_ms"], 3),
                                  "ratio": round(rows[batch]["sim_ms"] / m, 3),
                                  "naive_ms": round(rows[batch]["naive_ms"], 3),
                                  "naive_ratio": round(rows[batch]["naive_ms"] / m, 3),
                                  "median_of_rounds_ms": round(statistics.median(measured[(name, batch)]), 3),
                                  "rounds_ms": [round(x, 3) for x in measured[(name, batch)]]}
        results.append(entry)

    def stats(rows: list[dict], batch: int, key: str) -> dict[str, float]:
        ratios = [r[f"b{batch}"][key] for r in rows]
        predicted = [r[f"b{batch}"]["sim_ms" if key == "ratio" else "naive_ms"] for r in rows]
        actual = [r[f"b{batch}"]["measured_ms"] for r in rows]
        return {"variants": len(rows),
                "share_within_15pct": round(sum(abs(x - 1) <= 0.15 for x in ratios) / len(ratios), 3),
                "share_within_25pct": round(sum(abs(x - 1) <= 0.25 for x in ratios) / len(ratios), 3),
                "kendall_tau": round(float(kendalltau(predicted, actual).statistic), 3),
                "median_abs_error": round(statistics.median(abs(x - 1) for x in ratios), 3)}

    splits = {}
    for split in SPLITS:
        rows = [r for r in results if r["split"] == split]
        if rows:
            splits[split] = {**stats(rows, 1, "ratio"), "baseline_naive_roofline": stats(rows, 1, "naive_ratio"),
                             f"batch{args.batch}": stats(rows, args.batch, "ratio")}
    command = "python scripts/bench_latency_sim.py" + (" --quick" if args.quick else "") + \
        (f" --split {args.split}" if args.split != "both" else "")
    summary = {"benchmark": "latency_sim", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_description(), "profile_calibrated": profile.calibrated, "command": command,
               "estimator": "measured_ms = fastest of the interleaved rounds, each the median of --repeats runs "
                            "after warm-up; ratio = simulated / measured",
               "goal": "batch 1, on each split: >= 80% of variants within +-25% and kendall_tau >= 0.8 "
                       "(long-term: 90% within +-15%, tau >= 0.9)",
               "held_out_rule": "held-out variants were chosen before they were first measured and are never used "
                                "to fit or tune the host profile",
               "splits": splits, "variants": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    table = Table(title=f"simulated vs measured host latency (batch 1; batch {args.batch} in the JSON)")
    for col in ("split", "variant", "measured ms", "simulated ms", "ratio", "naive ratio", "sparse layers"):
        table.add_column(col, justify="left" if col in ("split", "variant") else "right")
    for r in results:
        b = r["b1"]
        table.add_row(r["split"], r["variant"], f"{b['measured_ms']:.2f}", f"{b['sim_ms']:.2f}", f"{b['ratio']:.2f}",
                      f"{b['naive_ratio']:.2f}", str(r["sparse_layers"]))
    Console().print(table)
    keys = ("variants", "share_within_15pct", "share_within_25pct", "kendall_tau", "median_abs_error")
    for split, figures in splits.items():
        Console().print(split, {k: figures[k] for k in keys}, {"naive": figures["baseline_naive_roofline"]},
                        {f"batch{args.batch}": figures[f"batch{args.batch}"]})
    console.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
