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
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from rich.console import Console
from torch import nn

from compress_run.hardware.macs import count_macs
from compress_run.methods.comcat import COMCAT
from compress_run.methods.elrt import ELRT
from compress_run.methods.svd import SVD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import efficiencies, print_speed_table, speed_rows, time_variants, write_result  # noqa: E402

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
        COMCAT.resvd(choices, {id(c): max(1, round(fraction * c.full)) for c in choices})
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
    parser.add_argument("--eager-only", action="store_true", help="skip the ONNX Runtime (deployed) form")
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
    folding: dict[str, str] = {}
    times = time_variants(variants, batches, rounds, repeats, console.log, deployed=not args.eager_only,
                          folding=folding)
    rows = speed_rows(variants, times, batches)
    per_form = {form: min(efficiencies(rows, batches, f"/{form}/")) for form in ("svd", "tucker2", "comcat")
                if efficiencies(rows, batches, f"/{form}/")}
    result = write_result(args.out, "lowrank", "python scripts/bench_lowrank.py" + (" --quick" if args.quick else ""),
                          batches, rounds, repeats, rows, min_efficiency=min(efficiencies(rows, batches)),
                          min_efficiency_per_form=per_form, goal_min_efficiency=0.85, eager_batchnorm=folding,
                          **({} if args.eager_only else
                             {"min_deployed_efficiency": min(efficiencies(rows, batches, form="deployed"))}))
    print_speed_table(rows, batches, f"factorized vs dense, host latency ({args.threads} threads)", console)
    console.print(f"min_efficiency = {result['min_efficiency']:.3f} per form {per_form} (goal >= 0.85) -> {args.out}")
    if "min_deployed_efficiency" in result:
        console.print(f"deployed (ONNX Runtime): min_deployed_efficiency = {result['min_deployed_efficiency']:.3f}")


if __name__ == "__main__":
    main()
