"""Accuracy under noisy analog computation: a sweep over signal-to-noise ratios, with voting over K noisy passes.

For every SNR in ``evaluate.noise_snr_db`` the network classifies the test split ``max(noise_votes)`` times
with fresh noise (:mod:`compress_run.core.analog_noise`, the run's ``noise`` model at that SNR); the answer for
K votes uses the first K passes: ``majority`` takes the most frequent argmax (a tie goes to the class with the
larger mean softmax), ``mean_logit`` the argmax of the mean logits. K = 1 is one noisy pass. The noise is drawn
from a generator seeded by the run's seed, ``noise.seed`` and the SNR, so the sweep is repeatable and each seed of
a table draws its own noise. Where the model draws no random noise (SNR inf, no weight noise) one pass stands for
every K. The test batches are those the evaluate stage tests (``trainer.limit_test_batches`` included), streamed.

Writes ``noise_curve.csv`` and ``noise_curve.png`` (test top-1 against SNR, one line per K) into the run dir and
returns the flat metrics ``noise/top1/snr<S>/k<K>`` (S as in the config: ``inf``, ``20``, ``0``, ``-5``, ``2.5``)
plus the mean and std of the single passes' top-1 (``noise/top1_pass_mean|std/snr<S>``). A causal language model
is scored by its test (and out-of-domain) perplexity under one noisy pass per SNR: ``noise/test_ppl/snr<S>``,
``noise/test_nll/snr<S>``, ``noise/ood_ppl/snr<S>``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compress_run.core.analog_noise import NoiseSpec, at_snr, covered_layers, noisy
from compress_run.core.errors import UserError
from compress_run.methods.noise_injection import NoiseInjection
from compress_run.pipeline.checkpoints import atomic_write_text
from compress_run.pipeline.schema import NoiseConfig

VOTE_RULES = ("majority", "mean_logit")


def snr_tag(snr_db: float) -> str:
    return "inf" if math.isinf(snr_db) else f"{snr_db:g}"


def vote(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """Predicted classes from ``logits`` of K passes (K, N, C)."""
    if rule == "mean_logit":
        return logits.mean(0).argmax(1)
    counts = torch.nn.functional.one_hot(logits.argmax(2), logits.shape[2]).sum(0).float()
    tie_break = logits.softmax(2).mean(0)  # < 1: decides only between classes with equal counts
    return (counts + tie_break).argmax(1)


def draw_seed(run_seed: int, noise_seed: int, snr_db: float) -> int:
    """The evaluation noise's seed at one SNR: the run's seed, ``noise.seed`` and the SNR itself (adding an SNR to a
    sweep leaves the draws at the others as they were)."""
    return zlib.crc32(f"{run_seed}/{noise_seed}/{snr_tag(snr_db)}".encode())


@torch.no_grad()
def noise_sweep(net: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], spec: NoiseSpec,
                snrs: list[float], votes: list[int], rule: str, seed: Callable[[float], int],
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Test accuracy of ``net`` at each SNR for each K in ``votes`` (rows of the curve); ``batches()`` gives a
    fresh pass over the test batches, ``seed(snr)`` the noise seed at that SNR."""
    most = max(votes)
    was_training = net.training
    net.eval()
    rows = []
    try:
        for snr in snrs:
            noise = at_snr(spec, snr)
            passes = most if noise.random() else 1
            generator = torch.Generator().manual_seed(seed(snr))
            correct = torch.zeros(len(votes))
            pass_correct = torch.zeros(passes)
            total = 0
            with noisy(net, noise, generator):
                for x, y in batches():
                    logits = torch.stack([net(x).float() for _ in range(passes)])
                    pass_correct += (logits.argmax(2) == y).sum(1).float()
                    for i, k in enumerate(votes):
                        correct[i] += (vote(logits[: min(k, passes)], rule) == y).sum()
                    total += len(y)
            single = pass_correct / total
            spread = float(single.std()) if passes > 1 else 0.0
            for i, k in enumerate(votes):
                rows.append({"snr_db": snr, "votes": k, "rule": rule, "top1": float(correct[i] / total),
                             "passes_run": passes, "pass_top1_mean": float(single.mean()), "pass_top1_std": spread,
                             "test_samples": total})
            log(f"noise at SNR {snr_tag(snr)} dB: top-1 " + ", ".join(
                f"K={k} {100 * float(correct[i] / total):.2f}%" for i, k in enumerate(votes))
                + (f" (single passes {100 * float(single.mean()):.2f} ± {100 * spread:.2f}%)" if passes > 1 else ""))
    finally:
        net.train(was_training)
    return rows


@torch.no_grad()
def lm_noise_sweep(net: nn.Module, evaluate: Callable[[], dict[str, Any]], spec: NoiseSpec, snrs: list[float],
                   seed: Callable[[float], int], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """A causal language model's test (and out-of-domain) perplexity with one noisy pass at each SNR;
    ``evaluate()`` gives the run's language-model metrics of ``net``."""
    rows = []
    for snr in snrs:
        with noisy(net, at_snr(spec, snr), torch.Generator().manual_seed(seed(snr))):
            metrics = evaluate()
        row = {"snr_db": snr, "votes": 1, "rule": "one pass", **{
            key: metrics[f"{split}/{name}"] for split in ("test", "ood") for key, name in
            ((f"{split}_ppl", "ppl"), (f"{split}_nll", "nll")) if f"{split}/{name}" in metrics}}
        rows.append(row)
        log(f"noise at SNR {snr_tag(snr)} dB: test perplexity {row['test_ppl']:.3f}"
            + (f", out-of-domain {row['ood_ppl']:.3f}" if "ood_ppl" in row else ""))
    return rows


def curve_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The flat metrics of a curve (see the module docstring)."""
    out: dict[str, float] = {}
    for row in rows:
        tag = snr_tag(row["snr_db"])
        if "test_ppl" in row:  # a language model
            out.update({f"noise/{key}/snr{tag}": value for key, value in row.items() if key.endswith(("ppl", "nll"))})
            continue
        out[f"noise/top1/snr{tag}/k{row['votes']}"] = row["top1"]
        out[f"noise/top1_pass_mean/snr{tag}"] = row["pass_top1_mean"]
        out[f"noise/top1_pass_std/snr{tag}"] = row["pass_top1_std"]
    return out


def write_curve(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """``noise_curve.csv`` and ``noise_curve.png`` in ``out_dir``; returns their names."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "noise_curve.csv", buffer.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["snr_db"] for r in rows if not math.isinf(r["snr_db"])]
    inf_at = (max(finite) + 5.0) if finite else 0.0  # SNR inf drawn right of the finite points
    language = "test_ppl" in rows[0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k in sorted({r["votes"] for r in rows}):
        points = sorted((inf_at if math.isinf(r["snr_db"]) else r["snr_db"],
                         r["test_ppl"] if language else 100 * r["top1"]) for r in rows if r["votes"] == k)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label="test perplexity" if language else f"K={k} ({rows[0]['rule']})")
    if any(math.isinf(r["snr_db"]) for r in rows):
        ticks = sorted(set(finite)) + [inf_at]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["inf"])
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("test perplexity" if language else "test top-1 (%)")
    if language:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "noise_curve.png", dpi=120)
    plt.close(fig)
    return {"noise_curve_csv": "noise_curve.csv", "noise_curve_png": "noise_curve.png"}


def fitting_stages(cfg: DictConfig, method_stages: tuple[str, ...], quantizer: Any) -> set[str]:
    """The stages of this run that train the network (call ``fit``): noise-injected training can act only there."""
    fits = {stage for stage in ("train", "finetune") if stage in cfg.stages and stage in method_stages
            and cfg.schedule[stage].epochs > 0}
    if "quantize" in cfg.stages and quantizer is not None and quantizer.training() is not None:
        fits.add("quantize")
    return fits


class RunNoise:
    """A run's ``noise`` group and ``evaluate.noise_*`` keys: the checks before any stage, the injection callback of
    the stages in ``noise.train_stages``, and the evaluate stage's sweep. The sweep's noise model is the ``noise``
    group when one is chosen, else the noise the method trains under (``Method.training_noise``), else the
    group's defaults (``noise=analog``: output noise on every conv/linear layer)."""

    def __init__(self, cfg: DictConfig, method_noise: NoiseSpec | None, causal_lm: bool) -> None:
        self.config: NoiseConfig | None = OmegaConf.to_object(cfg.noise) if cfg.get("noise") is not None else None
        self.method_noise = method_noise
        self.causal_lm = causal_lm
        self.run_seed = int(cfg.seed)
        evaluate = cfg.evaluate
        self.asked = bool(evaluate.get("noise_snr_db"))
        self.snrs = [float(v) for v in evaluate.noise_snr_db] if self.asked else []
        if not self.snrs and self.config is not None and self.config.snr_db is not None:
            self.snrs = [float(self.config.snr_db)]  # the group alone: accuracy at its own SNR
        self.votes = sorted({int(k) for k in evaluate.get("noise_votes") or [1]})
        self.rule = str(evaluate.get("noise_vote", "majority"))

    @property
    def model(self) -> NoiseSpec:
        """The noise model of the evaluation sweep (at each SNR of it)."""
        if self.config is not None:
            return self.config.spec()
        return self.method_noise if self.method_noise is not None else NoiseConfig().spec()

    def check(self, net: nn.Module, choice: str | None, fits: set[str]) -> None:
        """Exit 2 before any stage if the noise covers no layer or names one that is not there, trains in a stage
        that does not train, comes twice into one stage, or asks a language model for votes."""
        if self.causal_lm and self.votes != [1]:
            raise UserError(f"evaluate.noise_votes={self.votes}: a causal language model is scored by its perplexity "
                            "under one noisy pass; votes over passes are a classifier's", "drop evaluate.noise_votes")
        if self.config is None and not self.snrs:
            return
        try:
            layers = covered_layers(net, list(self.model.include), list(self.model.exclude))
        except ValueError as exc:
            raise UserError(f"noise.{exc}", "name layers of this model (globs over module names) in noise.include "
                            "/ noise.exclude; `compress-run --cfg job` shows the composed noise group") from exc
        if not layers:
            raise UserError(f"noise={choice}: noise.include/exclude leave no conv/linear layer to make noisy",
                            "widen noise.include or shorten noise.exclude")
        stages = list(self.config.train_stages) if self.config is not None else []
        idle = [s for s in stages if s not in fits]
        if idle:
            raise UserError(f"noise.train_stages={stages} names {idle}, which does not train in this run (a stage "
                            "trains when it is in `stages`, the method uses it and it has epochs > 0; quantize "
                            "trains only with a quantization-aware quant=, e.g. qat_w8a8)",
                            f"drop {idle} from noise.train_stages, or make the stage train")
        if self.method_noise is not None and "train" in stages:
            raise UserError("the method already trains its train stage under noise (method.snr_db and the method's "
                            "noise keys), and noise.train_stages=[train] would add a second noise on the same products",
                            "drop train from noise.train_stages (the noise group still sets the evaluation noise)")

    def training_callbacks(self, stage: str) -> list[NoiseInjection]:
        if self.config is None or stage not in self.config.train_stages:
            return []
        return [NoiseInjection(self.config.training_spec())]

    def report(self, net: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               out_dir: Path, log: Callable[[str], None],
               lm_evaluate: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The evaluate stage's sweep: metrics, the curve's rows, and its files in ``out_dir``; a causal LM's
        (``lm_evaluate``: its metrics) is scored by perplexity."""
        if not self.snrs:
            return {}
        model = self.model
        noise_seed = self.config.seed if self.config is not None else 0
        seed = functools.partial(draw_seed, self.run_seed, noise_seed)
        log(f"stage evaluate: {'perplexity' if self.causal_lm else 'accuracy'} under noise at SNR "
            f"{', '.join(snr_tag(s) for s in self.snrs)} dB"
            + ("" if self.causal_lm else f", K = {', '.join(map(str, self.votes))} ({self.rule} vote)"))
        try:
            rows = lm_noise_sweep(net, lm_evaluate, model, self.snrs, seed, log) if self.causal_lm else \
                noise_sweep(net, batches, model, self.snrs, self.votes, self.rule, seed, log)
        except ValueError as exc:  # the finished network no longer has what the noise names (checked at the start)
            raise UserError(f"the evaluation under noise cannot run on the finished network: {exc}",
                            "change noise.include/exclude (or weight_noise) for the compressed network") from exc
        source = "noise group" if self.config is not None else \
            "the method's training noise" if self.method_noise is not None else "noise=analog defaults"
        return {**curve_metrics(rows), "noise_curve": rows, **write_curve(rows, out_dir),
                "noise/model": {**asdict(model), "seed": noise_seed, "from": source}}
