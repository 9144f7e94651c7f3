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
