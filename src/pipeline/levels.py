"""The evaluate stage of a multi-level (nested) model: every level, every two-level switch part-way through
the network, the nesting check, and the configuration reported as the model.

A *configuration* gives each segment of the level layers (the method's ``segment_groups``) a level. Pure
levels give every segment the same one; a *switch* runs the first k segments at one level and the rest at
another (the paper's input-independent rerouting). ``evaluate.level`` picks a configuration by sparsities:
one number (a pure level) or one per segment; ``evaluate.latency_budget_ms`` instead picks, among the pure
levels and the switches, the best validation accuracy whose simulated batch-1 latency on the run's hardware
profile fits the budget. Default: the densest level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.core.errors import UserError
from compress_run.core.nesting import check_hierarchy, level_count, level_sparsity, level_view, mixed_view
from compress_run.hardware.report import hardware_metrics


def as_level_list(wanted: Any) -> list[float] | None:
    if wanted is None:
        return None
    return [float(w) for w in wanted] if isinstance(wanted, Sequence) and not isinstance(wanted, str) \
        else [float(wanted)]


def level_indices(wanted: Any, levels: Sequence[float], segments: int) -> list[int] | None:
    """``evaluate.level`` as a level index per segment (None = not given); UserError for a bad value."""
    values = as_level_list(wanted)
    if values is None:
        return None
    index = []
    for v in values:
        match = [k for k, s in enumerate(levels) if abs(v - s) < 1e-9]
        if not match:
            raise UserError(f"evaluate.level={wanted}: {v:g} is not one of method.levels={list(levels)}",
                            f"give one of {list(levels)}, or one per segment (e.g. {[levels[0]] * segments})")
        index.append(match[0])
    if len(index) == 1:
        return index * segments
    if len(index) != segments:
        raise UserError(f"evaluate.level={wanted} gives {len(index)} levels, but the model has {segments} segments",
                        f"give one level, or exactly {segments} (one per segment of method.segments)")
    return index


def switches(count: int, segments: int) -> list[list[int]]:
    """Every two-level switch: the first k segments at level a, the rest at level b (a != b, 0 < k < S)."""
    return [[a] * k + [b] * (segments - k) for k in range(1, segments) for a in range(count) for b in range(count)
            if a != b]


def describe(config: Sequence[int], levels: Sequence[float | None]) -> str:
    return "/".join(f"{levels[k]:g}" if levels[k] is not None else str(k) for k in config)


def evaluate_levels(net: nn.Module, method: Any, evaluate: Any, input_shape: tuple[int, ...], primary: Any,
                    accuracy: Callable[[nn.Module], dict[str, float]],
                    log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """Reports every level and switch of ``net``; returns the chosen configuration's network and the metrics."""
    count = level_count(net)
    targets = list(getattr(method, "levels", None) or [None] * count)
    groups = method.segment_groups(net) if hasattr(method, "segment_groups") else []
    key = f"latency_sim_ms/{primary.name}"

    def measure(view: nn.Module) -> dict[str, Any]:
        hw, _ = hardware_metrics(view, input_shape, [primary], primary, batch=evaluate.batch_size, measure=False)
        return {**accuracy(view), "model/macs_effective": hw["model/macs_effective"],
                "model/macs_dense": hw["model/macs_dense"], key: hw[key]}

    views = [level_view(net, k).cpu().eval() for k in range(count)]
    rows = []
    for k, view in enumerate(views):
        log(f"stage evaluate: level {k} (target sparsity {targets[k]})")
        rows.append({"level": k, "target_sparsity": targets[k], "sparsity": round(level_sparsity(net, k), 6),
                     **measure(view)})
    mixes = []
    for config in switches(count, len(groups)) if len(groups) > 1 else []:
        log(f"stage evaluate: switched levels {describe(config, targets)} (per segment)")
        view = mixed_view(net, groups, config).cpu().eval()
        mixes.append({"levels": config, "target_sparsity": [targets[k] for k in config],
                      "sparsity": round(_sparsity(view), 6), **measure(view)})
    problems = {f"{i}<{j}": check_hierarchy(views[i], views[j]) for i in range(count) for j in range(i + 1, count)}
    chosen, reason = choose(rows, mixes, evaluate, targets, len(groups) or 1, key)
    if len(set(chosen)) == 1:
        network, metrics = views[chosen[0]], rows[chosen[0]]
    else:
        network = mixed_view(net, groups, chosen).cpu().eval()
        metrics = next(m for m in mixes if m["levels"] == chosen)
    print_levels(rows, mixes, primary.name, problems, targets, chosen, reason)
    return network, {"levels": rows, "level_mixes": mixes, "levels/chosen": chosen[0] if len(set(chosen)) == 1
                     else chosen, "levels/chosen_reason": reason, "levels/segments": [len(g) for g in groups],
                     "levels/hierarchy_ok": not any(problems.values()),
                     "levels/hierarchy_problems": {k: v for k, v in problems.items() if v}, "levels/metrics": metrics}


def choose(rows: list[dict[str, Any]], mixes: list[dict[str, Any]], evaluate: Any, targets: list[float | None],
           segments: int, key: str) -> tuple[list[int], str]:
    """The configuration reported as the model (per segment level indices) and why."""
    wanted = level_indices(evaluate.get("level"), targets, segments) if targets[0] is not None else None
    if wanted is not None:
        return wanted, "evaluate.level"
    budget = evaluate.get("latency_budget_ms")
    if budget is not None:
        candidates = [([r["level"]] * segments, r) for r in rows] + [(m["levels"], m) for m in mixes]
        fitting = [(c, m) for c, m in candidates if m[key] <= budget]
        if not fitting:
            fastest = min(m[key] for _, m in candidates)
            raise UserError(f"evaluate.latency_budget_ms={budget}: no level or switch of this model fits (the fastest "
                            f"simulates {fastest:.3f} ms)", f"raise the budget to at least {fastest:.3f} ms")
        config, _ = max(fitting, key=lambda cm: (cm[1].get("val/acc", 0.0), -cm[1][key]))
        return config, f"best validation accuracy within {budget} ms"
    return [len(rows) - 1] * segments, "the densest level (default)"


def _sparsity(view: nn.Module) -> float:
    from compress_run.core.masks import masked_parameters

    kept = total = 0
    for _, param, mask in masked_parameters(view):
        kept, total = kept + int(mask.sum()), total + param.numel()
    return 1.0 - kept / max(1, total)


def print_levels(rows: list[dict[str, Any]], mixes: list[dict[str, Any]], hardware: str,
                 problems: dict[str, list[str]], targets: list[float | None], chosen: list[int], reason: str) -> None:
    table = Table(title="Multi-level model: every level and every switch (levels per segment)", title_justify="left")
    for col in ("levels", "sparsity", "val acc", "test acc", "MACs effective", f"sim ms ({hardware})"):
        table.add_column(col, justify="right")
    for r, config in [*[(r, [r["level"]]) for r in rows], *[(m, m["levels"]) for m in mixes]]:
        table.add_row(describe(config, targets), f"{r['sparsity']:.4f}", f"{r.get('val/acc', float('nan')):.4f}",
                      f"{r.get('test/acc', float('nan')):.4f}", f"{r['model/macs_effective'] / 1e6:,.2f} M",
                      f"{r[f'latency_sim_ms/{hardware}']:.3f}")
    Console().print(table)
    bad = {k: v for k, v in problems.items() if v}
    print(f"[compress-run] check_hierarchy over {len(problems)} level pairs: "
          + ("nested" if not bad else f"VIOLATED {bad}"), flush=True)
    print(f"[compress-run] reported as the model: levels {describe(chosen, targets)} ({reason})", flush=True)


@torch.no_grad()
def check_choice(wanted: Any, budget: Any, method: Any, net: nn.Module, method_name: str | None) -> None:
    """Reject ``evaluate.level`` / ``evaluate.latency_budget_ms`` that cannot apply, before any work."""
    if wanted is None and budget is None:
        return
    what = "evaluate.level" if wanted is not None else "evaluate.latency_budget_ms"
    levels = getattr(method, "levels", None)
    if not levels:
        raise UserError(f"{what} picks a configuration of a multi-level model, but method={method_name} trains a "
                        "single sparsity", f"use method=multilevel or remove {what}")
    if wanted is not None and budget is not None:
        raise UserError("evaluate.level and evaluate.latency_budget_ms both pick the reported configuration",
                        "set one of them")
    if wanted is not None:
        level_indices(wanted, levels, len(method.segment_groups(net)))
