"""Pattern projections: scores of one weight tensor + a target density -> a boolean keep-mask.

Every pruning method takes ``pattern=`` and calls :func:`project`. A pattern is named by a spec string,
``name`` or ``name:arg:arg`` (:func:`parse_pattern`):

* ``irregular`` — the top ``density`` fraction of entries.
* ``nm:N:M`` (e.g. ``nm:2:4``) — N largest in every group of M consecutive inputs of a row; the density is
  fixed at N/M (the requested one is ignored; methods check it, :func:`fixed_density`).
* ``block:R:C[:mean]`` (e.g. ``block:4:4``) — R×C blocks scored by the sum (or mean) of their scores, the
  top blocks kept; edge blocks are partial.
* ``gather_scatter:B[:E]`` (e.g. ``gather_scatter:16``) — Sun et al. 2021: rows in groups of B/E, every row
  of a group with the same count and every bank (column mod B) with the same count; greedy packs of B
  entries, E per row and one per bank (:func:`gather_scatter`, checker :func:`check_gather_scatter`).
* ``filter`` — whole output rows; ``channel`` — whole input channels (all k×k positions of one C_in).

A conv weight [C_out, C_in, K_h, K_w] is seen as the matrix C_out × (K_h·K_w·C_in), input channel fastest
(:func:`as_matrix`), a linear weight as [out, in]; masks come back in the weight's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Projection = Callable[..., torch.Tensor]


def keep_count(numel: int, density: float) -> int:
    """Number of entries kept at ``density`` (rounded to nearest, within [0, numel])."""
    return min(numel, max(0, int(round(density * numel))))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Rows = outputs, columns = (k_h, k_w, c_in) with the input channel fastest."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) if t.dim() == 4 else t.reshape(t.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        return matrix.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return matrix.reshape(shape)


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


def gather_scatter(scores: torch.Tensor, density: float, banks: int = 16, elems: int = 1) -> torch.Tensor:
    """Gather-scatter projection (Sun et al. 2021). Threshold τ at the layer's density; per group of B/E
    consecutive rows, as many packs as the group has entries above τ (÷ B, rounded); each pack is built
    greedily: among rows still short of E entries, the largest remaining entry in a bank (column mod B)
    the pack has not used. A pack that cannot be completed (rows out of entries in the free banks, which
    only happens when C_in·k² is not a multiple of B) is dropped and ends the group. Rows past the last
    full group (C_out not a multiple of B/E) follow the irregular pattern at τ."""
    matrix = as_matrix(scores).float()
    rows, cols = matrix.shape
    group = banks // elems
    n_groups, per_bank = rows // group, -(-cols // banks)
    threshold = torch.quantile(matrix.flatten(), 1 - density) if 0 < density < 1 else None
    keep_matrix = torch.zeros(rows, cols, dtype=torch.bool)
    if density >= 1:
        keep_matrix[:] = True
    elif threshold is not None and n_groups * group < rows:
        keep_matrix[n_groups * group:] = matrix[n_groups * group:] > threshold
    if n_groups == 0 or threshold is None:
        return from_matrix(keep_matrix, scores.shape)
    padded = F.pad(matrix[: n_groups * group], (0, per_bank * banks - cols), value=-math.inf)
    # values[g, row, bank, k]: k-th best entry of that row among the columns of that bank
    values, order = padded.reshape(n_groups, group, per_bank, banks).transpose(2, 3).sort(dim=3, descending=True)
    available = torch.isfinite(values).sum(3)                    # real entries per (group, row, bank)
    above = (padded > threshold).reshape(n_groups, -1).sum(1)
    packs = torch.round(above.float() / banks).long()
    pointer = torch.zeros(n_groups, group, banks, dtype=torch.long)
    keep = torch.zeros(n_groups, group, banks, per_bank, dtype=torch.bool)
    g_index = torch.arange(n_groups)
    for pack in range(int(packs.max())):
        active = packs > pack
        need = torch.full((n_groups, group), elems)
        bank_free = torch.ones(n_groups, banks, dtype=torch.bool)
        taken = []
        for _ in range(banks):
            head = values.gather(3, pointer.clamp(max=per_bank - 1)[..., None])[..., 0]
            eligible = (need > 0)[:, :, None] & bank_free[:, None, :] & active[:, None, None] & (pointer < available)
            best = torch.where(eligible, head, torch.full_like(head, -math.inf)).reshape(n_groups, -1)
            choice = best.argmax(1)
            ok = eligible.reshape(n_groups, -1).gather(1, choice[:, None])[:, 0]
            row, bank = choice // banks, choice % banks
            slot = order[g_index, row, bank, pointer[g_index, row, bank].clamp(max=per_bank - 1)]
            g, row, bank, slot = g_index[ok], row[ok], bank[ok], slot[ok]
            keep[g, row, bank, slot] = True
            pointer[g, row, bank] += 1
            need[g, row] -= 1
            bank_free[g, bank] = False
            taken.append((g, row, bank, slot))
        incomplete = active & (need > 0).any(1)
        if bool(incomplete.any()):  # roll the unfinished packs back; those groups take no more packs
            for g, row, bank, slot in taken:
                undo = incomplete[g]
                keep[g[undo], row[undo], bank[undo], slot[undo]] = False
            packs = torch.where(incomplete, torch.full_like(packs, pack), packs)
    grouped = keep.transpose(2, 3).reshape(n_groups * group, per_bank * banks)[:, :cols]
    keep_matrix[: n_groups * group] = grouped
    return from_matrix(keep_matrix, scores.shape)


def check_gather_scatter(mask: torch.Tensor, banks: int = 16, elems: int = 1) -> list[str]:
    """Violations of the GS constraint in ``mask`` (empty list = valid): in every full group of B/E rows,
    every row holds the same count, and counted by column mod B, every bank holds the same count."""
    matrix = as_matrix(mask).bool()
    rows, cols = matrix.shape
    group = banks // elems
    problems = []
    for start in range(0, rows - group + 1, group):
        part = matrix[start:start + group]
        per_row = part.sum(1)
        if not bool((per_row == per_row[0]).all()):
            problems.append(f"rows {start}-{start + part.shape[0] - 1}: unequal row counts {per_row.tolist()}")
        bank_of = torch.arange(cols) % banks
        per_bank = torch.zeros(banks, dtype=torch.long).index_add_(0, bank_of, part.sum(0).long())
        if not bool((per_bank == per_bank[0]).all()):
            problems.append(f"rows {start}-{start + part.shape[0] - 1}: unequal bank counts {per_bank.tolist()}")
    return problems


PATTERNS: dict[str, Projection] = {"irregular": irregular, "nm": nm, "block": block, "filter": filter_pattern,
                                   "channel": channel_pattern, "gather_scatter": gather_scatter}
ARGS: dict[str, tuple[tuple[str, type], ...]] = {
    "irregular": (), "filter": (), "channel": (), "nm": (("n", int), ("m", int)),
    "block": (("r", int), ("c", int), ("reduce", str)), "gather_scatter": (("banks", int), ("elems", int))}


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
                                       or kwargs.get("banks", 16) % kwargs.get("elems", 1)))
    if bad:
        raise ValueError(f"pattern {spec!r}: need 0 < N <= M (nm), R, C >= 1 and reduce sum|mean (block), "
                         "E dividing B (gather_scatter)")
    return name, kwargs


def fixed_density(spec: str) -> float | None:
    """The density a pattern imposes whatever the target (N:M: N/M), or None."""
    name, kwargs = parse_pattern(spec)
    return kwargs.get("n", 2) / kwargs.get("m", 4) if name == "nm" else None


def project(pattern: str, scores: torch.Tensor, density: float) -> torch.Tensor:
    name, kwargs = parse_pattern(pattern)
    return PATTERNS[name](scores, density, **kwargs)
