"""One-shot magnitude pruning (the standard post-training baseline; Han, Pool, Tran, Dally, "Learning both
Weights and Connections for Efficient Neural Networks", NeurIPS 2015, in its one-shot form).

Reference code: no released code of the authors for this baseline; compared with pytorch/pytorch —
torch/nn/utils/prune.py: ``L1Unstructured.compute_mask`` (the round(amount·n) smallest |w| of a tensor) and
``global_unstructured`` (one threshold over several tensors).
Deviations from it, with reasons: docs/fidelity.md (section magnitude).

Algorithm: train the dense model; at the compress stage score every prunable weight by |w|, allocate
the target sparsity over layers (``distribution``), keep the highest scores per layer with the
``pattern`` projection, freeze the masks; finetune with masked gradients zeroed and masks re-applied
after every optimizer step.

Our choices: one-shot and count-based (keep round((1-s)·n) per layer, or one global threshold), where Han et
al. prune iteratively with a per-layer threshold of a quality parameter times the std of the layer's weights;
the stem conv and the classifier are excluded by default (Han et al. prune every conv and fc layer; no reason
recorded — see docs/fidelity.md); ``distribution: erk`` and the structured ``pattern``s are extensions.

Config keys (conf/method/magnitude.yaml):
* ``sparsity`` (0.9): fraction of the prunable weights set to zero.
* ``distribution`` (uniform): ``uniform`` = same sparsity per layer, ``global`` = one magnitude
  threshold over all prunable weights, ``erk`` = Erdos-Renyi-kernel allocation.
* ``pattern`` (irregular): mask projection (see ``compress_run.core.projections``).
* ``exclude`` ([first_conv, classifier]): module-name globs kept dense. On a causal LM (no conv layers)
  ``first_conv`` selects nothing; the output head tied to the token embedding is never pruned (it is the
  embedding), so every linear layer of the blocks is pruned and the embeddings stay dense.
* ``mask_grads`` (true): zero gradients of pruned weights before each optimizer step.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, method_config


class Magnitude(MaskPruningMethod):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    Config = method_config("magnitude")(MaskPruningConfig)
    tasks = ("classification", "causal_lm")  # a causal LM: every linear layer but the tied head (embeddings stay)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        self.prune_to(model, self.sparsity)
        return model
