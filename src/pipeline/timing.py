"""The timing pass of a table (``compress-table table=X --time``): the host speed of every finished run's network,
measured apart from the runs that trained it, on a quiet machine, in rounds that interleave the runs.

Runs that train share the cores with whatever else runs (another table, a test suite); their own latency
measurements read that load. The timing pass instead rebuilds each finished run's network from its run dir (the
checkpoint its evaluate stage read), checks that the machine is quiet (:class:`LoadMonitor`: other processes below
``max_load`` of the CPUs over a few seconds, else it refuses), and times every network once per round, ``rounds``
rounds in a row, so that a drift of the host (clock, cache, a short burst of load) spreads over every run alike;
each run's value is the median over the rounds. What is timed:

* an image classifier: ``host_ms``, batch-1 latency of the network as the evaluate stage deploys it on the host
  (batch norm folded, each masked layer on the kernel ``evaluate.kernels`` picks, attention in the form the host
  profile prices cheaper: :func:`host_deployment`), eager PyTorch;
* a causal LM: ``host_decode_tok_s``, decode tokens/s at batch 1 with the run's context in the cache, its
  per-channel quantized linear layers run as int8 GEMMs (:func:`integer_network`) and everything else in float.

The result, ``timing.json`` (in the table dir and beside the records), carries its host, commit and the load
measured during the pass; a table reads its timing columns from it and from nowhere else.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console

from compress_run.core.errors import UserError
from compress_run.core.tokens import gathered_links
from compress_run.hardware.llm_cost import decode_ms
from compress_run.hardware.llm_int8 import integer_network
from compress_run.hardware.measure import model_latency_ms
from compress_run.hardware.profile import load_profile
from compress_run.hardware.report import host_deployment, host_form
from compress_run.pipeline.checkpoints import unlock_output_dir
from compress_run.pipeline.provenance import LoadMonitor, code_version, host_info
from compress_run.pipeline.results import read_json
from compress_run.pipeline.runner import Pipeline

DECODE_STEPS = 16


def finished_network(run_dir: Path) -> tuple[torch.nn.Module, Pipeline]:
    """The network a finished run's evaluate stage read (its last finished stage's checkpoint), rebuilt from the
    run dir's own config."""
    config, overrides = run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "overrides.yaml"
    if not (config.is_file() and (run_dir / "results.json").is_file()):
        raise UserError(f"{run_dir} is not a finished run dir (no .hydra/config.yaml or results.json)",
                        "time only rows whose run dirs are on this machine (records alone hold no network)")
    cfg = OmegaConf.load(config)
    choices = read_json(run_dir / "results.json").get("choices", {})
    pipe = Pipeline(cfg, run_dir, list(OmegaConf.load(overrides)) if overrides.is_file() else [], choices)
    try:
        pipe.setup()
        net = pipe.net_for("evaluate", pipe.start_net)
    finally:
        unlock_output_dir(run_dir)
    return net.cpu().eval(), pipe


def timer(net: torch.nn.Module, pipe: Pipeline, warmup: int, repeats: int) -> tuple[str, Callable[[], float]]:
    """(metric, a function that times the network once) for a finished run's network."""
    shape = tuple(pipe.datamodule.network_input.shape)
    if pipe.causal_lm:
        integer, info = integer_network(net)
        model = integer if info["int8_layers"] else net
        return "host_decode_tok_s", lambda: 1e3 / decode_ms(model, shape[0], DECODE_STEPS)
    cfg = pipe.cfg
    host = load_profile(cfg.hardware.name if cfg.hardware.name == "host_cpu" else "host_cpu")
    form, sims = host_form(net, shape, host)
    deployed, _, _ = host_deployment(net, shape, cfg.evaluate.kernels, sims)

    def measure() -> float:
        with gathered_links(form == "gathered"):  # the attention form the evaluate stage timed
            return model_latency_ms(deployed, (1, *shape), warmup, repeats)
    return "host_ms", measure


def quiet_check(max_load: float, seconds: float = 3.0) -> dict[str, Any]:
    """The other processes' CPU share over ``seconds``; refuses when it exceeds ``max_load``."""
    monitor = LoadMonitor(interval=0.5).start()
    time.sleep(seconds)
    load = monitor.stop()
    if load.get("measured") and load["others_share"] > max_load:
        raise UserError(f"the machine is not quiet: other processes used {100 * load['others_share']:.0f}% of its "
                        f"{load['machine_cpus']} CPUs over {seconds:g} s (the timing pass allows "
                        f"{100 * max_load:.0f}%)", "stop the other jobs (table runs, test suites) and run the timing "
                        "pass again, or raise time_max_load=<share of the CPUs> to accept the load (it is recorded)")
    return load


def time_runs(run_dirs: dict[str, Path], rounds: int, max_load: float, console: Console, warmup: int = 3,
              repeats: int = 10, keep_bytes: int = 2 * 2**30) -> dict[str, Any]:
    """Time every run (key -> finished run dir) once per round for ``rounds`` rounds; networks are kept between
    rounds while their parameters fit in ``keep_bytes``, else rebuilt for each round."""
    before = quiet_check(max_load)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    monitor = LoadMonitor().start()
    kept: dict[str, tuple[str, Callable[[], float]]] = {}
    kept_bytes = 0
    values: dict[str, list[float]] = {key: [] for key in run_dirs}
    metric_of: dict[str, str] = {}
    try:
        for round_index in range(rounds):
            for key, run_dir in run_dirs.items():
                if key in kept:
                    metric, measure = kept[key]
                else:
                    net, pipe = finished_network(run_dir)
                    metric, measure = timer(net, pipe, warmup, repeats)
                    size = sum(p.numel() * p.element_size() for p in net.parameters())
                    if kept_bytes + size <= keep_bytes:
                        kept[key], kept_bytes = (metric, measure), kept_bytes + size
                metric_of[key] = metric
                values[key].append(measure())
            console.print(f"timing round {round_index + 1}/{rounds}: {len(run_dirs)} runs")
    finally:
        during = monitor.stop()
    if during.get("measured") and during["others_share"] > max_load:
        raise UserError(f"the machine did not stay quiet: other processes used {100 * during['others_share']:.0f}% "
                        f"of its CPUs during the timing pass (allowed: {100 * max_load:.0f}%); nothing was written",
                        "run the timing pass again when nothing else runs, or raise time_max_load=<share>")
    finished = {key: read_json(run_dir / "results.json") for key, run_dir in run_dirs.items()}
    return {"rounds": rounds, "started_at": started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git": code_version(), "host": host_info(), "torch_threads": torch.get_num_threads(),
            "load_before": before, "load": during,
            # each value belongs to the run that was timed: a run made again later (force=) does not take it
            "runs": {key: {"metric": metric_of[key], "value": round(statistics.median(v), 4),
                           "per_round": [round(x, 4) for x in v], "finished_at": finished[key].get("finished_at"),
                           "config_digest": finished[key].get("config_digest")} for key, v in values.items()}}
