#!/usr/bin/env python
"""Host speed of the sparse kernels against dense, per layer shape, sparsity and batch size.

    python scripts/bench_sparse_kernels.py            # writes bench_results/sparse_kernels.json
    python scripts/bench_sparse_kernels.py --quick    # two shapes, two sparsities (smoke)

Shapes: ResNet-50 convs (3×3 at 56/28/14/7, 1×1 at 56/14) at 224×224 and DeiT-S linears (qkv, proj, fc1,
fc2 on 197 tokens). Sparsities 80/90/95/98%, batch 1 and 32. Each kernel runs the mask of its own pattern at
the same sparsity (all projections of the same random weight's magnitudes): CSR — irregular mask through
torch.sparse CSR; BSR 4/16/32 — block masks of that size through torch.sparse BSR; GS — gather_scatter:16
mask through the compiled GS kernel (:mod:`compress_run.kernels.gather_scatter`). Speedup = dense layer
time / kernel time (median of ``--repeats``, fastest of ``--rounds`` interleaved rounds), torch's default
threads (all cores, as the host_cpu profile; ``--threads`` to change).
``gs_speedup_90``: median over shapes of GS's speedup at 90% (batch 1 and 32 pooled); ``gs_vs_csr_90``: the
median ratio CSR time / GS time at 90%. Goal: gs_speedup_90 >= 2.5 and GS within 20% of CSR.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.core.masks import attach_mask
from compress_run.core.projections import project
from compress_run.hardware.calibrate import bench_layer
from compress_run.hardware.measure import machine_description, median_seconds
from compress_run.kernels.gather_scatter import GSConv2d, GSLinear, compiled_kernel
from compress_run.kernels.sparse import sparse_module

ROOT = Path(__file__).resolve().parents[1]
# name -> (torch.nn layer, its constructor arguments, input shape without batch); the JSON rows carry both, so
# scripts/calibrate_hardware.py --sparse-from can rebuild and trace each layer when it re-fits the sparse formats.
SHAPES = {
    "r50.conv3x3.64@56": ("Conv2d", {"in_channels": 64, "out_channels": 64, "kernel_size": 3, "padding": 1},
                          (64, 56, 56)),
    "r50.conv3x3.128@28": ("Conv2d", {"in_channels": 128, "out_channels": 128, "kernel_size": 3, "padding": 1},
                           (128, 28, 28)),
    "r50.conv3x3.256@14": ("Conv2d", {"in_channels": 256, "out_channels": 256, "kernel_size": 3, "padding": 1},
                           (256, 14, 14)),
    "r50.conv3x3.512@7": ("Conv2d", {"in_channels": 512, "out_channels": 512, "kernel_size": 3, "padding": 1},
                          (512, 7, 7)),
    "r50.conv1x1.256-64@56": ("Conv2d", {"in_channels": 256, "out_channels": 64, "kernel_size": 1}, (256, 56, 56)),
    "r50.conv1x1.1024-256@14": ("Conv2d", {"in_channels": 1024, "out_channels": 256, "kernel_size": 1},
                                (1024, 14, 14)),
    "deit_s.qkv": ("Linear", {"in_features": 384, "out_features": 1152}, (197, 384)),
    "deit_s.proj": ("Linear", {"in_features": 384, "out_features": 384}, (197, 384)),
    "deit_s.fc1": ("Linear", {"in_features": 384, "out_features": 1536}, (197, 384)),
    "deit_s.fc2": ("Linear", {"in_features": 1536, "out_features": 384}, (197, 1536)),
}
KERNELS = {"csr": "irregular", "bsr_4": "block:4:4", "bsr_16": "block:16:16", "bsr_32": "block:32:32",
           "gs": "gather_scatter:16"}


def kernel_for(name: str, layer: nn.Module) -> nn.Module:
    if name == "gs":
        return GSConv2d(layer) if isinstance(layer, nn.Conv2d) else GSLinear(layer)
    return sparse_module(layer, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's default, all cores -- as the host_cpu profile)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "sparse_kernels.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    console.log(f"GS kernel: {'compiled' if compiled_kernel() is not None else 'PyTorch fallback'}")
    shapes = ["r50.conv3x3.256@14", "deit_s.fc1"] if args.quick else list(SHAPES)
    sparsities = (0.9, 0.98) if args.quick else (0.8, 0.9, 0.95, 0.98)
    batches = (1, 4) if args.quick else (1, 32)
    rounds, repeats = (1, 3) if args.quick else (args.rounds, args.repeats)
    rows = []
    for shape_name in shapes:
        module, kwargs, in_shape = SHAPES[shape_name]
        factory = lambda module=module, kwargs=kwargs: bench_layer({"module": module, "kwargs": kwargs})  # noqa: E731
        torch.manual_seed(0)
        dense = factory().eval()
        for sparsity in sparsities:
            layers, density = {"dense": dense}, {}
            for kernel, pattern in KERNELS.items():
                layer = factory().eval()
                layer.load_state_dict(dense.state_dict())
                mask = project(pattern, layer.weight.detach().abs(), 1 - sparsity)
                density[kernel] = mask.float().mean().item()
                attach_mask(layer, mask)
                layers[kernel] = kernel_for(kernel, layer)
            for batch in batches:
                x = torch.randn(batch, *in_shape)
                times = {k: [] for k in layers}
                with torch.inference_mode():
                    for _ in range(rounds):
                        for name, layer in layers.items():
                            run = lambda layer=layer, x=x: layer(x)  # noqa: E731
                            times[name].append(median_seconds(run, warmup=2, repeats=repeats))
                best = {k: min(v) * 1e3 for k, v in times.items()}
                row = {"shape": shape_name, "layer": {"module": module, "kwargs": kwargs}, "input": list(in_shape),
                       "sparsity": sparsity, "batch": batch, "density": density, "ms": best,
                       "speedup": {k: best["dense"] / best[k] for k in KERNELS}}
                rows.append(row)
                console.log(f"{shape_name} s={sparsity} b={batch}: " + ", ".join(
                    f"{k} {v:.2f}x" for k, v in row["speedup"].items()))
    at90 = [r for r in rows if r["sparsity"] == 0.9]
    result = {"benchmark": "sparse_kernels", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(), "command": "python scripts/bench_sparse_kernels.py" +
              (" --quick" if args.quick else ""), "threads": torch.get_num_threads(),
              "gs_kernel": "compiled" if compiled_kernel() else "torch",
              "rounds": rounds, "repeats": repeats, "rows": rows,
              "gs_speedup_90": statistics.median(r["speedup"]["gs"] for r in at90),
              "gs_vs_csr_90": statistics.median(r["ms"]["csr"] / r["ms"]["gs"] for r in at90),
              "goal": {"gs_speedup_90": 2.5, "gs_vs_csr_90": 0.8}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title="speedup over dense (median over shapes and batch sizes)")
    table.add_column("sparsity")
    for kernel in KERNELS:
        table.add_column(kernel, justify="right")
    for sparsity in sparsities:
        chosen = [r for r in rows if r["sparsity"] == sparsity]
        table.add_row(f"{sparsity:.0%}", *[f"{statistics.median(r['speedup'][k] for r in chosen):.2f}x"
                                            for k in KERNELS])
    console.print(table)
    console.print(f"gs_speedup_90 = {result['gs_speedup_90']:.2f} (goal 2.5), GS vs CSR at 90% = "
                  f"{result['gs_vs_csr_90']:.2f} (CSR time / GS time; goal >= 0.8) -> {args.out}")


if __name__ == "__main__":
    main()
