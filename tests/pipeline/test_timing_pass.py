"""The timing pass (compress-table --time): finished runs rebuilt from their run dirs and timed apart, in
interleaved rounds, refused on a busy machine; the table's timing columns come from it alone."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from compress_run.core.errors import UserError
from compress_run.pipeline.table_cli import run
from compress_run.pipeline.tables import load_table, row_overrides, run_dir_of
from tests.conftest import TINY_LLM, read_json, run_pipeline

QUIET = Console(file=io.StringIO())


def table_with_runs(tmp_path, rows, metrics, extra=()):
    path, out = tmp_path / "timed.yaml", tmp_path / "out"
    OmegaConf.save(OmegaConf.create({"title": "timed", "metrics": metrics, "rows": rows,
                                     "smoke_overrides": ["schedule.train.epochs=1", *extra]}), path)
    table = load_table(str(path))
    for row in table.rows:  # each row's run, made in-process exactly as the table would launch it
        run_pipeline(row_overrides(table, row, smoke=True), run_dir_of(out, row))
    return path, out


def test_classifier_rows_get_host_latency_from_the_timing_pass_only(tmp_path):
    rows = [{"name": "dense", "experiment": "fmnist_dense"},
            {"name": "magnitude", "experiment": "fmnist_magnitude", "overrides": ["method.sparsity=0.9"]}]
    path, out = table_with_runs(tmp_path, rows, ["top1", "host_ms"])
    args = [f"table={path}", "scale=smoke", f"output_dir={out}"]
    run([*args, "--collect"], QUIET)
    assert {r["row"]: r["host_ms_ours"] for r in read_json(out / "table.json")["rows"]} == \
        {"dense": None, "magnitude": None}  # the runs timed themselves under whatever load: not shown
    assert "not measured apart yet" in (out / "TABLE.md").read_text()

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with pytest.raises(UserError, match="not quiet"):
            run([*args, "--time", "time_max_load=0.0"], QUIET)
    finally:
        busy.kill()
        busy.wait()
    assert not (out / "timing.json").exists()

    assert run([*args, "--time", "time_rounds=2", "time_max_load=1.0"], QUIET) == 0
    timing = read_json(out / "timing.json")
    assert timing["rounds"] == 2 and timing["host"]["key"] and timing["load"]["measured"]
    assert {k: len(v["per_round"]) for k, v in timing["runs"].items()} == {"dense": 2, "magnitude": 2}
    table = {r["row"]: r for r in read_json(out / "table.json")["rows"]}
    assert table["dense"]["host_ms_ours"] == timing["runs"]["dense"]["value"] > 0
    assert read_json(out / "records" / "timing.json") == timing  # kept beside the records
    assert "the timing pass of" in (out / "TABLE.md").read_text()
    # a run made again after the pass does not take the old network's timing
    remade = out / "rows" / "magnitude" / "results.json"
    results = read_json(remade)
    remade.write_text(json.dumps({**results, "finished_at": "2030-01-01T00:00:00+00:00"}))
    (out / "records" / "magnitude.json").unlink()
    run([*args, "--collect"], QUIET)
    table = {r["row"]: r for r in read_json(out / "table.json")["rows"]}
    assert table["magnitude"]["host_ms_ours"] is None and table["dense"]["host_ms_ours"] is not None


def test_a_causal_lm_row_is_timed_in_decode_tokens_per_second(tmp_path, text_corpus):
    rows = [{"name": "w8a8", "experiment": "tiny_llama_shakespeare",
             "overrides": [*TINY_LLM, f"dataset.root={text_corpus}", "quant=w8a8", "quant.calib_size=8"]}]
    path = tmp_path / "lm.yaml"
    OmegaConf.save(OmegaConf.create({"title": "lm", "metrics": ["ppl", "host_decode_tok_s"], "rows": rows,
                                     "smoke_base": []}), path)
    table, out = load_table(str(path)), tmp_path / "out"
    run_pipeline(row_overrides(table, table.rows[0], smoke=True), run_dir_of(out, table.rows[0]))
    assert run([f"table={path}", "scale=smoke", f"output_dir={out}", "--time", "time_rounds=1",
                "time_max_load=1.0"], QUIET) == 0
    timing = read_json(out / "timing.json")["runs"]["w8a8"]
    assert timing["metric"] == "host_decode_tok_s" and timing["value"] > 0
    assert read_json(out / "table.json")["rows"][0]["host_decode_tok_s_ours"] == timing["value"]
