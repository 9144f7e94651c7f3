"""The fault matrix at its quick size: SIGKILL at a random moment, rerun, bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # 2 reference runs + 2 killed-and-rerun trials: CI runs it in its slow set
def test_quick_fault_matrix_loses_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_matrix.py"), "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "160"})
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = re.search(r"2 trials, (\d) killed, (\d) survived, 0 lost", text)
    assert verdict and verdict[1] == verdict[2] != "0", text[-2000:]  # a trial whose run ended first tests nothing
    assert "identical to the uninterrupted run" in text


@pytest.mark.slow  # 1 distributed reference run + 1 killed-and-rerun trial, two gloo processes each
def test_a_killed_distributed_run_resumes_bit_exactly(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_matrix.py"), "--trainer", "ddp_cpu",
                           "--family", "sparse training (GMP)", "--trials", "1", "--seed", "1", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "COLUMNS": "160"})
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 trials, 1 killed, 1 survived, 0 lost" in text, text[-2000:]
    result = json.loads(out.read_text())
    assert "trainer=ddp_cpu" in result["settings"]["common"] and result["rows"][0]["kills"][0]["stage"] != "finished"


def test_a_trial_whose_run_ended_before_its_kill_is_not_counted_as_survived(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from results_benchmarks import fault_matrix_table

    rows = [{"family": "f", "kills": [{"stage": "train"}], "survived": True},
            {"family": "f", "kills": [{"stage": "finished"}], "survived": True},
            {"family": "f", "kills": [{"stage": "compress"}], "survived": False}]
    text = "\n".join(fault_matrix_table({"settings": {"families": {"f": []}}, "rows": rows}))
    assert "| f | 3 | train, compress | 1 | 1 | 1 |" in text
    assert "3 trials, 2 killed, 1 survived, **1 lost** (1 ended before the kill)" in text
