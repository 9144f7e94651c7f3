"""COMCAT — low-rank multi-head attention for ViTs (Xiao et al., ICML 2023).

Algorithm: each transformer block's attention is refactored per head through the products W_q·W_kᵀ and
W_v·W_o (:class:`~compress_run.kernels.lowrank_attention.LowRankAttention`: truncated SVDs of those
products give narrower heads computed with plain dense GEMMs), and the MLP's two linears become two-factor
SVD layers. Ranks are searched: every factorized module (attention Q·K, attention V·O, MLP fc1, MLP fc2)
has logits over candidate ranks; each search epoch (1) updates only the logits with Gumbel-softmax rank
mixing (a candidate = a prefix of the module's components, so mixing is a soft gate per component) on
CE·(params/target)^β when the expected parameter count is above the target, CE otherwise, τ annealed
exponentially from ``tau_start`` to ``tau_end`` over the whole search; (2) takes the argmax ranks;
(3) trains the weights of the network at those ranks with CE + distillation from the dense model +
block-output MSE. At the end every module is cut to its ranks (physically smaller); the finetune stage
then trains the small network.

Choices where the paper leaves details open (documented here, configurable):
* Full-rank start: attention at the head dimension, MLP linears at rank min(in, out) — output-equivalent
  to the dense model, so the search starts from the trained network exactly.
* Candidates: attention per-head ranks ``attn_ranks`` (default multiples of head_dim/8 up to head_dim);
  MLP ranks ``mlp_ranks`` (default multiples of dim/6 rounded down to 8, from 1× to 5×: 64…320 for
  dim 384, as the spec gives; set [128, 192, …, 512] for DeiT-B as published).
* Each epoch's search and weight passes cover ``search_fraction`` and ``train_fraction`` of the training
  data. Distillation: KL(student‖teacher) at temperature ``kd_temperature`` weighted ``kd_weight``;
  block-output MSE weighted ``block_weight``. Weights train with AdamW at ``weight_lr`` (DeiT's optimizer).
* The finetune stage is plain CE on labels (the pipeline's finetune); distillation happens in the search.

Config keys (conf/method/comcat.yaml):
* ``params_reduction`` (0.5): fraction of the dense model's parameters removed (target = rest).
* ``search_epochs`` (2); ``search_fraction`` (0.5); ``train_fraction`` (0.5).
* ``tau_start`` (5.0), ``tau_end`` (0.1); ``params_exponent`` (1.5): β; ``arch_lr`` (0.01),
  ``arch_weight_decay`` (5e-4); ``weight_lr`` (1e-4).
* ``kd_weight`` (1.0), ``kd_temperature`` (1.0), ``block_weight`` (1.0).
* ``attn_ranks`` ([]), ``mlp_ranks`` ([]): candidate lists; empty = the default rule above.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from compress_run.kernels.factorized import LowRankLinear
from compress_run.kernels.lowrank_attention import LowRankAttention, check_timm_attention
from compress_run.methods.base import Method, NotApplicable
from compress_run.pipeline.errors import UserError


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks with an ``attn`` (timm Attention: ``qkv`` + ``proj``) and an ``mlp`` (``fc1`` + ``fc2``)."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "attn") and hasattr(m.attn, "qkv") and hasattr(m, "mlp")
            and hasattr(m.mlp, "fc1") and hasattr(m.mlp, "fc2")}


class RankChoice:
    """One factorized module's rank search: logits over candidates, each candidate's parameter count."""

    def __init__(self, name: str, part: str, module: nn.Module, full: int, candidates: list[int],
                 params: Callable[[int], int]) -> None:
        self.name, self.part, self.module, self.full = name, part, module, full
        self.candidates = [r for r in candidates if 1 <= r <= full] or [full]
        self.params = torch.tensor([float(params(r)) for r in self.candidates])
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))
        self.chosen = self.candidates[-1]

    def gate(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-component gate: component c is kept by every candidate rank > c, weighted by its weight."""
        ranks = torch.tensor(self.candidates)
        keep = (torch.arange(self.full)[None, :] < ranks[:, None]).to(weights.dtype)  # candidates × full
        return weights @ keep

    def hard_gate(self) -> torch.Tensor:
        return (torch.arange(self.full) < self.chosen).float()

    def expected_params(self) -> torch.Tensor:
        return (F.softmax(self.logits, 0) * self.params).sum()


def _set_gate(choice: RankChoice, gate: torch.Tensor | None) -> None:
    module = choice.module
    if isinstance(module, LowRankAttention):
        setattr(module, "gate_qk" if choice.part == "qk" else "gate_vo", gate)
    else:
        module.gate = gate


def _linear_gate_hook(owner: LowRankLinear) -> Callable:
    """A pre-hook for ``owner.second`` that scales the rank components by ``owner.gate``."""
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        gate = getattr(owner, "gate", None)
        return None if gate is None else (args[0] * gate.to(args[0].dtype),)
    return hook


class COMCAT(Method):
    def __init__(self, params_reduction: float = 0.5, search_epochs: int = 2, search_fraction: float = 0.5,
                 train_fraction: float = 0.5, tau_start: float = 5.0, tau_end: float = 0.1,
                 params_exponent: float = 1.5, arch_lr: float = 0.01, arch_weight_decay: float = 5e-4,
                 weight_lr: float = 1e-4, kd_weight: float = 1.0, kd_temperature: float = 1.0,
                 block_weight: float = 1.0, attn_ranks: Iterable[int] = (), mlp_ranks: Iterable[int] = ()) -> None:
        self.params_reduction, self.search_epochs = float(params_reduction), int(search_epochs)
        self.search_fraction, self.train_fraction = float(search_fraction), float(train_fraction)
        self.tau_start, self.tau_end, self.params_exponent = float(tau_start), float(tau_end), float(params_exponent)
        self.arch_lr, self.arch_weight_decay = float(arch_lr), float(arch_weight_decay)
        self.weight_lr = float(weight_lr)
        self.kd_weight, self.kd_temperature, self.block_weight = float(kd_weight), float(kd_temperature), \
            float(block_weight)
        self.attn_ranks, self.mlp_ranks = [int(r) for r in attn_ranks], [int(r) for r in mlp_ranks]
        self.ranks: dict[str, list[int]] = {}
        self.history: list[dict[str, float]] = []
        self.target_params = 0.0
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.block_names: list[str] = []

    def check_applicable(self, model: nn.Module) -> None:
        blocks = transformer_blocks(model)
        if not blocks:
            raise NotApplicable("no transformer block with attn (qkv, proj) and mlp (fc1, fc2): COMCAT is for ViTs")
        try:
            for block in blocks.values():
                check_timm_attention(block.attn)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from exc

    # ------------------------------------------------------------------ factorization and candidates
    def default_mlp_ranks(self, dim: int) -> list[int]:
        step = max(8, dim // 6 // 8 * 8)
        return [step * k for k in range(1, 6)]

    def factorize(self, model: nn.Module) -> list[RankChoice]:
        """Full-rank factorized modules in place of every block's attention and MLP linears."""
        choices: list[RankChoice] = []
        self.block_names = list(transformer_blocks(model))
        for name, block in transformer_blocks(model).items():
            attn = block.attn
            heads, d, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
            new = LowRankAttention.from_attention(attn, d, d)
            block.attn = new
            attn_cands = self.attn_ranks or ([d // 8 * k for k in range(1, 9)] if d >= 8 else [d])
            choices.append(RankChoice(f"{name}.attn", "qk", new, d, attn_cands,
                                      lambda r, h=heads, c=dim: 2 * (c * h * r + h * r)))
            choices.append(RankChoice(f"{name}.attn", "vo", new, d, attn_cands,
                                      lambda r, h=heads, c=dim: 2 * c * h * r + c))
            for fc in ("fc1", "fc2"):
                linear = getattr(block.mlp, fc)
                full = min(linear.in_features, linear.out_features)
                low = LowRankLinear.from_linear(linear, full)
                self.hooks.append(low.second.register_forward_pre_hook(_linear_gate_hook(low)))
                setattr(block.mlp, fc, low)
                choices.append(RankChoice(f"{name}.mlp.{fc}", "svd", low, full, self.mlp_ranks or
                                          self.default_mlp_ranks(dim),
                                          lambda r, i=linear.in_features, o=linear.out_features: (i + o) * r + o))
        return choices

    @staticmethod
    def truncate(choice: RankChoice) -> None:
        """Cut ``choice.module`` to its chosen rank (the kept components are a prefix)."""
        r, module = choice.chosen, choice.module
        with torch.no_grad():
            if isinstance(module, LowRankAttention):
                heads = module.num_heads
                if choice.part == "qk":
                    full = module.qk_rank
                    rows = torch.cat([torch.arange(h * full, h * full + r) for h in range(heads)])
                    for lin in (module.q, module.k):
                        _shrink_linear(lin, rows=rows)
                    module.qk_rank = module._args["qk_rank"] = r
                else:
                    full = module.vo_rank
                    rows = torch.cat([torch.arange(h * full, h * full + r) for h in range(heads)])
                    _shrink_linear(module.v, rows=rows)
                    _shrink_linear(module.o, cols=rows)
                    module.vo_rank = module._args["vo_rank"] = r
            else:
                _shrink_linear(module.first, rows=torch.arange(r))
                _shrink_linear(module.second, cols=torch.arange(r))
                module._args["rank"] = r

    # ------------------------------------------------------------------ search
    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        dense_params = sum(p.numel() for p in model.parameters())
        choices = self.factorize(model)
        unique = {id(c.module): c.module for c in choices}.values()
        searched = {id(p) for m in unique for p in m.parameters()}
        fixed = float(sum(p.numel() for p in model.parameters() if id(p) not in searched))
        self.target_params = (1.0 - self.params_reduction) * dense_params
        floor = fixed + sum(float(c.params.min()) for c in choices)
        if floor > self.target_params:
            raise UserError(f"method.params_reduction={self.params_reduction} cannot be reached: the smallest "
                            f"candidate ranks keep {floor / dense_params:.1%} of the parameters",
                            "lower method.params_reduction or give smaller candidates (method.attn_ranks, "
                            "method.mlp_ranks)")
        prepare = lambda batch: datamodule.on_after_batch_transfer(batch, 0)  # noqa: E731
        loader = datamodule.train_dataloader()
        search_steps = max(1, math.ceil(self.search_fraction * len(loader)))
        train_steps = max(1, math.ceil(self.train_fraction * len(loader)))
        total = self.search_epochs * search_steps
        with Progress(transient=True) as progress:
            task = progress.add_task("COMCAT search", total=self.search_epochs * (search_steps + train_steps))
            for epoch in range(self.search_epochs):
                self.search_pass(model, choices, fixed, loader, prepare, epoch * search_steps, search_steps, total,
                                 lambda: progress.advance(task))
                for c in choices:
                    c.chosen = c.candidates[int(c.logits.argmax())]
                    _set_gate(c, c.hard_gate().to(next(model.parameters()).device))
                self.train_pass(model, teacher, loader, prepare, train_steps, lambda: progress.advance(task))
        for c in choices:
            _set_gate(c, None)
            self.truncate(c)
            self.ranks.setdefault(c.name, []).append(c.chosen)
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        return model

    def search_pass(self, model, choices, fixed, loader, prepare, start, steps, total, advance) -> None:
        device = next(model.parameters()).device
        optimizer = torch.optim.AdamW([c.logits for c in choices], lr=self.arch_lr, weight_decay=self.arch_weight_decay)
        model.train().requires_grad_(False)
        for step, (x, y) in enumerate(itertools.islice(itertools.cycle(loader), steps)):
            tau = self.tau_start * (self.tau_end / self.tau_start) ** ((start + step) / max(1, total - 1))
            for c in choices:
                _set_gate(c, c.gate(F.gumbel_softmax(c.logits, tau=tau)).to(device))
            x, y = prepare((x.to(device), y.to(device)))
            ce = F.cross_entropy(model(x), y)
            params = fixed + sum(c.expected_params() for c in choices)
            ratio = params / self.target_params
            loss = ce * ratio**self.params_exponent if ratio.item() > 1 else ce
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % max(1, steps // 5) == 0 or step == steps - 1:
                self.history.append({"step": start + step, "tau": round(tau, 4), "ce": round(ce.item(), 4),
                                     "expected_params": round(params.item())})
            advance()
        model.requires_grad_(True)

    def train_pass(self, model, teacher, loader, prepare, steps, advance) -> None:
        device = next(model.parameters()).device
        blocks = [model.get_submodule(n) for n in self.block_names]
        teacher_blocks = [teacher.get_submodule(n) for n in self.block_names]
        outputs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        hooks = [b.register_forward_hook(lambda _m, _a, out, key=key: outputs[key].append(out))
                 for key, group in (("student", blocks), ("teacher", teacher_blocks)) for b in group]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.weight_lr,
                                      weight_decay=0.05)
        model.train()
        t = self.kd_temperature
        try:
            for x, y in itertools.islice(itertools.cycle(loader), steps):
                x, y = prepare((x.to(device), y.to(device)))
                outputs["student"].clear(), outputs["teacher"].clear()
                with torch.no_grad():
                    teacher_logits = teacher(x)
                logits = model(x)
                kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                              log_target=True, reduction="batchmean") * t * t
                block = sum(F.mse_loss(s, te) for s, te in zip(outputs["student"], outputs["teacher"], strict=True))
                loss = F.cross_entropy(logits, y) + self.kd_weight * kd + self.block_weight * block / len(blocks)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                advance()
        finally:
            for h in hooks:
                h.remove()

    def summary(self) -> dict[str, Any]:
        return {"params_reduction": self.params_reduction, "target_params": round(self.target_params),
                "ranks": self.ranks, "search_history": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "history": self.history, "target_params": self.target_params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = dict(state.get("ranks", self.ranks))
        self.history = list(state.get("history", self.history))
        self.target_params = float(state.get("target_params", self.target_params))


def _shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (outputs) and/or ``cols`` (inputs) of ``linear``, in place."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[rows.to(weight.device)].clone())
        linear.out_features = len(rows)
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
        linear.in_features = len(cols)
    linear.weight = nn.Parameter(weight.clone())
