#!/usr/bin/env python
"""What does the pipeline add to a training step? The same model, data, batch size, optimizer and threads, trained
through compress-run's Lightning path and through a plain PyTorch loop, interleaved in one run.

    python scripts/bench_overhead.py            # writes bench_results/overhead.json
    python scripts/bench_overhead.py --quick    # fewer steps and rounds (smoke)

Variants: ``dense`` (the train stage of ``method=dense``) and ``masked`` (the finetune stage after one-shot 90%
magnitude pruning: the MaskEnforcer callback zeroes masked gradients before every step and re-applies the masks
after it; the plain loop does the same two multiplications by hand). Both paths read the same in-memory
Fashion-MNIST tensors (ResNet-20, batch 128), run the same batch-wise augmentation (random crop with padding,
horizontal flip) and normalisation, the same SGD (momentum, Nesterov, weight decay) and cross-entropy. A step's
time is the interval between the starts of consecutive batches (data, forward, backward, optimizer, callbacks,
logging: everything the loop does per batch), median over the steps after a warm-up; the first steps of a stage
and its epoch end are left out.
Rounds interleave the paths, and alternate which goes first, so drift on a shared host hits both alike; the
ratio (pipeline / plain) is taken per round and the median over rounds reported. Goals (issue 23): <= 1.05
dense, <= 1.10 masked.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from rich.console import Console
from rich.table import Table

import compress_run.pipeline.cli  # noqa: F401  (registers the config schemas and resolvers)
from compress_run.core.masks import apply_masks, mask_gradients
from compress_run.hardware.measure import machine_description
from compress_run.pipeline.checkpoints import atomic_write_json
from compress_run.pipeline.data import random_crop_flip
from compress_run.pipeline.runner import Pipeline

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"dense": ["method=dense"],
            "masked": ["method=magnitude", "method.sparsity=0.9"]}


class StepClock(L.Callback):
    """Start time of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def step_ms(starts: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:], strict=False)]
    return statistics.median(gaps) * 1e3


def pipeline_for(variant: str, steps: int, batch: int, out: Path, extra: list[str]) -> Pipeline:
    with initialize_config_module("compress_run.conf", version_base="1.3"):
        overrides = [*VARIANTS[variant], *extra, "dataset=fashion_mnist", "schedule=fmnist",
                     f"schedule.batch_size={batch}", f"trainer.limit_train_batches={steps + 1}",
                     "trainer.limit_val_batches=0",
                     "trainer.enable_model_summary=false", "logger=none", f"output_dir={out}"]
        cfg = compose("config", overrides=overrides)
    pipeline = Pipeline(cfg, out, overrides, {"method": VARIANTS[variant][0].split("=")[1]})
    pipeline.setup()
    return pipeline


def through_pipeline(pipeline: Pipeline, variant: str, warmup: int) -> float:
    """Median step time of one epoch of the stage the variant trains in, through ``Pipeline.fit``."""
    clock = StepClock()
    net = pipeline.new_net()
    stage = "train"
    if variant == "masked":
        net = pipeline.method.compress(pipeline.method.prepare(net), pipeline.datamodule)
        stage = "finetune"
    for stale in pipeline.ckpt_dir.glob(f"{stage}*.ckpt"):
        stale.unlink()  # every round trains afresh (no resume from the previous round's checkpoint)
    pipeline.fit(stage, net, epochs=1, callbacks=[*pipeline.method.training_callbacks(stage, net), clock])
    return step_ms(clock.starts, warmup)


def plain_loop(pipeline: Pipeline, variant: str, steps: int, warmup: int) -> float:
    """Median step time of the same training written as a plain PyTorch loop."""
    cfg, data = pipeline.cfg, pipeline.datamodule
    net = pipeline.new_net()
    if variant == "masked":
        net = pipeline.method.compress(pipeline.method.prepare(net), data)
    options = {k: v for k, v in cfg.schedule.optimizer.items() if not k.startswith("_")}
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.schedule.train.lr, **options)
    generator = torch.Generator().manual_seed(0)
    net.train()
    starts: list[float] = []
    for i, (x, y) in enumerate(data.train_dataloader()):
        if i > steps:
            break
        starts.append(time.perf_counter())
        x = data.normalize(random_crop_flip(x, data.crop_pad, data.flip, generator))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if variant == "masked" and pipeline.method.mask_grads:
            mask_gradients(net)  # what the method's MaskEnforcer does before the step (method.mask_grads)
        optimizer.step()
        if variant == "masked":
            apply_masks(net)
    return step_ms(starts, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--override", action="append", default=[],
                        help="a compress-run override for the pipeline path, e.g. trainer.deterministic=false "
                             "(repeatable; to find where time goes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "overhead.json")
    args = parser.parse_args()
    steps, rounds = (12, 1) if args.quick else (args.steps, args.rounds)
    warmup = max(2, steps // 6)
    torch.set_num_threads(args.threads)
    console = Console()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            pipeline = pipeline_for(variant, steps, args.batch, Path(tmp) / variant, args.override)
            rounds_ms: dict[str, list[float]] = {"pipeline": [], "plain": []}
            for r in range(rounds):  # odd rounds run the plain loop first, so neither path always goes second
                console.log(f"{variant}: round {r + 1}/{rounds}")
                for path in (("pipeline", "plain") if r % 2 == 0 else ("plain", "pipeline")):
                    rounds_ms[path].append(through_pipeline(pipeline, variant, warmup) if path == "pipeline"
                                           else plain_loop(pipeline, variant, steps, warmup))
            ratios = [p / q for p, q in zip(rounds_ms["pipeline"], rounds_ms["plain"], strict=True)]
            rows[variant] = {"pipeline_step_ms": rounds_ms["pipeline"], "plain_step_ms": rounds_ms["plain"],
                             "ratio_per_round": ratios, "ratio": statistics.median(ratios)}
    command = "python scripts/bench_overhead.py" + "".join(
        f" --{k} {getattr(args, k)}" for k in ("steps", "rounds", "threads", "batch")
        if getattr(args, k) != parser.get_default(k)) + "".join(f" --override {o}" for o in args.override)
    result = {"benchmark": "overhead", "command": command,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description(),
              "settings": {"model": "resnet20", "dataset": "fashion_mnist", "batch": args.batch, "steps": steps,
                           "warmup_steps": warmup, "rounds": rounds, "threads": args.threads,
                           "pipeline_overrides": args.override},
              "goal": {"dense": 1.05, "masked": 1.10}, "variants": rows,
              "ratio_dense": rows["dense"]["ratio"], "ratio_masked": rows["masked"]["ratio"]}
    table = Table(title="training step: pipeline vs plain loop (median over rounds)")
    for col in ("variant", "pipeline ms/step", "plain ms/step", "ratio", "goal"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for variant, row in rows.items():
        table.add_row(variant, f"{statistics.median(row['pipeline_step_ms']):.1f}",
                      f"{statistics.median(row['plain_step_ms']):.1f}", f"{row['ratio']:.3f}",
                      f"<= {result['goal'][variant]:.2f}")
    console.print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        console.print(f"written: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
