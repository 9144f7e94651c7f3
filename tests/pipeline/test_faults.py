"""Faults during a run: a second process on the same output dir, a training loss that turns NaN."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from compress_run.core.errors import EXIT_BAD_INPUT, TrainingDiverged
from compress_run.pipeline.checkpoints import lock_output_dir, unlock_output_dir
from tests.conftest import cli_path, run_pipeline
from tests.pipeline.test_cli_errors import _digest

FAST = ["dataset=digits", "debug=smoke", "logger=none"]


def _start_long_run(out: Path, tmp_path: Path) -> subprocess.Popen:
    """A run that holds ``out`` for a while (200 short epochs); returns once it holds the dir's lock."""
    proc = subprocess.Popen([cli_path(), *FAST, "schedule.train.epochs=200", f"output_dir={out}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while f"pid {proc.pid} " not in ((out / ".lock").read_text() if (out / ".lock").is_file() else ""):
        assert proc.poll() is None and time.time() < deadline, "the first run never took the output dir"
        time.sleep(0.2)
    return proc


def test_a_second_run_on_a_busy_output_dir_is_refused(cli_forked, tmp_path):
    out = tmp_path / "run"
    first = _start_long_run(out, tmp_path)
    try:
        second = cli_forked(*FAST, f"output_dir={out}")
        err = " ".join(second.stderr.split())
        assert second.returncode == EXIT_BAD_INPUT, err[-2000:]
        assert f"is in use by another compress-run (pid {first.pid} on" in err and "Fix:" in err
        assert first.poll() is None  # the first run goes on untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock_output_dir(out)  # a killed run holds nothing: the dir is free again
    unlock_output_dir(out)

def test_a_loss_that_turns_nan_stops_the_run_naming_stage_and_step(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        run_pipeline([*FAST, "evaluate.measure_latency=false", "schedule.train.lr=1e30",
                      "schedule.train.epochs=3"], out)
    text = " ".join(caught.value.paragraph().split())
    assert "training diverged: the train stage's loss is" in text and "step" in text, text
    assert caught.value.stage == "train" and caught.value.step >= 1
    assert "lower schedule.train.lr" in text
    assert not (out / "stages" / "train.json").is_file()  # the stage is not recorded as finished
    assert not (out / "results.json").is_file() or json.loads((out / "results.json").read_text())["status"] != "ok"


def test_a_full_disk_gives_a_clear_error_and_keeps_the_finished_stages(tmp_path):
    out = tmp_path / "run"
    first = subprocess.run([cli_path(), *FAST, "stages=[train]", f"output_dir={out}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(out)

    def small_disk() -> None:  # files may not grow past 200 kB (a checkpoint is ~1 MB): writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    full = subprocess.run([cli_path(), *FAST, f"output_dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, preexec_fn=small_disk)
    err = " ".join(full.stderr.split())
    assert full.returncode == EXIT_BAD_INPUT, err[-3000:]
    assert "compress-run: error: no room to write" in err and "run the same command again" in err, err[-2000:]
    assert "Traceback" not in full.stderr
    after = _digest(out)
    assert {k: after.get(k) for k in before if not k.startswith(".hydra")} == \
        {k: v for k, v in before.items() if not k.startswith(".hydra")}  # the train stage, its record, run.json
    assert not list(out.rglob("*.tmp"))  # no half-written file left
    resumed = subprocess.run([cli_path(), *FAST, f"output_dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0 and "stage train: already finished" in resumed.stdout, resumed.stderr[-3000:]
