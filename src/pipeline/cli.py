"""The ``compress-run`` console script (Hydra 1.3 app; configs from the ``compress_run.conf`` package).

Bad input (unknown option or key, impossible value, missing data, unusable checkpoint) is printed as
one paragraph naming the cause and the fix, with exit code 2. In a multirun a failing job is recorded
in its results.json and the sweep goes on; the command then exits non-zero after the last job.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress_run.core.errors import EXIT_BAD_INPUT, UserError
from compress_run.pipeline.checkpoints import atomic_write_json
from compress_run.pipeline.schema import register_schemas


def config_group_lines() -> str:
    """`group: option, option, ...` for the YAML options shipped in compress_run.conf (schemas left out)."""
    from importlib.resources import files

    lines = []
    for group in sorted(p for p in files("compress_run.conf").iterdir() if p.is_dir()):
        names = sorted(f.name[:-5] for f in group.iterdir() if f.name.endswith(".yaml"))
        if names and group.name not in ("hydra", "paths"):
            lines.append(f"  {group.name}: {', '.join(names)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("first_set", lambda *values: next((v for v in values if v is not None), None),
                                replace=True)
OmegaConf.register_new_resolver("config_groups", config_group_lines, replace=True)
register_schemas()

FAILED_JOBS: list[tuple[str, str, bool]] = []  # (output dir, first line of error, was bad input)


def _run(cfg: DictConfig) -> dict | None:
    from compress_run.pipeline.runner import Pipeline  # heavy imports after config composition

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    pipeline = Pipeline(cfg, out, list(hc.overrides.task), choices)
    if hc.mode != RunMode.MULTIRUN:
        try:
            return pipeline.run()
        except UserError as exc:
            print(exc.paragraph(), file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
    try:
        return pipeline.run()
    except Exception as exc:  # one failing job must not stop the sweep
        bad_input = isinstance(exc, UserError)
        text = exc.paragraph() if bad_input else "".join(traceback.format_exception(exc))
        print(text, file=sys.stderr, flush=True)
        first = exc.cause if bad_input else f"{type(exc).__name__}: {exc}".splitlines()[0]
        FAILED_JOBS.append((str(out), first, bad_input))
        if not (out / "results.json").is_file():
            atomic_write_json(out / "results.json", {
                "status": "failed", "error": first, "bad_input": bad_input, "choices": choices,
                "overrides": list(hc.overrides.task)})
        return None


_hydra_main = hydra.main(version_base="1.3", config_path="pkg://compress_run.conf", config_name="config")(_run)


def translate(exc: BaseException) -> UserError | None:
    """A Hydra/OmegaConf composition error as a :class:`UserError`, or None if it is not one."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        real = [o for o in exc.options or [] if not o.startswith("base_")]
        if group:
            return UserError(f"unknown option '{option}' for config group '{group}'",
                             f"choose one of: {', '.join(real) or '(none)'} (e.g. {group}={real[0] if real else '?'})"
                             f", or add conf/{group}/{option}.yaml")
        return UserError(f"config '{missing}' was not found", "check the spelling of the group and option")
    if isinstance(exc, OverrideParseException):
        return UserError(f"the command-line override could not be parsed: {str(exc).splitlines()[0]}",
                         "write overrides as key=value (lists as key=[a,b], sweeps as key=a,b with -m)")
    if isinstance(exc, ConfigCompositionException | OmegaConfBaseException):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cause = exc.__cause__
        detail = str(cause).splitlines()[0] if cause is not None else (lines[-1] if lines else "")
        head = lines[0] if lines else type(exc).__name__
        if "not in" in detail or "Key '" in detail:
            fix = ("use an existing key: `compress-run --cfg job` prints every key; group options are "
                   "listed by `compress-run --help`")
        else:
            fix = "give a value of the right type and range (`compress-run --cfg job` shows the defaults)"
        text = head if detail in head else f"{head} {detail}"
        return UserError(f"invalid configuration: {text}", fix)
    return _launcher_error(exc)


def _launcher_error(exc: BaseException) -> UserError | None:
    """The SLURM launcher's two set-up failures (submitit's own exceptions) as a :class:`UserError`."""
    if isinstance(exc, RuntimeError) and 'Could not detect "srun"' in str(exc):
        return UserError("hydra/launcher=slurm submits the sweep to a SLURM cluster, but this machine has no srun "
                         "(nor sbatch) on its PATH",
                         "run the sweep from a login node of the cluster, or use hydra/launcher=joblib (parallel jobs "
                         "on this machine) or no hydra/launcher (one job after another)")
    cause = exc.__cause__
    if (type(exc).__name__ == "FailedJobError" and isinstance(cause, subprocess.CalledProcessError)
            and Path(str(cause.cmd[0])).name == "sbatch"):
        refusal = (str(cause.stderr or "").strip().splitlines() or [f"exit {cause.returncode}"])[0]
        return UserError(f"sbatch refused the sweep's job script: {refusal}",
                         "check hydra.launcher.partition, account, gpus_per_node, cpus_per_task, mem_gb and "
                         "timeout_min (or the COMPRESS_RUN_SLURM_* variables) against the cluster's limits (sinfo)")
    return None


def quiet_libraries() -> None:
    """Keep the console for our own progress lines: hide Lightning's banners and known-harmless warnings."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("hydra.core.utils").setLevel(logging.CRITICAL)  # we report job errors ourselves
    for pattern in (".*Checkpoint directory .* exists and is not empty.*", ".*weights_only.*",
                    ".*does not have many workers.*", ".*litlogger.*", ".*litmodels.*",
                    ".*The number of training batches .* is smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)


def register_plugins() -> None:
    """Register the rows sweeper by hand: an editable install hides it from Hydra's plugin scan."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.compress_run_rows import RowsSweeper

    Plugins.instance().register(RowsSweeper)


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach us, so we can print one clear paragraph
    quiet_libraries()
    register_plugins()
    try:
        _hydra_main()
    except SystemExit:
        raise
    except BaseException as exc:
        user_error = translate(exc)
        if user_error is None:
            raise
        print(user_error.paragraph(), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    from compress_run.pipeline.sweeps import FAILED

    failed = FAILED_JOBS or FAILED  # FAILED: from the sweep summary, also for jobs run in other processes
    if failed:
        print(f"compress-run: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
        for out, first, _ in failed:
            print(f"  {out}: {first}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT if all(bad for *_, bad in failed) else 1)


if __name__ == "__main__":
    main()
