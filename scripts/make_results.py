"""Regenerate RESULTS.md from the committed small-scale tables (``make results``).

Every ``docs/tables/<name>/table.json`` (written by compress-table next to TABLE.md) becomes one section:
the table, the command that produced it, the machine and the dates of its rows. Figures under
``docs/figures/`` are listed with the command that drew them (``docs/figures/<name>.cmd``).

    python scripts/make_results.py                              # RESULTS.md from docs/ (make results)
    python scripts/make_results.py --publish logs/tables/fmnist_sparse   # copy a finished table into docs/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from compress_run.pipeline.tables import render_markdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_benchmarks import benchmark_sections  # noqa: E402  (a module beside this script)

ROOT = Path(__file__).resolve().parents[1]


def _anchor(title: str) -> str:
    """GitHub's heading anchor for ``title``."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def section(path: Path) -> list[str]:
    meta = json.loads(path.read_text())
    table = OmegaConf.create({k: meta.get(k, "" if k == "discussion" else []) for k in
                              ("title", "source", "metrics", "seeds", "discussion")})
    body = render_markdown(table, meta["name"], meta["rows"], meta["smoke"], meta.get("orderings"),
                           meta.get("timing")).splitlines()
    lines = [f"## {meta['title']}", "", f"* Command: `{meta['command']}`"]
    cpus = meta.get("cpus") or {}
    counted = "; ".join(f"{c}: {n} run(s)" for c, n in cpus.items())
    lines.append(f"* CPU (from the runs' records): {counted or 'unknown'}")
    lines.append(f"* Machine: {'; '.join(meta['hosts']) or 'unknown'}")
    dates = sorted({d[:10] for d in meta["finished"]})
    lines.append(f"* Date: {' to '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else 'not run'}")
    lines.append(f"* Files: `{path.parent.relative_to(ROOT)}/` (TABLE.md, table.csv, runs.csv, table.json)")
    lines.append(f"* Code: {code_line(meta)}")
    loaded = meta.get("loaded_runs") or []
    if loaded:
        lines.append(f"* Load: other processes used ≥ 5% of the CPUs during {len(loaded)} run(s) "
                     f"({', '.join(loaded[:6])}{' ...' if len(loaded) > 6 else ''}); no timing column of this table "
                     "is read from them")
    body = [ln for ln in body[1:] if not ln.startswith("`compress-table")]
    body = [ln for i, ln in enumerate(body) if ln or (i > 0 and body[i - 1])]  # no double blank lines
    while body and not body[0]:
        body.pop(0)
    return [*lines, "", *body]


def code_line(meta: dict) -> str:
    """The commits of the runs that have one; the runs without one named, never given another run's commit."""
    unknown = meta.get("code_unknown") or []
    total = sum((meta.get("cpus") or {}).values()) or len(meta.get("runs", []))
    parts = []
    if meta.get("commits"):
        parts.append(f"commit(s) {', '.join(c[:10] for c in meta['commits'])} for {total - len(unknown)} of "
                     f"{total} runs")
    if unknown:
        parts.append(f"unknown for {len(unknown)} run(s) ({meta.get('unknown_code_reason') or 'no reason given'})")
    return "; ".join(parts) or "unknown"


CLAIM_MARK = {"holds": "holds", "reversed": "**reversed**", "does not hold": "**does not hold**",
              "not resolved": "not resolved", "not judged": "not judged", "one seed": "one seed", "not run": "not run"}


def readme_line(meta: dict) -> str:
    """One README line for a published table: its claims and their verdicts, every one of them."""
    claims = []
    for o in meta.get("orderings", []):
        relation = f"within {o['within']:g} of" if o["within"] is not None else "≥"
        short = next((mark for key, mark in CLAIM_MARK.items() if o["verdict"].startswith(key)), o["verdict"])
        short += " (code unknown)" if "code unknown" in o["verdict"] else \
            " (hosts differ)" if "hosts differ" in o["verdict"] else ""
        paired = o.get("paired") or {}
        if paired and not paired["verdict"].startswith(("not judged", "not resolved (hosts")):
            short += f", paired over seeds: {paired['verdict'].split(' (')[0]}"
        claims.append(f"{o['better']} {relation} {o['worse']} ({o['metric']}): {short}")
    cpus = ", ".join(dict.fromkeys(c.split(" (")[0] for c in meta.get("cpus") or {})) or "unknown CPU"
    seeds = f"{len(meta['seeds'])} seeds" if meta.get("seeds") else "1 run per row"
    judged = "; ".join(claims) if claims else "no claim judged"
    return (f"* [{meta['title']}](RESULTS.md#{_anchor(meta['title'])}) ({seeds}; {cpus}) — {judged}.")


README_START, README_END = "<!-- tables:start (make results) -->", "<!-- tables:end -->"


def update_readme(metas: list[dict]) -> None:
    """Replace the README's generated block of table lines (between the two markers)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        sys.exit(f"make_results: README.md lacks the markers {README_START} ... {README_END}")
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    block = "\n".join(readme_line(m) for m in metas)
    readme.write_text(f"{head}{README_START}\n{block}\n{README_END}{tail}")


def publish(table_dir: Path) -> None:
    """Copy a table dir's TABLE.md, table.csv, table.json (and Pareto figure, if drawn) into docs/."""
    meta = json.loads((table_dir / "table.json").read_text())
    if meta["smoke"]:
        sys.exit(f"make_results: {table_dir} is a smoke-scale table; only real runs are published")
    target = ROOT / "docs" / "tables" / meta["name"]
    target.mkdir(parents=True, exist_ok=True)
    for name in ("TABLE.md", "table.csv", "runs.csv", "table.json"):
        if (table_dir / name).is_file():
            shutil.copy2(table_dir / name, target / name)
    if (table_dir / "pareto.png").is_file():
        figures = ROOT / "docs" / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        for suffix in (".png", ".csv"):
            shutil.copy2(table_dir / f"pareto{suffix}", figures / f"{meta['name']}_pareto{suffix}")
        (figures / f"{meta['name']}_pareto.cmd").write_text(f"{meta['command']} plot=true\n")
    print(f"published {table_dir} to {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publish", type=Path, nargs="*", default=[], help="finished table dirs to copy to docs/")
    for table_dir in parser.parse_args().publish:
        publish(table_dir)
    tables = sorted((ROOT / "docs" / "tables").glob("*/table.json"))
    if not tables:
        sys.exit("make_results: no docs/tables/*/table.json; run compress-table and copy its table dir there")
    lines = ["# Results", "",
             "Everything measured with this repository, regenerated by `make results` from the committed tables "
             "(`docs/tables/`) and benchmark results (`bench_results/`) — do not edit by hand. ImageNet/CIFAR paper "
             "tables are reproduced with `compress-table table=<name>` on real data and GPUs; see the README.", "",
             "## Contents", ""]
    metas = [json.loads(path.read_text()) for path in tables]
    lines += [f"* [{m['title']}](#{_anchor(m['title'])})" for m in metas]
    lines += ["* [Benchmarks](#benchmarks)", ""]
    for path in tables:
        lines += section(path) + [""]
    lines += ["## Benchmarks", ""] + benchmark_sections(ROOT)
    figures = sorted((ROOT / "docs" / "figures").glob("*.png"))
    if figures:
        lines += ["## Figures", ""]
        for png in figures:
            cmd = png.with_suffix(".cmd")
            lines += [f"![{png.stem}]({png.relative_to(ROOT)})", ""]
            if cmd.is_file():
                points = png.with_suffix(".csv")
                where = f" (points: `{points.relative_to(ROOT)}`)" if points.is_file() else ""
                lines += [f"Drawn by `{cmd.read_text().strip()}`{where}.", ""]
    (ROOT / "RESULTS.md").write_text("\n".join(lines).rstrip() + "\n")
    update_readme(metas)
    print(f"wrote {ROOT / 'RESULTS.md'} ({len(tables)} tables, {len(figures)} figures)")


if __name__ == "__main__":
    main()
