"""COMCAT — low-rank multi-head attention for ViTs (Xiao et al., "COMCAT: Towards Efficient Compression and
Customization of Attention-Based Vision Models", ICML 2023), following the authors' released training code.

Reference code: jinqixiao/ComCAT — VisionTransformer/main.py: ``main`` (search and finetune loops, LR scaling,
Mixup, criteria); VisionTransformer/engine.py: ``train_one_epoch``, ``append_align_loss``, ``search_rank``;
VisionTransformer/losses.py: ``DistillationLossWithoutToken``; VisionTransformer/SVDLinear4AutoRank.py;
VisionTransformer/run.sh and README.md (the recipes). Deviations from it, with reasons: docs/fidelity.md (section
comcat).

Algorithm: each transformer block's attention is refactored per head through the products W_q·W_kᵀ and
W_v·W_o (:class:`~compress_run.core.lowrank_attention.LowRankAttention`: truncated SVDs of those
products give narrower heads computed with plain dense GEMMs); the MLP's two linears and the classifier
head become two-factor SVD layers. Every factorized module starts at its largest candidate rank. Then,
for ``search_epochs`` epochs: from the second epoch on, (1) every module is re-factored by SVD from the
product of its current factors (so a prefix of its components is the best truncation), (2) a search pass
updates only the rank logits: each module's output mixes its candidate truncations with Gumbel-softmax
weights at temperature τ, loss CE·(params/target)^β when the expected parameter count is above the
target, CE otherwise, (3) every module is cut to the argmax rank and τ is multiplied by
(τ_end/τ_start)^(1/epochs); in every epoch a training pass updates the weights at the current ranks with a
fresh AdamW (cosine LR over the epochs) on the distillation loss of the shared ``distill`` path
(:mod:`compress_run.methods.distill`; the paper: hard distillation, alpha 0.5, from the uncompressed model)
plus an alignment term: the MSE between the outputs of blocks ``align_blocks`` (default the first two and
last two) and the teacher's, weighted by ``block_weight`` (0.5) multiplied every epoch by
cos(π/2·epoch/epochs), never below 0.01. The finetune stage then trains the small network (with the
``distill`` path when ``distill.stages`` includes finetune), plus the same alignment term at the constant weight
``finetune_block_weight`` against the finetune's teacher when it is set (:class:`FinetuneAlignment`): the
released finetune sets the decay factor to 0, so the weight sits at its floor 0.01 in every epoch (DeiT-S
script, ``--with-align``; the DeiT-B script does not align).

Choices where the paper leaves details open (documented here, configurable):
* Candidate ranks: the released code's tables — attention total ranks (summed over heads) 64…320 step 64
  for width 384 (32…160 for 192, 128…512 for 768), per-head rank = total // heads; MLP and head ranks by
  min(in, out): [12, 24, 32, 48, 64, 96, 128, 144, 192, 288] for 384 (the tables for 192 and 768 likewise).
  Other widths scale the 384 tables by width/384 (``attn_ranks``, ``mlp_ranks`` override).
* The classifier head is factorized when min(in, out) >= 64 (a 10-class head has no meaningful rank
  candidates; the released code has no table for it). ``factorize_head: false`` keeps it dense.
* Without ``distill.teacher`` the teacher (and alignment model) is the network as it enters the compress
  stage — the trained dense model, as in the released scripts (teacher path = the model being compressed).

Known deviations from the released code:
* The search pass reads the train split (``search_fraction`` of an epoch); the released code searches on
  its evaluation loader (ImageNet val). Ours keeps the validation and test splits out of every decision.
* Soft distillation uses the batch-mean KL (the released DeiT loss divides the summed KL by numel).
* Attention q/k biases are kept inside the factorization (the released code drops them); exact at full rank.
* Weights train with AdamW at ``weight_lr`` (the released code scales DeiT's 5e-4 by batch/512).

Config keys (conf/method/comcat.yaml):
* ``params_reduction`` (0.5): fraction of the dense model's parameters removed (target = rest).
* ``search_epochs`` (2; the paper: 30, set in the comcat_* paper experiments); ``search_fraction`` (1.0),
  ``train_fraction`` (1.0): fractions of an epoch in each search and training pass.
* ``tau_start`` (5.0), ``tau_end`` (0.1); ``params_exponent`` (1.5): β; ``arch_lr`` (0.01),
  ``arch_weight_decay`` (5e-4): AdamW on the logits; ``weight_lr`` (5e-4), ``weight_decay`` (0.05).
* ``block_weight`` (0.5), ``align_blocks`` ([0, 1, -2, -1]); ``finetune_block_weight`` (0.0 = off; the released
  DeiT-S finetune: 0.01), which needs a finetune teacher (``distill.teacher`` with finetune in ``distill.stages``).
* ``factorize_head`` (true); ``attn_ranks``, ``mlp_ranks``, ``head_ranks`` ([]): candidate lists (attention:
  total over heads); empty = the tables above.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from compress_run.core.config import check
from compress_run.core.errors import UserError
from compress_run.core.factorized import LowRankLinear
from compress_run.core.lowrank_attention import LowRankAttention, check_timm_attention
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config
from compress_run.methods.distill import distillation_loss
from compress_run.methods.rank_search import annealed_tau, budget_loss

ATTN_TOTAL_RANKS = {192: [32, 64, 96, 128, 160], 384: [64, 128, 192, 256, 320],
                    768: [128, 192, 256, 320, 384, 448, 512]}
LINEAR_RANKS = {192: [6, 12, 24, 48, 64, 96, 128, 144], 384: [12, 24, 32, 48, 64, 96, 128, 144, 192, 288],
                768: [24, 32, 48, 64, 128, 192, 256, 320, 384, 448, 512]}


@method_config("comcat")
@dataclass
class COMCATConfig(MethodConfig):
    params_reduction: float = 0.5
    search_epochs: int = 2
    search_fraction: float = 1.0
    train_fraction: float = 1.0
    tau_start: float = 5.0
    tau_end: float = 0.1
    params_exponent: float = 1.5
    arch_lr: float = 0.01
    arch_weight_decay: float = 5e-4
    weight_lr: float = 5e-4
    weight_decay: float = 0.05
    block_weight: float = 0.5
    align_blocks: list[int] = field(default_factory=lambda: [0, 1, -2, -1])
    finetune_block_weight: float = 0.0
    factorize_head: bool = True
    attn_ranks: list[int] = field(default_factory=list)
    mlp_ranks: list[int] = field(default_factory=list)
    head_ranks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(0.0 < self.params_reduction < 1.0, "method.params_reduction", self.params_reduction,
              "a float in (0, 1) (fraction of parameters removed)")
        check(self.search_epochs >= 1, "method.search_epochs", self.search_epochs,
              "an integer >= 1 (the paper: 30; the first epoch trains at the largest ranks, the search starts at the "
              "second)")
        for key in ("search_fraction", "train_fraction"):
            check(getattr(self, key) > 0, f"method.{key}", getattr(self, key), "a float > 0 (of an epoch)")
        check(0 < self.tau_end <= self.tau_start, "method.tau_start/tau_end", (self.tau_start, self.tau_end),
              "0 < tau_end <= tau_start")
        for key in ("block_weight", "finetune_block_weight", "arch_weight_decay", "weight_decay"):
            check(getattr(self, key) >= 0, f"method.{key}", getattr(self, key), "a float >= 0")
        check(self.weight_lr > 0 and self.arch_lr > 0, "method.weight_lr/arch_lr", (self.weight_lr, self.arch_lr),
              "floats > 0")
        check(all(r >= 1 for r in [*self.attn_ranks, *self.mlp_ranks, *self.head_ranks]),
              "method.attn_ranks/mlp_ranks/head_ranks", (self.attn_ranks, self.mlp_ranks, self.head_ranks),
              "lists of integers >= 1 (empty = the released code's tables)")


def alignment_weights(start: float, epochs: int) -> list[float]:
    """The block-alignment weight of every search epoch: multiplied by cos(π/2·epoch/epochs) each epoch (the
    released code's cumulative decay), never below 0.01."""
    weights, weight = [], start
    for epoch in range(epochs):
        weight = max(weight * math.cos(math.pi * 0.5 * epoch / epochs), 0.01)
        weights.append(weight)
    return weights


def block_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor], weight: float) -> torch.Tensor:
    """``weight`` × Σ MSE(student block output, teacher block output) (the released ``append_align_loss``)."""
    return weight * sum(F.mse_loss(s, t) for s, t in zip(student, teacher, strict=True))


class FinetuneAlignment(L.Callback):
    """The finetune stage's block alignment: the outputs of blocks ``align_blocks`` of the network in training
    against the teacher's on the same (possibly mixed) batch, ``weight`` × their summed MSE added to the loss.
    The teacher is the finetune's distillation teacher (the released script's align model is its teacher
    checkpoint); the term reaches the loss as an auxiliary loss of the network, handed over by a
    ``pop_auxiliary_losses`` attribute on the network's root for the length of the fit (no module is added, so
    checkpoints are unchanged)."""

    def __init__(self, align_blocks: list[int], weight: float) -> None:
        self.align_blocks, self.weight = list(align_blocks), weight
        self.hooks: list[Any] = []
        self.outputs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        self.term: torch.Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.distillation is None:
            raise UserError("method.finetune_block_weight aligns blocks with the finetune's teacher, but the finetune "
                            "stage has none", "set distill.teacher with finetune in distill.stages, or "
                            "method.finetune_block_weight=0")
        net, teacher = pl_module.net, pl_module.distillation.teacher
        names = list(transformer_blocks(teacher))  # the factorized network keeps the dense block names
        picked = [names[i] for i in sorted({i % len(names) for i in self.align_blocks})] if names else []
        if not picked or any(n not in dict(net.named_modules()) for n in picked):
            raise UserError(f"COMCAT aligns blocks {self.align_blocks}, but the teacher's transformer blocks "
                            f"{names[:3]}... are not blocks of the network", "use a teacher of the network's "
                            "architecture (distill.teacher=train) or method.finetune_block_weight=0")

        def keep(key: str, module: nn.Module, _args: Any, out: torch.Tensor) -> None:
            if key == "teacher" or module.training:
                self.outputs[key].append(out)

        def align(module: nn.Module, args: tuple, _out: Any) -> None:
            if module.training:
                self.outputs["teacher"].clear()
                with torch.no_grad():
                    teacher(args[0])
                self.term = block_alignment(self.outputs["student"], self.outputs["teacher"], self.weight)
            self.outputs["student"].clear(), self.outputs["teacher"].clear()

        self.hooks = [m.get_submodule(n).register_forward_hook(partial(keep, key))
                      for key, m in (("student", net), ("teacher", teacher)) for n in picked]
        self.hooks.append(net.register_forward_hook(align))
        net.pop_auxiliary_losses = self.pop_auxiliary_losses

    def pop_auxiliary_losses(self) -> dict[str, torch.Tensor]:
        term, self.term = self.term, None
        return {} if term is None else {"block_alignment": term}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if "pop_auxiliary_losses" in vars(pl_module.net):
            del pl_module.net.pop_auxiliary_losses


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks with an ``attn`` (timm Attention: ``qkv`` + ``proj``) and an ``mlp`` (``fc1`` + ``fc2``)."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "attn") and hasattr(m.attn, "qkv") and hasattr(m, "mlp")
            and hasattr(m.mlp, "fc1") and hasattr(m.mlp, "fc2")}


def _scaled(table: dict[int, list[int]], width: int) -> list[int]:
    if width in table:
        return list(table[width])
    return sorted({max(1, round(r * width / 384)) for r in table[384]})


class RankChoice:
    """One factorized module's rank search: logits over candidates, each candidate's parameter count."""

    def __init__(self, name: str, part: str, module: nn.Module, full: int, candidates: list[int],
                 params: Callable[[int], int]) -> None:
        self.name, self.part, self.module, self.full = name, part, module, full
        self.candidates = [r for r in candidates if 1 <= r <= full] or [full]
        self.params_of = params
        self.params = torch.tensor([float(params(r)) for r in self.candidates])
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))
        self.chosen = self.candidates[-1]

    def cap(self, rank: int) -> None:
        """The module now has ``rank`` components: larger candidates are gone (their logits with them)."""
        keep = [i for i, r in enumerate(self.candidates) if r <= rank] or [0]
        self.candidates = [self.candidates[i] for i in keep]
        self.params = torch.tensor([float(self.params_of(r)) for r in self.candidates])
        self.logits = nn.Parameter(self.logits.detach()[keep].clone())
        self.full = rank

    def gate(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-component gate: component c is kept by every candidate rank > c, weighted by its weight."""
        ranks = torch.tensor(self.candidates)
        keep = (torch.arange(self.full)[None, :] < ranks[:, None]).to(weights.dtype)  # candidates × full
        return weights @ keep

    def expected_params(self) -> torch.Tensor:
        return (F.softmax(self.logits, 0) * self.params).sum()


def _set_gate(choice: RankChoice, gate: torch.Tensor | None) -> None:
    module = choice.module
    if isinstance(module, LowRankAttention):
        setattr(module, "gate_qk" if choice.part == "qk" else "gate_vo", gate)
    else:
        module.gate = gate


class COMCAT(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    state_attributes = ('ranks', 'history', 'target_params')
    Config = COMCATConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.ranks: dict[str, list[int]] = {}
        self.history: list[dict[str, float]] = []
        self.target_params = 0.0
        self.block_names: list[str] = []

    def check_applicable(self, model: nn.Module) -> None:
        distill = self.distill_config
        if self.finetune_block_weight and not (distill.get("teacher") and "finetune" in distill.get("stages", [])):
            raise UserError("method.finetune_block_weight aligns blocks with the finetune's teacher, but the run "
                            "distils no finetune stage", "set distill.teacher=train with distill.stages=[finetune], "
                            "or method.finetune_block_weight=0")
        blocks = transformer_blocks(model)
        if not blocks:
            raise NotApplicable("no transformer block with attn (qkv, proj) and mlp (fc1, fc2): COMCAT is for ViTs")
        try:
            for block in blocks.values():
                check_timm_attention(block.attn)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from exc

    # ------------------------------------------------------------------ factorization and candidates
    def _linear(self, name: str, owner: nn.Module, attr: str, candidates: list[int]) -> RankChoice:
        linear = getattr(owner, attr)
        full = min(linear.in_features, linear.out_features)
        start = max([r for r in candidates if r <= full] or [full])
        low = LowRankLinear.from_linear(linear, start)
        setattr(owner, attr, low)
        return RankChoice(name, "svd", low, start, candidates,
                          lambda r, i=linear.in_features, o=linear.out_features: (i + o) * r + o)

    def factorize(self, model: nn.Module) -> list[RankChoice]:
        """Factorized modules at their largest candidate ranks in place of every block's attention and MLP
        linears (and the classifier head), with their rank choices."""
        choices: list[RankChoice] = []
        self.block_names = list(transformer_blocks(model))
        for name, block in transformer_blocks(model).items():
            attn = block.attn
            heads, d, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
            per_head = sorted({max(1, min(d, t // heads)) for t in (self.attn_ranks or _scaled(ATTN_TOTAL_RANKS, dim))})
            new = LowRankAttention.from_attention(attn, per_head[-1], per_head[-1])
            block.attn = new
            choices.append(RankChoice(f"{name}.attn.qk", "qk", new, per_head[-1], per_head,
                                      lambda r, h=heads, c=dim: 2 * (c * h * r + h * r)))
            choices.append(RankChoice(f"{name}.attn.vo", "vo", new, per_head[-1], per_head,
                                      lambda r, h=heads, c=dim: 2 * c * h * r + c))
            for fc in ("fc1", "fc2"):
                linear = getattr(block.mlp, fc)
                cands = self.mlp_ranks or _scaled(LINEAR_RANKS, min(linear.in_features, linear.out_features))
                choices.append(self._linear(f"{name}.mlp.{fc}", block.mlp, fc, cands))
        head = getattr(model, "head", None)
        if self.factorize_head and isinstance(head, nn.Linear) and min(head.in_features, head.out_features) >= 64:
            cands = self.head_ranks or _scaled(LINEAR_RANKS, min(head.in_features, head.out_features))
            choices.append(self._linear("head", model, "head", cands))
        return choices

    @staticmethod
    def resvd(choices: list[RankChoice], ranks: dict[int, int] | None = None) -> None:
        """Re-factor every module by SVD of its current product (optionally at a smaller rank per choice)."""
        by_module: dict[int, list[RankChoice]] = {}
        for c in choices:
            by_module.setdefault(id(c.module), []).append(c)
        for group in by_module.values():
            module = group[0].module
            want = {c.part: (ranks or {}).get(id(c), c.full) for c in group}
            if isinstance(module, LowRankAttention):
                module.resvd(want["qk"], want["vo"])
            else:
                module.resvd(want["svd"])
            for c in group:
                c.cap(want[c.part])

    # ------------------------------------------------------------------ search
    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        settings = self.distill_settings()
        teacher = self.distill.teacher if self.distill is not None else copy.deepcopy(model)
        teacher = teacher.eval().requires_grad_(False)
        dense_params = sum(p.numel() for p in model.parameters())
        choices = self.factorize(model)
        self.check_alignment(model, teacher)
        unique = {id(c.module): c.module for c in choices}.values()
        searched = {id(p) for m in unique for p in m.parameters()}
        fixed = float(sum(p.numel() for p in model.parameters() if id(p) not in searched))
        self.target_params = (1.0 - self.params_reduction) * dense_params
        floor = fixed + sum(float(c.params.min()) for c in choices)
        if floor > self.target_params:
            raise UserError(f"method.params_reduction={self.params_reduction} cannot be reached: the smallest "
                            f"candidate ranks keep {floor / dense_params:.1%} of the parameters",
                            "lower method.params_reduction or give smaller candidates (method.attn_ranks, "
                            "method.mlp_ranks, method.head_ranks)")
        prepare = lambda batch: datamodule.on_after_batch_transfer(batch, 0)  # noqa: E731
        loader = datamodule.train_dataloader()
        search_steps = max(1, math.ceil(self.search_fraction * len(loader)))
        train_steps = max(1, math.ceil(self.train_fraction * len(loader)))
        epochs = self.search_epochs
        aligns = alignment_weights(self.block_weight, epochs) if self.block_weight else [0.0] * epochs
        with Progress(transient=True) as progress:
            task = progress.add_task("COMCAT search", total=epochs * (search_steps + train_steps))
            for epoch in range(epochs):
                if epoch > 0:
                    self.resvd(choices)
                    tau = annealed_tau(self.tau_start, self.tau_end, (epoch - 1) / epochs)
                    self.search_pass(model, choices, fixed, loader, prepare, search_steps, tau, epoch,
                                     lambda: progress.advance(task))
                    chosen = {id(c): c.candidates[int(c.logits.argmax())] for c in choices}
                    self.resvd(choices, chosen)
                lr = self.weight_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
                self.train_pass(model, teacher, settings, loader, prepare, train_steps, lr, aligns[epoch],
                                lambda: progress.advance(task))
        for c in choices:
            self.ranks.setdefault(c.name, []).append(c.full)
        return model

    def check_alignment(self, model: nn.Module, teacher: nn.Module) -> None:
        if not self.block_weight:
            return
        theirs = list(transformer_blocks(teacher))
        if len(theirs) != len(self.block_names):
            raise UserError(f"COMCAT aligns blocks {self.align_blocks} with the teacher's, but the teacher has "
                            f"{len(theirs)} transformer blocks and the model {len(self.block_names)}",
                            "use a teacher of the model's depth (distill.teacher) or method.block_weight=0")

    def search_pass(self, model, choices, fixed, loader, prepare, steps, tau, epoch, advance) -> None:
        device = next(model.parameters()).device
        optimizer = torch.optim.AdamW([c.logits for c in choices], lr=self.arch_lr, weight_decay=self.arch_weight_decay)
        model.train().requires_grad_(False)
        for step, (x, y) in enumerate(itertools.islice(itertools.cycle(loader), steps)):
            for c in choices:
                _set_gate(c, c.gate(F.gumbel_softmax(c.logits, tau=tau)).to(device))
            x, y = prepare((x.to(device), y.to(device)))
            ce = F.cross_entropy(model(x), y)
            params = fixed + sum(c.expected_params() for c in choices)
            loss = budget_loss(ce, params, self.target_params, self.params_exponent)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % max(1, steps // 5) == 0 or step == steps - 1:
                self.history.append({"epoch": epoch, "step": step, "tau": round(tau, 4), "ce": round(ce.item(), 4),
                                     "expected_params": round(params.item())})
            advance()
        for c in choices:
            _set_gate(c, None)
        model.requires_grad_(True)

    def train_pass(self, model, teacher, settings, loader, prepare, steps, lr, align, advance) -> None:
        device = next(model.parameters()).device
        n_blocks = len(self.block_names)
        aligned = sorted({i % n_blocks for i in self.align_blocks}) if align > 0 and n_blocks else []
        names = [self.block_names[i] for i in aligned]
        teacher_names = [list(transformer_blocks(teacher))[i] for i in aligned]
        outputs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        hooks = [net.get_submodule(n).register_forward_hook(lambda _m, _a, out, key=key: outputs[key].append(out))
                 for key, net, group in (("student", model, names), ("teacher", teacher, teacher_names))
                 for n in group]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=self.weight_decay)
        model.train()
        try:
            for x, y in itertools.islice(itertools.cycle(loader), steps):
                x, y = prepare((x.to(device), y.to(device)))
                outputs["student"].clear(), outputs["teacher"].clear()
                with torch.no_grad():
                    teacher_logits = teacher(x)
                logits = model(x)
                loss = distillation_loss(logits, teacher_logits, y, **settings)
                if names:
                    loss = loss + block_alignment(outputs["student"], outputs["teacher"], align)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                advance()
        finally:
            for h in hooks:
                h.remove()

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage == "finetune" and self.finetune_block_weight > 0:
            return [FinetuneAlignment(self.align_blocks, self.finetune_block_weight)]
        return []

    def summary(self) -> dict[str, Any]:
        return {"params_reduction": self.params_reduction, "target_params": round(self.target_params),
                "search_epochs": self.search_epochs, "ranks": self.ranks, "search_history": self.history}

