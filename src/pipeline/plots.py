"""Figures: accuracy-vs-cost Pareto fronts per method, and a per-layer MACs/latency chart of one run.

``plot_pareto`` takes rows as written by a table (``table.csv``) or a sweep (``summary.csv``) and writes
``<stem>.png`` (two panels: top-1 vs effective MACs, top-1 vs simulated batch-1 latency) and
``<stem>.csv`` (the points drawn, with a ``pareto`` flag per method). ``plot_layers`` draws one run's
``results.json``: dense and effective MACs per layer next to its simulated latency per layer.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from compress_run.pipeline.checkpoints import atomic_write_text
from compress_run.pipeline.sweeps import simulated_latency


def _float(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalise table rows or sweep-summary rows to {label, method, top1 (%), macs_M, latency_ms}."""
    out = []
    for r in rows:
        if r.get("status") not in ("ok", "done"):
            continue
        if "top1_ours" in r:  # a table row
            top1, macs = _float(r.get("top1_ours")), _float(r.get("macs_effective_M"))
            label = r.get("row")
        else:  # a sweep-summary row
            acc, macs_raw = _float(r.get("test/acc")), _float(r.get("model/macs_effective"))
            top1 = None if acc is None else 100.0 * acc
            macs = None if macs_raw is None else macs_raw / 1e6
            label = r.get("varied") or r.get("overrides") or str(r.get("job"))
        if top1 is None or macs is None:
            continue
        out.append({"label": label, "method": r.get("method") or "?", "top1": top1, "macs_M": macs,
                    "latency_ms": _float(r.get("latency_sim_ms")), "hardware": r.get("hardware") or ""})
    return out


def pareto_front(pts: list[dict[str, Any]], cost: str) -> list[dict[str, Any]]:
    """The points no other point beats on both cost (lower) and top-1 (higher), by increasing cost."""
    ranked = sorted((p for p in pts if p[cost] is not None), key=lambda p: (p[cost], -p["top1"]))
    front, best = [], float("-inf")
    for p in ranked:
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def plot_pareto(rows: list[dict[str, Any]], stem: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(rows)
    if not pts:
        raise ValueError("no finished run with top-1 and MACs to plot")
    methods = sorted({p["method"] for p in pts})
    hardware = next((p["hardware"] for p in pts if p["hardware"]), "")
    panels = [("macs_M", "effective MACs per image (M, batch 1)")]
    if any(p["latency_ms"] is not None for p in pts):
        panels.append(("latency_ms", f"simulated latency, batch 1 (ms, {hardware or 'hardware profile'})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    flags: dict[tuple[int, str], bool] = {}
    for ax, (cost, xlabel) in zip(axes[0], panels, strict=True):
        for i, method in enumerate(methods):
            mine = [p for p in pts if p["method"] == method and p[cost] is not None]
            color = f"C{i % 10}"
            ax.scatter([p[cost] for p in mine], [p["top1"] for p in mine], color=color, alpha=0.5, s=22)
            front = pareto_front(mine, cost)
            ax.plot([p[cost] for p in front], [p["top1"] for p in front], "-o", color=color, label=method,
                    markersize=5)
            for p in front:
                flags[(id(p), cost)] = True
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(title="method (line: Pareto front)", fontsize=8, title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    png = stem.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "label", "top1", "macs_M", "latency_ms", "hardware",
                                                "pareto_macs", "pareto_latency"])
    writer.writeheader()
    for p in pts:
        writer.writerow({**p, "pareto_macs": flags.get((id(p), "macs_M"), False),
                         "pareto_latency": flags.get((id(p), "latency_ms"), False)})
    atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    return png


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a table.csv / summary.csv, or of the one found in a table or sweep dir."""
    if path.is_dir():
        path = next((path / n for n in ("table.csv", "summary.csv", "rows/summary.csv") if (path / n).is_file()),
                    path / "summary.csv")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot_layers(results_path: Path, png: Path, hardware: str | None = None) -> Path:
    """Per-layer bars of one run: dense vs effective MACs, and simulated ms on one hardware profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_path).read_text())
    macs = results.get("macs_per_layer") or {}
    latency = results.get("latency_per_layer") or {}
    if not macs or not latency:
        raise ValueError(f"{results_path} has no per-layer MACs or latency (was the evaluate stage run?)")
    hardware = hardware or simulated_latency(results.get("metrics", {}))[0] or next(iter(latency))
    if hardware not in latency:
        raise ValueError(f"no per-layer latency for hardware '{hardware}' (have: {', '.join(latency)})")
    ms = {r["module"]: r["ms"] for r in latency[hardware]}
    names = list(macs)
    height = max(3.0, 0.18 * len(names) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    y = range(len(names))
    left.barh(y, [macs[n]["dense"] / 1e6 for n in names], color="lightgray", label="dense")
    left.barh(y, [macs[n]["effective"] / 1e6 for n in names], color="tab:blue", label="effective (compressed)")
    left.set_xlabel("MACs per image (M, batch 1)")
    left.legend(fontsize=8)
    right.barh(y, [ms.get(n, 0.0) for n in names], color="tab:orange")
    right.set_xlabel(f"simulated latency (ms, batch 1, {hardware})")
    left.set_yticks(list(y), names, fontsize=6)
    left.invert_yaxis()
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    total = sum(ms.values())
    name = Path(results_path).parent.name
    fig.suptitle(f"{name}: per-layer MACs and latency (whole network, all ops: {total:.3f} ms simulated)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
