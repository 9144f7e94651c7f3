"""RESULTS.md sections for the committed benchmark results (``bench_results/*.json``), used by make_results.py.

Every benchmark JSON carries ``benchmark``, ``date``, ``machine`` and ``command``; each renderer turns its rows
into the table a reader needs (speedups against the dense network measured in the same run, the headline
goal metric and whether it is met).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _machine(meta: dict[str, Any]) -> str:
    m = meta.get("machine", {})
    return (f"{m.get('cpu', '?')}, {m.get('logical_cpus', '?')} logical CPUs, {m.get('torch_threads', '?')} torch "
            f"thread(s), torch {m.get('torch', '?')}")


def _head(meta: dict[str, Any], title: str, path: Path) -> list[str]:
    return [f"### {title}", "", f"* Command: `{meta.get('command', '?')}`", f"* Machine: {_machine(meta)}",
            f"* Date: {str(meta.get('date', '?'))[:10]}", f"* File: `{path.as_posix()}`", ""]


def _goal(value: float, goal: float, name: str, higher: bool = True) -> str:
    met = value >= goal if higher else value <= goal
    return f"`{name}` = **{value:.2f}** (goal {'≥' if higher else '≤'} {goal:g}: {'met' if met else '**not met**'})"


def speed(meta: dict[str, Any], path: Path, title: str) -> list[str]:
    """compaction / lowrank: each variant's MAC speedup against measured host speedups at batch 1 and 32."""
    lines = _head(meta, title, path)
    deployed = "min_deployed_efficiency" in meta
    head = "| variant | MAC speedup | eager speedup b1 / b32 | eager efficiency b1 / b32 |"
    lines += [head + (" ONNX Runtime speedup b1 / b32 | ONNX Runtime efficiency b1 / b32 |" if deployed else ""),
              "|---|---|---|---|" + ("---|---|" if deployed else "")]
    for v in meta["variants"]:
        if v["mac_speedup"] == 1.0:
            continue
        cells = [f"{v['mac_speedup']:.2f}"]
        for prefix in ("", "deployed_") if deployed else ("",):
            cells += [f"{v[prefix + 'speedup_b1']:.2f} / {v[prefix + 'speedup_b32']:.2f}",
                      f"{v[prefix + 'efficiency_b1']:.2f} / {v[prefix + 'efficiency_b32']:.2f}"]
        lines.append(f"| {v['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "Efficiency = measured speedup / MAC speedup (1.0: the network runs as fast as its MACs say), each "
              "form against the dense network in the same form. "
              + _goal(meta["min_efficiency"], meta["goal_min_efficiency"], "min_efficiency")
              + ("; " + _goal(meta["min_deployed_efficiency"], meta["goal_min_efficiency"], "min_deployed_efficiency")
                 if deployed else ""), ""]
    return lines


def overhead(meta: dict[str, Any], path: Path) -> list[str]:
    """bench_overhead: the pipeline's training step against a plain loop."""
    settings = meta["settings"]
    lines = _head(meta, f"Training-step overhead of the pipeline ({settings['model']}, {settings['dataset']}, batch "
                  f"{settings['batch']}, {settings['threads']} threads)", path)
    lines += ["| variant | pipeline ms/step | plain loop ms/step | ratio (median of rounds) | ratio per round | goal |",
              "|---|---|---|---|---|---|"]
    for name, row in meta["variants"].items():
        rounds = ", ".join(f"{r:.2f}" for r in row["ratio_per_round"])
        lines.append(f"| {name} | {statistics.median(row['pipeline_step_ms']):.1f} | "
                     f"{statistics.median(row['plain_step_ms']):.1f} | {row['ratio']:.3f} | {rounds} | "
                     f"≤ {meta['goal'][name]} |")
    lines += ["", _goal(meta["ratio_dense"], meta["goal"]["dense"], "ratio_dense", higher=False) + "; "
              + _goal(meta["ratio_masked"], meta["goal"]["masked"], "ratio_masked", higher=False), ""]
    return lines


def sparse_kernels(meta: dict[str, Any], path: Path) -> list[str]:
    lines = _head(meta, "Sparse kernels against dense (ResNet-50 and DeiT-S layer shapes)", path)
    kernels = ["csr", "bsr_4", "bsr_16", "bsr_32", "gs"]
    lines += ["Median speedup over dense across the layer shapes (dense time / kernel time):", "",
              "| sparsity | batch | " + " | ".join(kernels) + " |", "|---|---|" + "---|" * len(kernels)]
    keys = sorted({(r["sparsity"], r["batch"]) for r in meta["rows"]})
    for sparsity, batch in keys:
        rows = [r for r in meta["rows"] if r["sparsity"] == sparsity and r["batch"] == batch]
        cells = [f"{statistics.median(r['speedup'][k] for r in rows if k in r['speedup']):.2f}×" for k in kernels]
        lines.append(f"| {sparsity:.0%} | {batch} | " + " | ".join(cells) + " |")
    goal = meta.get("goal", {})
    lines += ["", _goal(meta["gs_speedup_90"], goal.get("gs_speedup_90", 2.5) if isinstance(goal, dict) else 2.5,
                        "gs_speedup_90") + "; " + _goal(meta["gs_vs_csr_90"], 0.8, "gs_vs_csr_90"), ""]
    return lines


def latency_sim(meta: dict[str, Any], path: Path) -> list[str]:
    lines = _head(meta, "Latency simulator against measured host latency", path)
    lines += [f"Goal: {meta.get('goal', '')}. Held-out rule: {meta.get('held_out_rule', '')}.",
              f"Profile `host_cpu` calibrated {meta.get('profile_calibrated', '?')}.", ""]
    splits = meta.get("splits") or {"in_sample": {**meta, "variants": len(meta["variants"])}}  # before the split
    for split, figures in splits.items():
        naive = figures["baseline_naive_roofline"]
        lines.append(f"* **{split}** ({figures['variants']} variants), batch 1: **{figures['share_within_25pct']:.0%} "
                     f"within ±25%, {figures['share_within_15pct']:.0%} within ±15%, Kendall τ "
                     f"{figures['kendall_tau']:.2f}**, median error {figures['median_abs_error']:.1%}; naive "
                     f"single-peak roofline in the same run: {naive['share_within_25pct']:.0%} within ±25%, "
                     f"τ {naive['kendall_tau']:.2f}.")
    lines += ["", "| split | variant | mask | measured ms (b1) | simulated ms (b1) | ratio |",
              "|---|---|---|---|---|---|"]
    for v in meta["variants"]:
        mask = f"{v['mask_sparsity']:.0%} {v.get('mask_pattern') or 'irregular'}" if v.get("mask_sparsity") else "dense"
        lines.append(f"| {v.get('split', 'in_sample')} | {v['variant']} | {mask} | {v['b1']['measured_ms']:.2f} | "
                     f"{v['b1']['sim_ms']:.2f} | {v['b1']['ratio']:.2f} |")
    return [*lines, ""]


def haloc_profiles(meta: dict[str, Any], path: Path) -> list[str]:
    lines = _head(meta, "HALOC rank choice per hardware profile (one trained ResNet-20, one search per profile)", path)
    lines += ["| profile | LUT spread | mean rank | layers left dense | chosen latency / dense (simulated) | "
              "MACs / dense |", "|---|---|---|---|---|---|"]
    profiles = meta["profiles"]
    items = list(profiles.items() if isinstance(profiles, dict) else profiles)
    for name, p in sorted((i for i in items if "refused" not in i[1]), key=lambda item: item[1]["mean_rank"]):
        lines.append(f"| {name} | {p['lut_spread']:.2f} | {p['mean_rank']:.1f} | {p.get('left_dense', 0)} | "
                     f"{p['chosen_cost_fraction']:.2f} | {p['mac_fraction']:.2f} |")
    refused = [(name, p) for name, p in items if "refused" in p]
    if refused:
        lines += ["", "Refused (HALOC never trades a conv for a slower Tucker-2 form):", ""]
        lines += [f"* {name}: {p['refused']}" for name, p in refused]
    return [*lines, ""]


def fault_matrix(meta: dict[str, Any], path: Path) -> list[str]:
    """fault_matrix.py: SIGKILL at a moment aimed at each stage in turn, rerun, bit-exact comparison."""
    lines = _head(meta, "Fault matrix: a run killed at a random moment, then the same command again", path)
    lines += fault_matrix_table(meta)
    return lines


def killed(row: dict[str, Any]) -> bool:
    """Whether a kill of a fault-matrix trial landed (a run that ended before every kill tested nothing)."""
    return any(k["stage"] != "finished" for k in row["kills"])


def fault_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Trials, killed, survived (killed and bit-identical after the rerun), lost, and those that ended first."""
    tested = [r for r in rows if killed(r)]
    return {"trials": len(rows), "killed": len(tested), "survived": sum(r["survived"] for r in tested),
            "lost": sum(not r["survived"] for r in rows), "untested": len(rows) - len(tested)}


def fault_matrix_table(meta: dict[str, Any]) -> list[str]:
    """The fault matrix's table and its one-line verdict (RESULTS.md and the README). A trial whose run ended
    before its kill tested nothing: it is counted apart, not as survived."""
    lines = ["| family | trials | stages the kills landed in | run ended before its kill | killed and survived "
             "(bit-identical) | lost |", "|---|---|---|---|---|---|"]
    order = ("start-up", "train", "compress", "finetune", "quantize", "evaluate", "results")
    for family in meta["settings"]["families"]:
        rows = [r for r in meta["rows"] if r["family"] == family]
        counts = fault_counts(rows)
        hit = [stage for stage in order if stage in {k["stage"] for r in rows for k in r["kills"]}]
        lines.append(f"| {family} | {counts['trials']} | {', '.join(hit)} | {counts['untested']} | "
                     f"{counts['survived']} | {counts['lost']} |")
    return lines + ["", fault_verdict(fault_counts(meta["rows"])) + ": the rerun exits 0 and its test/val metrics "
                    "and every tensor of its final checkpoint equal an uninterrupted run's.", ""]


def fault_verdict(counts: dict[str, int], bold: bool = True) -> str:
    lost = f"**{counts['lost']} lost**" if bold else f"{counts['lost']} lost"
    return (f"{counts['trials']} trials, {counts['killed']} killed, {counts['survived']} survived, {lost}"
            + (f" ({counts['untested']} ended before the kill)" if counts["untested"] else ""))


def tokens(meta: dict[str, Any], path: Path) -> list[str]:
    """bench_tokens: measured and simulated speedup of token-pruned ViTs over their dense networks."""
    batches = meta["batches"]
    lines = _head(meta, "Token-pruned ViTs against dense: measured and simulated host speedup", path)
    lines += ["| model | variant | attention form | MAC speedup | "
              + " | ".join(f"measured / simulated b{b}" for b in batches) + " |",
              "|---|---|---|---|" + "---|" * len(batches)]
    for v in meta["variants"]:
        if v["variant"] == "dense":
            continue
        cells = [f"{v[f'b{b}']['measured_speedup']:.2f} / {v[f'b{b}']['sim_speedup']:.2f}" for b in batches]
        lines.append(f"| {v['model']} | {v['variant']} | {v['attention_form']} | {v['mac_speedup']:.2f} | "
                     + " | ".join(cells) + " |")
    disagree = meta["direction_disagrees"]
    lines += ["", f"Speedup = dense latency / variant latency in the same run (host_cpu profile for the simulated). "
              f"Goal: {meta['goal']}: **{meta['direction_agrees']} of {meta['direction_checked']}** cases agree"
              + (f"; not: {', '.join(disagree)}" if disagree else " (met)") + ".", ""]
    steps = meta.get("train_steps")
    if steps:
        lines += [f"Training step of the {steps['model']} ViT (batch {steps['batch']}, {steps['threads']} thread, "
                  "forward + backward + AdamW, fastest of the interleaved rounds):", "",
                  "| variant | step ms | speedup over dense |", "|---|---|---|"]
        lines += [f"| {name} | {entry['step_ms']:.1f} | {entry['speedup']:.2f} |"
                  for name, entry in steps["variants"].items()]
        lines.append("")
    return lines


RENDERERS = {
    "fault_matrix": fault_matrix,
    "compaction": lambda m, p: speed(m, p, "Compacted (channel-pruned) networks against dense"),
    "lowrank": lambda m, p: speed(m, p, "Factorized (low-rank) networks against dense"),
    "sparse_kernels": sparse_kernels,
    "latency_sim": latency_sim,
    "haloc_profiles": haloc_profiles,
    "overhead": overhead,
    "tokens": tokens,
}


def benchmark_sections(root: Path) -> list[str]:
    import json

    lines: list[str] = []
    for path in sorted((root / "bench_results").glob("*.json")):
        meta = json.loads(path.read_text())
        render = RENDERERS.get(meta.get("benchmark", ""))
        if render:
            lines += render(meta, path.relative_to(root))
    return lines
