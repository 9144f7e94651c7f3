"""GaP — scheduled grow-and-prune (Ma, Qin, Sun et al., "Effective model sparsification by scheduled
grow-and-prune methods", ICLR 2022).

Reference code: boone891214/GaP (only the WMT14 Transformer code is released; the ResNet-50 code is not):
* the C-GaP driver (one job per step, ``--retrain-mask-pattern random`` for the initial sparse partitions,
  ``--sp-prune-before-retrain``, ``--restart-training``):
  Transformer/scripts/multi_round_gap/script_magnitude_sp_0.9_sequential_multi_round/3_part/10_epochs_per_round/sequential_gap_distributed_run_3_partition.py
* the P-GaP driver:
  Transformer/scripts/multi_round_gap/script_magnitude_sp_0.9_parallel_multi_round/3_part/10_epochs_per_train/parallel_gap_distributed_run_3_partition_no_finetune.py
* Transformer/fairseq/ddp_trainer.py: ``DDPTrainer.combine_sparse_block`` (the P-GaP merge);
  Transformer/prune_utils/retrain.py: ``Retrain.generate_mask``, ``Retrain.update_mask``,
  ``Retrain.seq_gap_partition``; Transformer/prune_utils/admm.py: ``weight_pruning`` (per-layer magnitude);
  Transformer/prune_utils/utils_pr.py: ``generate_rand_seq_gap_yaml`` (the random-partition ablation);
  Transformer/profiles/3_step_sequential_gap_sp_0.9/*.yaml (the partitions).
Deviations from it, with reasons: docs/fidelity.md (section gap).

Algorithm: a sparse model is trained from scratch while one group of layers at a time is dense. The
prunable layers are split into ``num_partitions`` (kappa) groups of consecutive layers. The train stage
is ``rounds * kappa`` GaP steps of equal length (cycles, :mod:`compress_run.methods.cycles`).
* ``cyclic`` (C-GaP): random init; partition 0 dense, the others magnitude-pruned to s. At the start of
  step k >= 1 the partition dense in step k-1 is magnitude-pruned to s and partition k mod kappa grows
  to dense: its mask is removed, its pruned weights re-enter training at exactly 0. The other masks stay.
  After the last step the compress stage prunes the still-dense partition to s; finetune trains with
  every mask frozen.
* ``random`` (ablation): each step grows a random round(L/kappa) of the L layers, never last step's ones.
* ``parallel`` (P-GaP): each round the sparse model is copied to kappa workers; worker i grows partition
  i and trains one step with a fresh optimizer; the merged model takes partition i's layers (weight,
  bias, mask) from worker i and every other tensor (BN, first conv, classifier) from worker 0; then every
  prunable layer is magnitude-pruned to s. Here the workers of a round run one after another inside the
  train stage (worker i = step k with i = k mod kappa); the compress stage merges the last round.

Our choices, each a deviation from the released code:
* The initial masks of the sparse partitions are magnitude masks of the random initialisation: the same
  uniformly random positions, but the kept values are the init's largest, so those partitions start with a
  larger RMS. The authors' drivers draw uniformly random masks (``--retrain-mask-pattern random``,
  ``Retrain.generate_mask`` 'random'). (ours; no reason recorded — see docs/fidelity.md)
* The P-GaP merge takes only the prunable layers' tensors of partition i from worker i and the norm layers
  from worker 0; the authors' ``combine_sparse_block`` copies every parameter of partition i's blocks,
  LayerNorms included, from worker i. (ours; not checked against the paper text — see docs/fidelity.md)
* ``rounds`` defaults to 1; the authors' drivers run 10 rounds. (ours; no reason recorded — see
  docs/fidelity.md)
* Partitions come from ``partitioner`` (default ``equal_params``, balanced by parameter count); the authors'
  are hand-written consecutive layer groups (their ResNet-50 groups are not released).
* The authors restart the optimizer and LR warm-up at every step because each step was a separate job; with
  ``reset_optimizer_each_step`` (default) every step therefore restarts the whole LR schedule of
  ``schedule.train`` squeezed into the step's length (warm-up included), not their per-job 4000-update
  warm-up and inverse-sqrt decay.
* With ``distribution: global`` the partition being pruned gets one magnitude threshold over its layers and
  keeps exactly its share (1 - s) of its weights, so the model meets the budget after every step; ``erk``
  prunes every layer to its ERK density among all prunable layers. The authors prune each layer to the
  ratio of its yaml profile.

Config keys (conf/method/gap.yaml):
* ``sparsity`` (0.9), ``distribution`` (uniform), ``pattern`` (irregular), ``exclude``
  ([first_conv, classifier]), ``mask_grads`` (true): as for ``magnitude``.
* ``variant`` (cyclic): cyclic | random | parallel.
* ``num_partitions`` (4): kappa.
* ``partitioner`` (equal_params): by_stage | equal_params | a list of module-name globs, one per
  partition (:mod:`compress_run.methods.partitions`); the partitions are printed at the start.
* ``rounds`` (1): R; the train stage holds R * kappa steps.
* T, the epochs per step, is schedule.train.epochs / (R * kappa) (the train stage split evenly).
* ``reset_optimizer_each_step`` (true): clear optimizer state and restart the LR schedule every step
  (always on for ``parallel``: each worker starts with a fresh optimizer).
* ``worker`` (null): P-GaP as independent jobs — run only worker i of one round: the train stage
  grows partition i of the model given by ``init_ckpt`` (round 0: the seeded init pruned to s) and
  trains ``schedule.train.epochs``; ``compress-pgap`` launches the kappa workers of every round
  as one Hydra multirun (``hydra/launcher=joblib`` locally) and merges them between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import MaskEnforcer, attach_mask, get_mask
from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, NotApplicable, method_config
from compress_run.methods.cycles import CycleCallback, seeded_generator
from compress_run.methods.partitions import PARTITIONERS, PartitionError, describe, partition

VARIANTS = ("cyclic", "random", "parallel")


@method_config("gap")
@dataclass
class GaPConfig(MaskPruningConfig):
    sparsity: float = 0.9
    variant: str = "cyclic"
    num_partitions: int = 4
    partitioner: Any = "equal_params"
    rounds: int = 1
    reset_optimizer_each_step: bool = True
    worker: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.sparsity > 0, "method.sparsity", self.sparsity, "a float in (0, 1) (GaP trains sparse)")
        check(self.variant in VARIANTS, "method.variant", self.variant, ", ".join(VARIANTS))
        check(self.num_partitions >= 2, "method.num_partitions", self.num_partitions, "an integer >= 2")
        check(self.rounds >= 1, "method.rounds", self.rounds, "an integer >= 1")
        ok = self.partitioner in PARTITIONERS if isinstance(self.partitioner, str) else (
            isinstance(self.partitioner, list) and len(self.partitioner) == self.num_partitions
            and all(isinstance(g, str) for g in self.partitioner))
        check(ok, "method.partitioner", self.partitioner,
              f"{', '.join(PARTITIONERS)} or a list of num_partitions={self.num_partitions} module-name globs")
        if self.worker is not None:
            check(self.variant == "parallel" and 0 <= self.worker < self.num_partitions, "method.worker",
                  self.worker, f"null, or 0..num_partitions-1={self.num_partitions - 1} with method.variant=parallel")


class GaP(MaskPruningMethod):
    state_attributes = ('workers', 'round_start')
    Config = GaPConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        if self.worker is not None:  # one P-GaP worker of one round as its own job: train only, one step
            self.stages, self.rounds = ("train",), 1
        self.seed = torch.initial_seed()  # the pipeline has seeded torch from cfg.seed before building us
        self.groups: list[list[str]] = []
        self.workers: dict[int, dict[str, torch.Tensor]] = {}  # P-GaP: finished workers of the current round
        self.round_start: dict[str, torch.Tensor] = {}         # P-GaP: the merged model the round started from

    @property
    def steps(self) -> int:
        return 1 if self.worker is not None else self.rounds * self.num_partitions

    # ----------------------------------------------------------------------------- contract
    def check_applicable(self, model: nn.Module) -> None:
        super().check_applicable(model)
        try:
            self.groups = partition(self.layers(model), self.num_partitions, self.partitioner)
        except PartitionError as exc:
            raise NotApplicable(f"method.partitioner: {exc}") from exc

    def lr_cycles(self, stage: str) -> int:
        resets = self.reset_optimizer_each_step or self.variant == "parallel"
        return self.steps if stage == "train" and resets else 1

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage != "train":
            return super().training_callbacks(stage, model)
        layers = self.layers(model)
        self.groups = partition(layers, self.num_partitions, self.partitioner)
        print(f"[compress-run] GaP {self.variant}: {self.steps} steps ({self.rounds} rounds x {self.num_partitions} "
              f"partitions, partitioner {self.partitioner}), sparsity {self.sparsity} {self.distribution}\n"
              + describe(layers, self.groups), flush=True)
        names = list(layers)
        if self.worker is not None:
            return self.start_worker_job(model)
        dense = self.dense_layers(0)
        if self.variant == "parallel":
            self.prune_subset(model, names, self.sparsity)
            self.round_start = clone_state(model)
        else:  # cyclic: each partition holds its own share of the budget
            sparse = self.groups[1:] if self.variant == "cyclic" else [[n for n in names if n not in dense]]
            for group in sparse:
                self.prune_subset(model, group, self.sparsity)
            for name in dense:
                attach_mask(layers[name], torch.ones_like(layers[name].weight, dtype=torch.bool))
        self.grow(model, dense)
        return [GaPScheduler(self), MaskEnforcer(self.mask_grads)]

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        layers = self.layers(model)
        if self.variant == "parallel":
            last = max([-1, *self.workers]) + 1  # the model at the end of training is this worker's
            self.workers[last] = clone_state(model)
            self.merge(model)
            self.prune_subset(model, list(layers), self.sparsity)
        else:
            still_dense = [n for n, m in layers.items() if bool(get_mask(m).all())]
            self.prune_subset(model, still_dense, self.sparsity)
        return model

    def start_worker_job(self, model: nn.Module) -> list[L.Callback]:
        """P-GaP worker ``worker`` as a job: start from the round's merged model (``init_ckpt``, masks
        included) or, in round 0, from the seeded random init pruned to s; grow partition ``worker``."""
        layers = self.layers(model)
        if not all(get_mask(m) is not None for m in layers.values()):
            self.prune_subset(model, list(layers), self.sparsity)
        self.grow(model, self.groups[self.worker])
        print(f"[compress-run] P-GaP worker {self.worker}: partition {self.worker} grown", flush=True)
        return [MaskEnforcer(self.mask_grads)]

    # ------------------------------------------------------------------------------- steps
    def dense_layers(self, step: int) -> list[str]:
        """The layers dense during GaP step ``step``."""
        if self.variant != "random":
            return list(self.groups[step % self.num_partitions])
        names = [n for group in self.groups for n in group]
        size = max(1, round(len(names) / self.num_partitions))
        previous: list[str] = []
        for k in range(step + 1):
            pool = [n for n in names if n not in previous]
            order = torch.randperm(len(pool), generator=seeded_generator(self.seed, k))
            previous = [pool[i] for i in sorted(order[:size].tolist())]
        return previous

    def grow(self, model: nn.Module, names: list[str]) -> None:
        """Make ``names`` dense: the mask opens, the pruned entries (exactly 0) train from 0."""
        layers = self.layers(model)
        for name in names:
            get_mask(layers[name]).fill_(True)

    def step_boundary(self, model: nn.Module, k: int) -> None:
        if self.variant == "parallel":
            worker = k % self.num_partitions
            self.workers[(k - 1) % self.num_partitions] = clone_state(model)
            if worker == 0:  # round finished: merge, prune all, the next round starts from the result
                self.merge(model)
                self.prune_subset(model, list(self.layers(model)), self.sparsity)
                self.round_start = clone_state(model)
            else:
                model.load_state_dict(self.round_start)
            self.grow(model, self.dense_layers(k))
            return
        self.prune_subset(model, self.dense_layers(k - 1), self.sparsity)
        self.grow(model, self.dense_layers(k))

    def merge(self, model: nn.Module) -> None:
        """P-GaP merge of the finished workers of this round into ``model``."""
        model.load_state_dict(merge_worker_states(self.workers, self.groups))
        self.workers = {}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "variant": self.variant, "num_partitions": self.num_partitions,
                "partitioner": self.partitioner, "rounds": self.rounds, "steps": self.steps,
                "reset_optimizer_each_step": self.reset_optimizer_each_step, "partitions": self.groups,
                "worker": self.worker}



def merge_worker_states(workers: dict[int, dict[str, torch.Tensor]], groups: list[list[str]]
                        ) -> dict[str, torch.Tensor]:
    """Partition i's layers (weight, bias, mask) from worker i, every other tensor from worker 0."""
    merged = dict(workers[0])
    for i, state in workers.items():
        for layer in groups[i]:
            for key in state:
                if key.startswith(layer + ".") and key.count(".") == layer.count(".") + 1:
                    merged[key] = state[key]
    return merged


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class GaPScheduler(CycleCallback):
    def __init__(self, method: GaP) -> None:
        self.method = method
        resets = method.reset_optimizer_each_step or method.variant == "parallel"
        super().__init__(method.steps, reset_optimizer=resets, name="gap", on_boundary=self.boundary)

    def boundary(self, k: int, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.method.step_boundary(pl_module.net, k)  # a method, not a closure: ddp_spawn pickles the callback

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.method.load_state_dict(state_dict)
