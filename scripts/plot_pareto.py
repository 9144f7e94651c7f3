"""Pareto figures from a finished sweep or table, and the per-layer chart of one run.

    python scripts/plot_pareto.py logs/tables/digits_pareto --out docs/pareto/digits_pareto
    python scripts/plot_pareto.py logs/compress/multiruns/2026-11-22_10-00-00      # a sweep dir (summary.csv)
    python scripts/plot_pareto.py --layers logs/tables/digits_pareto/rows/gmp_s90/results.json --out docs/layers

Writes <out>.png (top-1 vs effective MACs and vs simulated latency, one Pareto front per method) and
<out>.csv (the points drawn); with --layers, <out>.png of dense/effective MACs and simulated ms per layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress_run.pipeline.plots import plot_layers, plot_pareto, read_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="table dir, sweep dir, table.csv or summary.csv")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: <source dir>/pareto)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--layers", type=Path, help="results.json of one run: draw its per-layer chart instead")
    parser.add_argument("--hardware", help="hardware profile of the per-layer latency (default: the run's own)")
    args = parser.parse_args()
    try:
        if args.layers:
            out = args.out or args.layers.parent / "layers"
            print(plot_layers(args.layers, out.with_suffix(".png"), args.hardware))
            return
        if args.source is None:
            parser.error("give a table or sweep dir (or --layers results.json)")
        base = args.source if args.source.is_dir() else args.source.parent
        print(plot_pareto(read_rows(args.source), args.out or base / "pareto", args.title))
    except (OSError, ValueError) as exc:
        sys.exit(f"plot_pareto: error: {exc}")


if __name__ == "__main__":
    main()
