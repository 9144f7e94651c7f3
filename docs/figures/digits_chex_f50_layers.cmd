python scripts/plot_pareto.py --layers <compress-table table=digits_pareto output dir>/rows/chex_f50/results.json --out docs/figures/digits_chex_f50_layers
