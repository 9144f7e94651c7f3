"""``compress-pgap``: P-GaP with its kappa workers as independent jobs, one Hydra multirun per round.

    compress-pgap --out runs/pgap --rounds 2 -- experiment=fmnist_pgap hydra/launcher=joblib

Round r: ``compress-run -m <overrides> method.worker=0,...,kappa-1 stages=[train]
init_ckpt=<round r-1 merged> output_dir=<out>/round<r>`` (each job: grow partition i, train
``schedule.train.epochs`` with a fresh optimizer; with ``hydra/launcher=joblib`` the jobs run in parallel,
``hydra/launcher=submitit_slurm`` puts them on a cluster). Then the merge: partition i's layers from worker
i, every other tensor from worker 0, every prunable layer magnitude-pruned to the target; written to
``<out>/round<r>/merged.ckpt``. After the last round ``compress-run <overrides> init_ckpt=<merged>
stages=[finetune,evaluate] output_dir=<out>/final`` fine-tunes and evaluates. ``schedule.train.epochs`` is
the length of one worker's step (T). Rerunning the command skips finished rounds (each job resumes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

from compress_run.core.restore import restore_compression
from compress_run.methods.gap import GaP, merge_worker_states
from compress_run.pipeline.checkpoints import atomic_torch_save, load_checkpoint, net_state_from_checkpoint
from compress_run.pipeline.network_input import adapt_network, network_input_of


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import compress_run.pipeline.cli  # noqa: F401  (schemas and resolvers)

    with initialize_config_module(config_module="compress_run.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=job_overrides(overrides))


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides without launcher settings (hydra/launcher=..., hydra.launcher.n_jobs=...)."""
    return [o for o in overrides if not o.startswith(("hydra/", "hydra.", "+hydra"))]


def compress_run(args: list[str]) -> None:
    exe = Path(sys.executable).with_name("compress-run")
    print("+ compress-run " + " ".join(args), flush=True)
    code = subprocess.run([str(exe) if exe.exists() else "compress-run", *args]).returncode
    if code:
        print(f"compress-pgap: this compress-run command failed (exit {code}); fix the cause printed above and "
              "rerun the same compress-pgap command: finished rounds and jobs are kept", file=sys.stderr)
        sys.exit(code)


def merge_round(overrides: list[str], round_dir: Path, num_partitions: int) -> Path:
    cfg = compose(overrides)
    torch.manual_seed(cfg.seed)
    net = adapt_network(instantiate(cfg.model), network_input_of(cfg.dataset), str(cfg.model._target_))
    method: GaP = instantiate(cfg.method)
    method.check_applicable(net)
    workers = {}
    for i in range(num_partitions):
        ckpt = round_dir / str(i) / "checkpoints" / "train.ckpt"
        workers[i] = net_state_from_checkpoint(load_checkpoint(ckpt, f"P-GaP worker {i}", "rerun the round"))
    merged = merge_worker_states(workers, method.groups)
    restore_compression(net, merged)
    net.load_state_dict(merged)
    method.prune_subset(net, list(method.layers(net)), method.sparsity)
    out = round_dir / "merged.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    atomic_torch_save({"state_dict": state, "compress_run": {"stage": "pgap_merge", "partitions": method.groups}}, out)
    print(f"[pgap] round {round_dir.name}: merged {num_partitions} workers -> {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="compress-run overrides (after --)")
    args = parser.parse_args()
    overrides = [*args.overrides, "method=gap", "method.variant=parallel"] \
        if not any(o.startswith("method=") or o.startswith("experiment=") for o in args.overrides) \
        else [*args.overrides, "method.variant=parallel"]
    try:
        cfg = compose(overrides)
        if cfg.method.get("variant") != "parallel":
            raise ValueError("the composed method is not GaP (method=gap)")
        kappa = int(cfg.method.num_partitions)
    except Exception as exc:
        print(f"compress-pgap: the overrides {overrides} do not compose to a P-GaP config: "
              f"{str(exc).splitlines()[0].rstrip('.')}. Pass compress-run overrides after `--`, e.g. "
              "`compress-pgap --out runs/pgap -- experiment=fmnist_pgap`.", file=sys.stderr)
        sys.exit(2)
    previous: Path | None = None
    for r in range(args.rounds):
        round_dir = args.out / f"round{r}"
        merged = round_dir / "merged.ckpt"
        if not merged.is_file():
            compress_run(["-m", *overrides, f"method.worker={','.join(map(str, range(kappa)))}", "stages=[train]",
                          f"init_ckpt={previous or 'null'}", f"output_dir={round_dir}"])
            merge_round(overrides, round_dir, kappa)
        previous = merged
    compress_run([*job_overrides(overrides), f"init_ckpt={previous}",
                  "stages=[finetune,evaluate]", f"output_dir={args.out / 'final'}"])


if __name__ == "__main__":
    main()
