"""The wheel ships the configs: build it, install it outside the repo and run compress-run from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # an integration test of minutes: in CI's slow set
def test_wheel_install_runs_outside_the_repository(tmp_path):
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(dist.glob("compress_run-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("compress_run/conf/config.yaml", "compress_run/conf/model/resnet20.yaml",
                     "compress_run/conf/method/gmp.yaml", "compress_run/pipeline/cli.py",
                     "compress_run/core/masks.py", "compress_run/conf/experiment/fmnist_gap.yaml",
                     "compress_run/conf/experiment_base/fmnist_small.yaml",
                     "compress_run/pipeline/pgap_jobs.py", "compress_run/kernels/csrc/gather_scatter.cpp",
                     "compress_run/_build_info.json"):
        assert expected in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import compress_run; print(compress_run.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the wheel's copy, not the source checkout
    exe = [sys.executable, str(site / "bin" / "compress-run")]

    job = subprocess.run([*exe, "--cfg", "job", "method=gmp"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "_target_: compress_run.methods.gmp.GMP" in job.stdout
    help_text = subprocess.run([*exe, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                               timeout=120).stdout
    assert "resnet20" in help_text and "fashion_mnist" in help_text
    pgap_help = subprocess.run([sys.executable, str(site / "bin" / "compress-pgap"), "--help"], cwd=elsewhere,
                               env=env, capture_output=True, text=True, timeout=120)
    assert pgap_help.returncode == 0 and "hydra/launcher=joblib" in pgap_help.stdout

    sweep = subprocess.run([*exe, "-m", "method=dense,magnitude", "dataset=digits", "debug=smoke", "logger=none",
                            "output_dir=sweep"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for job_dir in ("0", "1"):
        results = json.loads((elsewhere / "sweep" / job_dir / "results.json").read_text())
        assert results["status"] == "ok"
        # no git where the wheel runs: the commit is the one stamped into the wheel when it was built
        assert results["git"]["source"] == "install stamp" and results["git"]["commit"] == head
