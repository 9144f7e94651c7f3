#!/usr/bin/env python
"""Do SPViT's trained selectors pick better tokens than chance? Their ranking against a random one, on a finished run.

    python scripts/spvit_ranking_probe.py <run dir of experiment=fmnist_vit_spvit> [--images 5000] [--draws 3]

Loads the run's finetune checkpoint (the small ViT of ``table=fmnist_vit_tokens`` with its selectors) and scores
the first ``--images`` Fashion-MNIST test images three ways, each keeping as many tokens at each selector as
inference does: the selectors' top-k (what the evaluate stage runs), a uniformly random choice of as many tokens
(``--draws`` seeded draws, mean), and every token kept (the selectors' package tokens then hold nothing). The
package token of the dropped tokens is weighted by the selectors' keep probabilities in both ranked forms, so the
forms differ only in which tokens stay. Also prints, per selector, the spread of the keep probabilities within an
image (mean over images of their standard deviation): near 0, the selectors barely tell tokens apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from compress_run.core.soft_tokens import SoftTokenBlock, TokenSelector, package_token
from compress_run.core.tokens import kept_count
from compress_run.pipeline.network_input import finished_run_network, finished_run_test_set

Ranking = Callable[[torch.Tensor], torch.Tensor]  # keep probabilities (batch, n) -> token order, best first


def ranked_drop(ranking: Ranking | None, spreads: dict[int, list[float]]) -> Callable[..., torch.Tensor]:
    """A replacement for ``SoftTokenBlock.drop_tokens`` that keeps the tokens ``ranking`` puts first (every token
    when ``ranking`` is None) and records the keep probabilities' spread per selector."""

    def drop(block: SoftTokenBlock, x: torch.Tensor, selector: TokenSelector) -> torch.Tensor:
        cls, patches, packages = block.split(x)
        _, keep_probs = selector(torch.cat([patches, packages], dim=1), None)
        keep_probs = keep_probs[:, :patches.shape[1]]
        spreads.setdefault(id(selector), []).append(float(keep_probs.std(dim=1).mean()))
        n, dim = patches.shape[1], patches.shape[-1]
        kept = n if ranking is None else kept_count(n, float(selector.relative_keep))
        order = torch.arange(n).expand(patches.shape[0], -1) if ranking is None else ranking(keep_probs)
        kept_idx, dropped_idx = order[:, :kept].sort(dim=1).values, order[:, kept:]
        merged = package_token(patches.gather(1, dropped_idx[..., None].expand(-1, -1, dim)),
                               keep_probs.gather(1, dropped_idx))
        return torch.cat([cls, patches.gather(1, kept_idx[..., None].expand(-1, -1, dim)), packages, merged], dim=1)

    return drop


def top1(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        hits = sum(int((net(chunk).argmax(-1) == target).sum()) for chunk, target in zip(x.split(500), y.split(500),
                                                                                           strict=True))
    return 100.0 * hits / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    net, cfg = finished_run_network(args.run_dir, "finetune.ckpt")
    x, labels = finished_run_test_set(cfg, args.images)
    original = SoftTokenBlock.drop_tokens
    spreads: dict[int, list[float]] = {}
    try:
        SoftTokenBlock.drop_tokens = ranked_drop(lambda p: p.argsort(dim=1, descending=True), spreads)
        selectors = top1(net, x, labels)
        random_scores = []
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(draw)
            SoftTokenBlock.drop_tokens = ranked_drop(
                lambda p, g=generator: torch.rand(p.shape, generator=g).argsort(dim=1), {})
            random_scores.append(top1(net, x, labels))
        SoftTokenBlock.drop_tokens = ranked_drop(None, {})
        every_token = top1(net, x, labels)
    finally:
        SoftTokenBlock.drop_tokens = original
    print(f"{args.run_dir.name} of {args.run_dir.parent.name}, {len(labels)} test images:")
    print(f"  selectors' top-k {selectors:.2f}%; random choice of as many tokens "
          f"{np.mean(random_scores):.2f}% ({', '.join(f'{s:.2f}' for s in random_scores)}); every token kept "
          f"{every_token:.2f}%")
    print("  keep-probability spread within an image, per selector: "
          + ", ".join(f"{np.mean(v):.3f}" for v in spreads.values()))


if __name__ == "__main__":
    main()
