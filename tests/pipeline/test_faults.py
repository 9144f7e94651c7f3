"""Faults during a run: a second process on the same output dir, a training loss that turns NaN, a full disk, a
kill in the middle of a checkpoint, results.json or table write."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

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


@pytest.mark.slow  # a run, its stage files filled to a full disk, and a rerun: in CI's slow set (test_faults.py)
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


# A stand-in for the installed scripts that stops inside the write of one file, half of its bytes in the temp file,
# and tells the test so (the marker), which then SIGKILLs it: a kill that lands exactly mid-write.
STOP_MID_WRITE = '''
import os, sys, tempfile, time
target, marker, entry = sys.argv[1], sys.argv[2], sys.argv[3]
made, real_mkstemp = {}, tempfile.mkstemp
def mkstemp(*args, **kwargs):
    fd, path = real_mkstemp(*args, **kwargs)
    made[fd] = os.path.basename(path)
    return fd, path
tempfile.mkstemp = mkstemp
from compress_run.pipeline import checkpoints
real_write = checkpoints._WriteErrors.write
def write(self, data):
    if made.get(self.file.fileno(), "").startswith("." + target + ".") and len(data) > 1:
        self.file.write(bytes(memoryview(data)[: len(data) // 2]))
        self.file.flush()
        open(marker, "w").close()
        time.sleep(600)
    return real_write(self, data)
checkpoints._WriteErrors.write = write
sys.argv = [entry, *sys.argv[4:]]
if entry == "compress-run":
    from compress_run.pipeline.cli import main
else:
    from compress_run.pipeline.table_cli import main
main()
'''


def _killed_mid_write(tmp_path: Path, target: str, entry: str, args: list[str]) -> None:
    script, marker = tmp_path / "stop_mid_write.py", tmp_path / f"in-{target}"
    script.write_text(STOP_MID_WRITE)
    proc = subprocess.Popen([sys.executable, str(script), target, str(marker), entry, *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not marker.is_file():
        assert proc.poll() is None and time.time() < deadline, f"never reached the write of {target}: " + \
            (proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("target", ["train.ckpt", pytest.param("results.json", marks=pytest.mark.slow)])
def test_a_kill_mid_write_leaves_nothing_half_written_to_read_back(tmp_path, target):
    out = tmp_path / "run"
    args = [*FAST, "evaluate.measure_latency=false", f"output_dir={out}"]
    _killed_mid_write(tmp_path, target, "compress-run", args)
    partial = [p for p in out.rglob("*.partial.tmp")]
    assert partial and all(p.name.startswith(f".{target}.") for p in partial)  # the half-written temp file
    assert not list(out.rglob(target))  # never renamed into place
    rerun = subprocess.run([cli_path(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(out.rglob("*.tmp"))  # the rerun cleared the killed run's temp file
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["evaluate"]["status"] == "done"
    ckpt = torch.load(out / "checkpoints" / "train.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]


@pytest.mark.slow  # a one-row table at smoke scale, then its rerun
def test_a_table_killed_mid_write_is_completed_by_its_rerun(tmp_path):
    table, out = tmp_path / "one.yaml", tmp_path / "table"
    OmegaConf.save(OmegaConf.create({"title": "one", "metrics": ["top1"], "rows": [
        {"name": "dense", "experiment": "fmnist_dense"}]}), table)
    args = [f"table={table}", "scale=smoke", f"output_dir={out}", "evaluate.measure_latency=false"]
    _killed_mid_write(tmp_path, "TABLE.md", "compress-table", args)
    assert not (out / "TABLE.md").exists() and list(out.glob(".TABLE.md.*.partial.tmp"))
    exe = Path(sys.executable).with_name("compress-table")
    rerun = subprocess.run([str(exe), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 1 rows done" in (out / "TABLE.md").read_text()
