#!/usr/bin/env python
"""How much denser Tri-level E-ViT's attention masks are in the authors' code than in ours, on a trained network.

    python scripts/evit_mask_ties.py <run dir of experiment=fmnist_vit_evit> [--images 2000]

Our mask keeps exactly ``k = ceil(attention_keep x r)`` patch links per kept patch query. The authors' code
(ZLKong/Tri-Level-ViT, ``Block.forward``) keeps every link ``>=`` the k-th largest head-averaged attention; their
softmax adds ``1e-6 / N`` to every weight, so the links the previous mask dropped all tie at that floor, and a row
with fewer than k links left open keeps its whole row. For each mask-building block this prints the share of kept
patch rows with fewer than k open links — the rows the authors' code would run dense — on the first ``--images``
Fashion-MNIST test images (the small ViT of ``table=fmnist_vit_tokens``; docs/fidelity.md, row evit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import compress_run.core.tokens as tokens
from compress_run.pipeline.network_input import finished_run_network, finished_run_test_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    net, cfg = finished_run_network(args.run_dir, "train.ckpt")
    shares: dict[int, list[tuple[float, int, int]]] = {}
    calls = [0]
    choose = tokens.choose_links

    def probe(probs: torch.Tensor, kept_idx: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
        patch = probs[:, :, 1:, 1:].mean(dim=1)
        if kept_idx is not None:
            n, r = patch.shape[1], kept_idx.shape[1]
            patch = patch.gather(1, kept_idx[..., None].expand(-1, -1, n))
            patch = patch.gather(2, kept_idx[:, None, :].expand(-1, r, -1))
        k = tokens.kept_links(patch.shape[-1], fraction)
        shares.setdefault(calls[0] % len(builders), []).append(
            (float(((patch > 0).sum(-1) < k).float().mean()), k, patch.shape[-1]))
        calls[0] += 1
        return choose(probs, kept_idx, fraction)

    builders = [b for b in net.blocks if isinstance(b, tokens.TokenPruningBlock) and b.builds_links()]
    tokens.choose_links = probe
    x, _ = finished_run_test_set(cfg, args.images)
    with torch.no_grad():
        for chunk in x.split(500):
            net(chunk)
    for index, rows in sorted(shares.items()):
        share = sum(r[0] for r in rows) / len(rows)
        print(f"mask-building block {index + 1} of {len(builders)}: k = {rows[0][1]} of {rows[0][2]} kept patches; "
              f"rows the authors' threshold would keep whole: {100 * share:.1f}%")


if __name__ == "__main__":
    main()
