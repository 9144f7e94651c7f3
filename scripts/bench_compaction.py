#!/usr/bin/env python
"""Does a compacted network run as much faster as its MAC count says? Host latency of channel-compacted
ResNet-50 (224x224) and ResNet-20 (32x32) at 50% and 75% MAC reduction, against the dense network.

    python scripts/bench_compaction.py            # writes bench_results/compaction.json
    python scripts/bench_compaction.py --quick    # ResNet-20 only, fewer repeats (smoke)

Each variant is made by L1-norm filter pruning with ``target: flops`` (a uniform keep ratio found by
bisection for the MAC reduction, residual-tied channel groups included) and then compacted
(:mod:`compress_run.core.compaction`), once with exact channel counts and once with counts rounded
to multiples of 8 (``channel_multiple=8``: oneDNN blocks channels by 8/16, so odd widths waste
work); its weights are the random init, which does not change the time. The eager form is the one evaluate
times: batch norms folded into the conv before them (``eager_batchnorm`` in the JSON says what was folded).
Per variant and batch size (1 and 32): efficiency = measured speedup over the dense network
(median latency, fastest of several interleaved rounds: contention from other tenants only adds time)
divided by the MAC-ratio speedup (dense MACs / compacted MACs). ``min_efficiency`` is the minimum over
all compacted variants and both batch sizes (``min_efficiency_exact`` / ``_x8`` per width rule); the
goal is >= 0.85. Default is one intra-op thread: on this 2-vCPU host a second thread adds ~0.1 ms of
synchronisation to every op, which makes small networks slower, not faster (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from compress_run.methods.l1_filter import L1Filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import efficiencies, print_speed_table, speed_rows, time_variants, write_result  # noqa: E402

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
    parser.add_argument("--eager-only", action="store_true", help="skip the ONNX Runtime (deployed) form")
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
    folding: dict[str, str] = {}
    times = time_variants(variants, batches, rounds, repeats, deployed=not args.eager_only, folding=folding)
    rows = speed_rows(variants, times, batches)
    exact, x8 = efficiencies(rows, batches, "/x1"), efficiencies(rows, batches, "/x8")
    deployed = {} if args.eager_only else {
        "min_deployed_efficiency": min(efficiencies(rows, batches, form="deployed")),
        "min_deployed_efficiency_x8": min(efficiencies(rows, batches, "/x8", form="deployed"))}
    command = "python scripts/bench_compaction.py" + (" --quick" if args.quick else "")
    result = write_result(args.out, "compaction", command, batches, rounds, repeats, rows,
                          min_efficiency=min(exact + x8), min_efficiency_exact=min(exact),
                          min_efficiency_x8=min(x8), goal_min_efficiency=0.85, eager_batchnorm=folding, **deployed,
                          note="exact: kept channel counts as the MAC target gives them (channel_multiple=1); x8: "
                               "rounded to multiples of 8 (channel_multiple=8)")
    console = Console()
    print_speed_table(rows, batches, f"compacted vs dense, host latency ({args.threads} threads)", console)
    console.print(f"min_efficiency = {result['min_efficiency']:.3f} "
                  f"(exact widths {result['min_efficiency_exact']:.3f}, "
                  f"multiples of 8 {result['min_efficiency_x8']:.3f}; goal >= 0.85) -> {args.out}")
    if deployed:
        console.print(f"deployed (ONNX Runtime): min_deployed_efficiency = {deployed['min_deployed_efficiency']:.3f} "
                      f"(multiples of 8 {deployed['min_deployed_efficiency_x8']:.3f})")


if __name__ == "__main__":
    main()
