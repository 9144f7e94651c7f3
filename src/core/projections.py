"""Pattern projections: scores of one weight tensor + a target density -> a boolean keep-mask.

Every pruning method takes ``pattern=`` and calls :func:`project`. A pattern is named by a spec string,
``name`` or ``name:arg:arg`` (:func:`parse_pattern`):

* ``irregular`` — the top ``density`` fraction of entries.
* ``nm:N:M`` (e.g. ``nm:2:4``) — N largest in every group of M consecutive inputs of a row; the density is
  fixed at N/M (the requested one is ignored; methods check it, :func:`fixed_density`).
* ``block:R:C[:mean]`` (e.g. ``block:4:4``) — R×C blocks scored by the sum (or mean) of their scores, the
  top blocks kept; edge blocks are partial.
* ``gather_scatter:B[:E[:T]]`` (e.g. ``gather_scatter:16``, tiled ``gather_scatter:16:1:64``) — Sun et al. 2021:
  rows in groups of B/E, every row of a group with the same count and every bank (column mod B) with the
  same count (packs of B entries, E per row and one per bank); T > 0 groups rows inside tiles of T rows by
  their above-threshold counts (the paper's tiled variant). :mod:`compress_run.core.gs_pattern`.
* ``filter`` — whole output rows; ``channel`` — whole input channels (all k×k positions of one C_in).

A conv weight [C_out, C_in, K_h, K_w] is seen as the matrix C_out × (K_h·K_w·C_in), input channel fastest
(:func:`as_matrix`), a linear weight as [out, in]; masks come back in the weight's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress_run.core.gs_pattern import check_gather_scatter, gather_scatter, gs_shape_problem
from compress_run.core.weight_matrix import as_matrix, from_matrix, keep_count

__all__ = ["as_matrix", "from_matrix", "keep_count", "check_gather_scatter", "gather_scatter", "project",
           "parse_pattern", "fixed_density", "check_pattern", "pattern_shape_problem"]

Projection = Callable[..., torch.Tensor]


def irregular(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Unstructured: keep the ``round(density * numel)`` highest-scoring entries."""
    k = keep_count(scores.numel(), density)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(scores)


def nm(scores: torch.Tensor, density: float, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M: the ``n`` best of every ``m`` consecutive columns of each row (a short last group keeps
    min(n, its length))."""
    matrix = as_matrix(scores).float()
    rows, cols = matrix.shape
    pad = (-cols) % m
    padded = F.pad(matrix, (0, pad), value=-math.inf).reshape(rows, -1, m)
    keep = torch.zeros_like(padded, dtype=torch.bool)
    keep.scatter_(2, padded.topk(n, dim=2).indices, True)
    keep &= padded > -math.inf
    return from_matrix(keep.reshape(rows, -1)[:, :cols], scores.shape)


def block(scores: torch.Tensor, density: float, r: int = 4, c: int = 4, reduce: str = "sum") -> torch.Tensor:
    """r×c blocks of the matrix view scored by the sum (or mean over real entries) of their scores."""
    matrix = as_matrix(scores).float()
    rows, cols = matrix.shape
    padded = F.pad(matrix, (0, (-cols) % c, 0, (-rows) % r))
    block_scores = F.avg_pool2d(padded[None, None], (r, c))[0, 0] * (r * c)
    if reduce == "mean":
        real = F.avg_pool2d(F.pad(torch.ones_like(matrix), (0, (-cols) % c, 0, (-rows) % r))[None, None], (r, c))
        block_scores = block_scores / (real[0, 0] * r * c)
    keep_blocks = irregular(block_scores, density)
    keep = keep_blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return from_matrix(keep, scores.shape)


def filter_pattern(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Whole output rows (filters), scored by their summed scores."""
    matrix = as_matrix(scores).float()
    keep = irregular(matrix.sum(1), density)[:, None].expand_as(matrix)
    return from_matrix(keep, scores.shape)


def channel_pattern(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Whole input channels (every k×k position of one C_in for all outputs), scored by their sums."""
    per_channel = scores.float().sum(dim=(0, 2, 3)) if scores.dim() == 4 else scores.float().sum(0)
    keep = irregular(per_channel, density)
    shape = (1, -1, 1, 1) if scores.dim() == 4 else (1, -1)
    return keep.view(shape).expand_as(scores).clone()


PATTERNS: dict[str, Projection] = {"irregular": irregular, "nm": nm, "block": block, "filter": filter_pattern,
                                   "channel": channel_pattern, "gather_scatter": gather_scatter}
ARGS: dict[str, tuple[tuple[str, type], ...]] = {
    "irregular": (), "filter": (), "channel": (), "nm": (("n", int), ("m", int)),
    "block": (("r", int), ("c", int), ("reduce", str)),
    "gather_scatter": (("banks", int), ("elems", int), ("tile", int))}


def parse_pattern(spec: str) -> tuple[str, dict[str, object]]:
    """``"nm:2:4"`` -> ``("nm", {"n": 2, "m": 4})``; raises ValueError with the accepted forms."""
    name, *raw = str(spec).split(":")
    if name not in PATTERNS:
        raise ValueError(f"unknown pattern {name!r}; known: {', '.join(PATTERNS)} (e.g. irregular, nm:2:4, "
                         "block:4:4, gather_scatter:16, filter, channel)")
    params = ARGS[name]
    if len(raw) > len(params):
        raise ValueError(f"pattern {spec!r}: {name} takes at most {len(params)} argument(s) "
                         f"({', '.join(p for p, _ in params) or 'none'})")
    try:
        kwargs = {key: kind(value) for (key, kind), value in zip(params, raw, strict=False)}
    except ValueError:
        raise ValueError(f"pattern {spec!r}: arguments must be {[k.__name__ for _, k in params]}") from None
    bad = (name == "nm" and not 0 < kwargs.get("n", 2) <= kwargs.get("m", 4)) or \
        (name == "block" and (min(kwargs.get("r", 4), kwargs.get("c", 4)) < 1
                              or kwargs.get("reduce", "sum") not in ("sum", "mean"))) or \
        (name == "gather_scatter" and (kwargs.get("banks", 16) < 1 or kwargs.get("elems", 1) < 1
                                       or kwargs.get("banks", 16) % kwargs.get("elems", 1)
                                       or kwargs.get("tile", 0) < 0
                                       or kwargs.get("tile", 0) % (kwargs.get("banks", 16) // kwargs.get("elems", 1))))
    if bad:
        raise ValueError(f"pattern {spec!r}: need 0 < N <= M (nm), R, C >= 1 and reduce sum|mean (block), "
                         "E dividing B and a tile T >= 0 that is a multiple of B/E (gather_scatter)")
    return name, kwargs


def fixed_density(spec: str) -> float | None:
    """The density a pattern imposes whatever the target (N:M: N/M), or None."""
    name, kwargs = parse_pattern(spec)
    return kwargs.get("n", 2) / kwargs.get("m", 4) if name == "nm" else None


def project(pattern: str, scores: torch.Tensor, density: float) -> torch.Tensor:
    name, kwargs = parse_pattern(pattern)
    return PATTERNS[name](scores, density, **kwargs)


def pattern_shape_problem(pattern: str, shape: torch.Size | tuple[int, ...],
                          density: float | None = None) -> str | None:
    """Why a weight of ``shape`` cannot hold ``pattern`` (at ``density`` within 0.01, if given) — None if it can."""
    name, kwargs = parse_pattern(pattern)
    if name == "gather_scatter":
        return gs_shape_problem(shape, **kwargs, density=density)
    return None


@torch.no_grad()
def check_pattern(pattern: str, mask: torch.Tensor) -> list[str]:
    """Violations of ``pattern`` in ``mask`` (empty list = the mask is one the pattern can produce)."""
    name, kwargs = parse_pattern(pattern)
    matrix = as_matrix(mask).bool()
    rows, cols = matrix.shape
    if name == "gather_scatter":
        return check_gather_scatter(mask, **kwargs)
    if name == "nm":
        n, m = kwargs.get("n", 2), kwargs.get("m", 4)
        pad = (-cols) % m
        groups = F.pad(matrix.float(), (0, pad)).reshape(rows, -1, m).sum(2)
        real = F.pad(torch.ones(rows, cols), (0, pad)).reshape(rows, -1, m).sum(2)
        bad = groups != torch.minimum(real, torch.full_like(real, n))
        return [f"{int(bad.sum())} groups of {m} do not keep exactly {n}"] if bool(bad.any()) else []
    if name == "block":
        r, c = kwargs.get("r", 4), kwargs.get("c", 4)
        padded = F.pad(matrix.float(), (0, (-cols) % c, 0, (-rows) % r))
        real = F.pad(torch.ones(rows, cols), (0, (-cols) % c, 0, (-rows) % r))
        kept = F.avg_pool2d(padded[None, None], (r, c))[0, 0]
        size = F.avg_pool2d(real[None, None], (r, c))[0, 0]
        mixed = (kept > 0) & (kept < size)
        return [f"{int(mixed.sum())} blocks of {r}x{c} are partly kept"] if bool(mixed.any()) else []
    if name == "filter":
        mixed = matrix.any(1) & ~matrix.all(1)
        return [f"{int(mixed.sum())} filters are partly kept"] if bool(mixed.any()) else []
    if name == "channel":
        per_channel = mask.bool().transpose(0, 1).reshape(mask.shape[1], -1)
        mixed = per_channel.any(1) & ~per_channel.all(1)
        return [f"{int(mixed.sum())} input channels are partly kept"] if bool(mixed.any()) else []
    return []


def rank01(x: torch.Tensor) -> torch.Tensor:
    """Ranks of the entries of ``x`` scaled into [0, 1) (order-preserving, scale-free scores)."""
    flat = x.detach().flatten().float()
    ranks = torch.empty_like(flat)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=torch.float32) / flat.numel()
    return ranks.view_as(x)


@torch.no_grad()
def drop_and_regrow(pattern: str, mask: torch.Tensor, keep_scores: torch.Tensor, grow_scores: torch.Tensor,
                    keep: int, grow: int, regrow_dropped: bool = True) -> torch.Tensor:
    """A pattern-valid mask update for dynamic sparse training (RigL, MEST) with any projection.

    Drop: the active entries (``mask``) are projected onto ``pattern`` at ``keep`` entries by ``keep_scores``
    (inactive entries rank below every active one), so whole pattern units (blocks, filters, packs) leave.
    Regrow: the survivors rank above everything else and the rest by ``grow_scores`` (the entries dropped
    just now last unless ``regrow_dropped``); the projection at ``grow`` entries keeps the survivors and
    fills the pattern with the best candidates. For a fixed-density pattern (N:M) the drop is element-wise
    (the ``keep`` weakest-scored active entries stay... the rest leave) and the regrowth refills each group
    to its N, so entries are swapped inside their groups and the count never changes."""
    numel = mask.numel()
    active = torch.where(mask, rank01(keep_scores), torch.full_like(keep_scores, -1.0, dtype=torch.float32))
    if fixed_density(pattern) is None:
        survivors = project(pattern, active, keep / numel) & mask
    else:
        survivors = irregular(active, keep / numel) & mask
    dropped = mask & ~survivors
    candidates = rank01(grow_scores)
    if not regrow_dropped:
        candidates = torch.where(dropped, candidates - 1.0, candidates)
    # survivors above any unit of candidates, whatever the unit's size (a block's score is a sum)
    candidates = torch.where(survivors, float(numel) + rank01(keep_scores), candidates)
    return project(pattern, candidates, grow / numel)
