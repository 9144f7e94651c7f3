"""The gather-scatter (GS) pattern (Sun, Qin, Zhang et al. 2021): projection, validity checker, row groups.

Constraint, on the matrix view of a weight (rows = outputs, columns (k_h, k_w, C_in) with C_in fastest,
bank = column mod B): rows form groups; inside every group (1) every row holds the same number of
non-zeros and (2) every bank holds the same number. A full group has G = B/E rows and its non-zeros
decompose into packs of B entries, E from each row and one from each bank (conflict-free gathers,
balanced rows). Rows are grouped

* consecutively (``tile = 0``): groups ``[0, G)``, ``[G, 2G)``, …; when the row count is not a multiple of
  G, the last ``rows mod G = r`` rows form a partial group whose packs hold ``lcm(r, B)`` entries
  (``lcm / r`` from each row, ``lcm / B`` from each bank), so the constraint holds on every row;
* by tiles (``tile = T``, the paper's tiled variant, T a multiple of G): inside each tile of T consecutive
  rows the rows are sorted by their count of entries above the layer's threshold and grouped in that
  order, so rows that need similar counts share a group. After the per-group quotas are fixed, the rows
  of a tile are grouped by (quota descending, row index), which is also how :func:`row_groups` recovers
  the groups from a mask. Rows after the last full tile are grouped as in the untiled case.

Projection at density p: the target count round(p·rows·cols) is split into whole packs; the partial group
gets its share by rows, the full groups share the rest in proportion to how many of their entries are
above the layer's p-quantile threshold τ (largest remainder, capped by what each group can hold). Inside
a group the entries are chosen greedily by score under the row and bank quotas, and an augmenting path
(swap a chosen entry for another of the same row and bank class) completes a group the greedy left
short, so every group meets its quota exactly whenever the layer can hold it. Achieved density is the
target to within one pack of the partial group. Layers with fewer columns than banks cannot hold the
pattern (a bank without columns) and are refused by :func:`gs_shape_problem`.
"""

from __future__ import annotations

import math

import torch

from compress_run.core.weight_matrix import as_matrix, from_matrix, keep_count


def group_shape(rows_in_group: int, banks: int, elems: int) -> tuple[int, int]:
    """(entries per row, entries per bank) of one pack of a group with ``rows_in_group`` rows."""
    if rows_in_group * elems == banks:
        return elems, 1
    common = math.lcm(rows_in_group, banks)
    return common // rows_in_group, common // banks


def gs_shape_problem(shape: torch.Size | tuple[int, ...], banks: int = 16, elems: int = 1, tile: int = 0,
                     density: float | None = None) -> str | None:
    """Why a weight of this shape cannot hold the GS pattern (at ``density``, if given) — None if it can."""
    rows, cols = shape[0], math.prod(shape[1:])
    if cols < banks:
        return f"{cols} columns (C_in·k_h·k_w) < {banks} banks: a bank would hold no column"
    if tile and tile % (banks // elems):
        return f"tile {tile} is not a multiple of the group size B/E = {banks // elems}"
    if density is not None and 0 < density < 1:
        achieved = gs_planned_density(rows, cols, density, banks, elems)
        if abs(achieved - density) > 0.01:
            per_row = group_shape(rows % (banks // elems) or banks // elems, banks, elems)[0]
            return (f"its rows can only keep multiples of {per_row} of its {cols} columns, so density {density:g} "
                    f"becomes {achieved:.3f}")
    return None


def gs_planned_density(rows: int, cols: int, density: float, banks: int = 16, elems: int = 1) -> float:
    """The density :func:`gather_scatter` reaches on a rows × cols weight (whole packs; bank capacity aside)."""
    group = banks // elems
    target = keep_count(rows * cols, density)
    r = rows % group
    count = 0
    if r:
        per_row, _ = group_shape(r, banks, elems)
        size = r * per_row
        count = min(cols // per_row, round(target * r / rows / size)) * size
    if rows >= group:
        count += max(0, round((target - count) / banks)) * banks
    return count / (rows * cols)


def _tiled_rows(rows: int, group: int, tile: int) -> tuple[int, int]:
    """(rows covered by whole tiles, rows covered by whole groups)."""
    full = rows - rows % group
    return (full - full % tile if tile else 0), full


def _group_rows(need: torch.Tensor, group: int, tile: int) -> list[torch.Tensor]:
    """Row indices of every group: consecutive, or inside each tile of ``tile`` rows sorted by ``need``
    (descending, ties by row index); the rows past the last whole group form a partial group."""
    rows = need.numel()
    tiled, full = _tiled_rows(rows, group, tile)
    groups = []
    for start in range(0, tiled, tile or 1):
        if not tile:
            break
        idx = torch.arange(start, start + tile)
        order = idx[torch.argsort(-need[idx], stable=True)]
        groups += list(order.reshape(-1, group))
    groups += list(torch.arange(tiled, full).reshape(-1, group))
    if full < rows:
        groups.append(torch.arange(full, rows))
    return groups


def row_groups(mask: torch.Tensor, banks: int = 16, elems: int = 1, tile: int = 0) -> list[torch.Tensor]:
    """The row groups of a GS mask (matrix view): consecutive, or per tile by (count desc, row index)."""
    matrix = as_matrix(mask).bool() if mask.dim() > 2 else mask.bool()
    return _group_rows(matrix.sum(1), banks // elems, tile)


def check_gather_scatter(mask: torch.Tensor, banks: int = 16, elems: int = 1, tile: int = 0) -> list[str]:
    """Violations of the GS constraint in ``mask`` (empty list = valid): in every row group (partial and tiled
    groups included, see the module docstring) every row holds the same count and, counted by column mod B,
    every bank holds the same count."""
    matrix = as_matrix(mask).bool()
    cols = matrix.shape[1]
    bank_of = torch.arange(cols) % banks
    problems = []
    for rows in row_groups(matrix, banks, elems, tile):
        part = matrix[rows]
        per_row = part.sum(1)
        where = f"rows {rows.tolist()[:4]}{'…' if len(rows) > 4 else ''}"
        if not bool((per_row == per_row[0]).all()):
            problems.append(f"{where}: unequal row counts {per_row.tolist()}")
        per_bank = torch.zeros(banks, dtype=torch.long).index_add_(0, bank_of, part.sum(0).long())
        if not bool((per_bank == per_bank[0]).all()):
            problems.append(f"{where}: unequal bank counts {per_bank.tolist()}")
    return problems


def _largest_remainder(weights: torch.Tensor, total: int, caps: torch.Tensor,
                       floors: torch.Tensor | None = None) -> torch.Tensor:
    """Integers between ``floors`` and ``caps``, summing to ``total`` (clipped to what fits), the part above the
    floors in proportion to ``weights``."""
    alloc = torch.zeros_like(caps) if floors is None else torch.minimum(floors, caps).clone()
    total = max(min(total, int(caps.sum())), int(alloc.sum()))
    free = caps > 0
    while total > int(alloc.sum()) and bool(free.any()):
        left = total - int(alloc.sum())
        w = torch.where(free, weights.double().clamp(min=0), torch.zeros_like(weights, dtype=torch.float64))
        w = w if float(w.sum()) > 0 else free.double()
        share = w / w.sum() * left
        add = torch.minimum(share.floor().long(), caps - alloc)
        if int(add.sum()) == 0:  # hand out the remainders one by one, largest first
            order = torch.argsort(share - share.floor(), descending=True, stable=True)
            for i in order.tolist():
                if left == 0:
                    break
                if free[i] and alloc[i] < caps[i]:
                    alloc[i] += 1
                    left -= 1
        else:
            alloc += add
        free = alloc < caps
    return alloc


def gather_scatter(scores: torch.Tensor, density: float, banks: int = 16, elems: int = 1,
                   tile: int = 0) -> torch.Tensor:
    """GS keep-mask of ``scores`` at ``density`` (see the module docstring for the algorithm)."""
    matrix = as_matrix(scores).float()
    rows, cols = matrix.shape
    group = banks // elems
    keep_matrix = torch.zeros(rows, cols, dtype=torch.bool)
    target = keep_count(rows * cols, density)
    if target >= rows * cols:
        return from_matrix(torch.ones_like(keep_matrix), scores.shape)
    problem = gs_shape_problem(scores.shape, banks, elems, tile)
    if problem:
        raise ValueError(f"gather_scatter:{banks}:{elems}: a {rows}x{cols} weight cannot hold the pattern ({problem})")
    if target == 0:
        return from_matrix(keep_matrix, scores.shape)
    threshold = torch.kthvalue(matrix.flatten(), rows * cols - target).values
    above = (matrix > threshold).sum(1)
    groups = _group_rows(above, group, tile)  # before the quotas: tiles sorted by above-threshold counts
    bank_cols = torch.bincount(torch.arange(cols) % banks, minlength=banks)       # columns per bank
    shapes = [group_shape(len(g), banks, elems) for g in groups]
    caps = torch.tensor([min(cols // per_row, len(g) * int(bank_cols.min()) // per_bank)
                         for g, (per_row, per_bank) in zip(groups, shapes, strict=True)])
    sizes = torch.tensor([len(g) * per_row for g, (per_row, _) in zip(groups, shapes, strict=True)])
    packs = torch.zeros(len(groups), dtype=torch.long)
    partial = len(groups[-1]) != group
    if partial:  # the partial group's share follows its rows, independent of the scores
        packs[-1] = min(int(caps[-1]), round(target * len(groups[-1]) / rows / int(sizes[-1])))
    full = slice(0, len(groups) - 1 if partial else len(groups))
    # quota of a full group: its above-threshold entries in packs (at least the whole packs they fill, so a
    # projection of lifted scores keeps the lifted entries: nesting), the total fixed by largest remainder
    quota = torch.tensor([float(above[g].sum()) / banks for g in groups[full]])
    packs[full] = _largest_remainder(quota - quota.floor(), round((target - int(packs[-1] * sizes[-1]) * partial)
                                                                  / banks), caps[full], quota.floor().long())
    if tile:
        groups, packs = _regroup_tiles(groups, packs, rows, group, tile)
    by_size: dict[int, list[int]] = {}
    for i, rows_idx in enumerate(groups):
        by_size.setdefault(len(rows_idx), []).append(i)
    for size, members in by_size.items():  # groups of one size are filled together
        per_row, per_bank = group_shape(size, banks, elems)
        index = torch.stack([groups[i] for i in members])
        n = packs[members]
        keep_matrix[index.flatten()] = _fill_groups(matrix[index], banks, n * per_row, n * per_bank).flatten(0, 1)
    return from_matrix(keep_matrix, scores.shape)


def _regroup_tiles(groups: list[torch.Tensor], packs: torch.Tensor, rows: int, group: int,
                   tile: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inside each tile: pack counts in descending order along the sorted groups, then rows regrouped by
    (quota desc, row index), the grouping :func:`row_groups` recovers from the mask."""
    tiled, _ = _tiled_rows(rows, group, tile)
    per_tile = tile // group
    out_groups, out_packs = [], []
    for t in range(tiled // tile):
        chunk = slice(t * per_tile, (t + 1) * per_tile)
        sorted_packs = torch.sort(packs[chunk], descending=True, stable=True).values
        quota = torch.empty(rows, dtype=torch.long)
        for g, n in zip(groups[chunk], sorted_packs.tolist(), strict=True):
            quota[g] = n
        idx = torch.arange(t * tile, (t + 1) * tile)
        order = idx[torch.argsort(-quota[idx], stable=True)]
        out_groups += list(order.reshape(-1, group))
        out_packs += [int(quota[g[0]]) for g in order.reshape(-1, group)]
    out_groups += groups[tiled // group:]
    out_packs += packs[tiled // group:].tolist()
    return out_groups, torch.tensor(out_packs, dtype=torch.long)


def _fill_groups(scores: torch.Tensor, banks: int, row_quota: torch.Tensor, bank_quota: torch.Tensor) -> torch.Tensor:
    """Keep-masks of row groups [n, rows, cols]: every row of group i ``row_quota[i]`` entries, every bank
    ``bank_quota[i]``, chosen greedily by score (all groups at once, one entry per group per step), then
    completed by augmenting paths where the greedy choice left a row and a bank short."""
    n, n_rows, cols = scores.shape
    per_bank = -(-cols // banks)
    padded = torch.full((n, n_rows, per_bank * banks), -math.inf)
    padded[..., :cols] = scores
    cells = padded.reshape(n, n_rows, per_bank, banks).transpose(2, 3)     # [group, row, bank, k]
    values, order = cells.sort(dim=3, descending=True)
    values = torch.cat([values, torch.full((n, n_rows, banks, 1), -math.inf)], 3)  # a sentinel past the end
    available = torch.isfinite(values).sum(3)                             # real entries per (row, bank)
    taken = torch.zeros(n, n_rows, banks, dtype=torch.long)                # entries chosen per (row, bank)
    row_need = row_quota[:, None].expand(n, n_rows).clone()
    bank_need = bank_quota[:, None].expand(n, banks).clone()
    group_ids = torch.arange(n)
    heads = values[..., 0].clone()  # best unchosen entry per cell; -inf where the cell, row or bank is done
    heads[row_need[:, :, None].expand_as(heads) == 0] = -math.inf
    heads[bank_need[:, None, :].expand_as(heads) == 0] = -math.inf
    while True:
        best_value, best = heads.flatten(1).max(1)
        live = torch.isfinite(best_value)
        if not bool(live.any()):
            break
        g, r, b = group_ids[live], (best // banks)[live], (best % banks)[live]
        taken[g, r, b] += 1
        row_need[g, r] -= 1
        bank_need[g, b] -= 1
        heads[g, r, b] = values[g, r, b, taken[g, r, b]]
        done_row, done_bank = row_need[g, r] == 0, bank_need[g, b] == 0
        heads[g[done_row], r[done_row], :] = -math.inf
        heads[g[done_bank], :, b[done_bank]] = -math.inf
    for i in torch.nonzero(row_need.sum(1) > 0).flatten().tolist():
        while int(row_need[i].sum()):
            if not _augment(taken[i], available[i], row_need[i], bank_need[i]):
                raise RuntimeError(f"gather_scatter: a {n_rows}x{cols} row group cannot hold {int(row_quota[i])} "
                                   f"entries per row and {int(bank_quota[i])} per bank")
    keep = torch.arange(per_bank)[None, None, None, :] < taken[..., None]   # the best `taken` of each cell
    chosen = torch.zeros_like(keep)
    chosen.scatter_(3, order, keep)
    return chosen.transpose(2, 3).reshape(n, n_rows, per_bank * banks)[..., :cols]


def _augment(taken: torch.Tensor, available: torch.Tensor, row_need: torch.Tensor, bank_need: torch.Tensor) -> bool:
    """One augmenting path from a row short of entries to a bank short of entries (BFS over rows and banks:
    row -> bank where the row has an unchosen entry, bank -> row where the row has a chosen one)."""
    n_rows, banks = taken.shape
    parent: dict[tuple[str, int], tuple[str, int] | None] = {("r", int(r)): None for r in torch.nonzero(row_need > 0)}
    frontier = list(parent)
    while frontier:
        nxt = []
        for kind, i in frontier:
            if kind == "r":
                targets = [("b", b) for b in range(banks) if taken[i, b] < available[i, b]]
            else:
                targets = [("r", r) for r in range(n_rows) if taken[r, i] > 0]
            for node in targets:
                if node in parent:
                    continue
                parent[node] = (kind, i)
                if node[0] == "b" and bank_need[node[1]] > 0:
                    _apply_path(parent, node, taken, row_need, bank_need)
                    return True
                nxt.append(node)
        frontier = nxt
    return False


def _apply_path(parent, end, taken, row_need, bank_need) -> None:
    node = end
    bank_need[end[1]] -= 1
    while parent[node] is not None:
        prev = parent[node]
        if node[0] == "b":     # row prev -> bank node: choose one more entry in that cell
            taken[prev[1], node[1]] += 1
        else:                  # bank prev -> row node: give up one chosen entry in that cell
            taken[node[1], prev[1]] -= 1
        node = prev
    row_need[node[1]] -= 1


TILE_CANDIDATES = (0, 16, 32, 64, 128, 256, 512)


def gs_tile_of(mask: torch.Tensor, banks: int = 16, elems: int = 1,
               tiles: tuple[int, ...] = TILE_CANDIDATES) -> int | None:
    """The tiling (0 = consecutive groups) under which ``mask`` is a valid GS mask, or None."""
    group = banks // elems
    for tile in tiles:
        if (tile == 0 or tile % group == 0) and not check_gather_scatter(mask, banks, elems, tile):
            return tile
    return None
