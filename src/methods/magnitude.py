"""One-shot magnitude pruning (the standard post-training baseline; Han et al. 2015, one-shot form).

Algorithm: train the dense model; at the compress stage score every prunable weight by |w|, allocate
the target sparsity over layers (``distribution``), keep the highest scores per layer with the
``pattern`` projection, freeze the masks; finetune with masked gradients zeroed and masks re-applied
after every optimizer step.

Config keys (conf/method/magnitude.yaml):
* ``sparsity`` (0.9): fraction of the prunable weights set to zero.
* ``distribution`` (uniform): ``uniform`` = same sparsity per layer, ``global`` = one magnitude
  threshold over all prunable weights, ``erk`` = Erdos-Renyi-kernel allocation.
* ``pattern`` (irregular): mask projection (see ``compress_run.core.projections``).
* ``exclude`` ([first_conv, classifier]): module-name globs kept dense.
* ``mask_grads`` (true): zero gradients of pruned weights before each optimizer step.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, method_config


class Magnitude(MaskPruningMethod):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    Config = method_config("magnitude")(MaskPruningConfig)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        self.prune_to(model, self.sparsity)
        return model
