"""Hydra sweeper plugin of compress-run: one job per explicit list of overrides (``hydra/sweeper=rows``).

Hydra only instantiates sweepers that live in the ``hydra_plugins`` namespace, hence this small package.
Hydra's basic sweeper runs the cross product of ``key=a,b`` overrides; a paper table is instead a list of
heterogeneous rows (an experiment plus its own overrides), so ``compress-table`` writes the rows to a YAML
file, a list of override lists, and runs ``compress-run -m hydra/sweeper=rows hydra.sweeper.jobs_file=F``.
The jobs go through whatever launcher is configured (basic, joblib, submitit), the command-line overrides
apply to every job (placed after the row's own, so they win), and the usual multirun callbacks run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf


class RowsSweeper(Sweeper):
    def __init__(self, jobs_file: str, max_batch_size: int | None = None) -> None:
        super().__init__()
        self.jobs_file, self.max_batch_size = jobs_file, max_batch_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def load_jobs(self) -> list[list[str]]:
        path = Path(self.jobs_file)
        if not path.is_file():
            raise HydraException(f"hydra.sweeper.jobs_file '{path}' does not exist")
        jobs = OmegaConf.load(path)
        if not isinstance(jobs, ListConfig) or not all(isinstance(job, ListConfig) for job in jobs):
            raise HydraException(f"hydra.sweeper.jobs_file '{path}' must hold a list of override lists")
        return [[str(o) for o in job] for job in jobs]

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                raise HydraException(f"'{override.input_line}': the rows sweeper runs the listed jobs only; "
                                     "give one value per key (a comma-separated sweep is the basic sweeper's)")
        jobs = [[*job, *arguments] for job in self.load_jobs()]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        size = self.max_batch_size or max(len(jobs), 1)
        returns, start = [], 0
        for begin in range(0, len(jobs), size):
            batch = jobs[begin:begin + size]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=start)
            for result in results:
                _ = result.return_value  # re-raises a job's exception, as the basic sweeper does
            start += len(batch)
            returns.append(results)
        return returns
