"""Soft token pruning of timm ViTs (SPViT: Kong, Dong, Ma, …, Wang, "SPViT: Enabling Faster Vision Transformers
via Latency-aware Soft Token Pruning", ECCV 2022) as compression state.

A *token selector* sits before each selector block. It scores every patch token per head — a LayerNorm + linear +
GELU on the head's channels, half of whose features stay local and half are averaged over the tokens still kept
(global context), then an MLP to keep/drop logits — and weights the heads' log-probabilities by a per-token
head importance (a squeeze-and-excitation MLP on the heads' mean activations).

* Training (module in training mode): decisions are hard Gumbel-softmax samples (straight-through), multiplied by
  the previous selector's decisions, so a token once dropped stays dropped. No token leaves the sequence: every
  block from the first selector on runs *masked* attention, where a query attends only to kept tokens (a dropped
  query still attends to itself), normalised as ``(w + eps/N) / (sum w + eps)`` with ``w = exp(logit - max) x
  mask`` so the mask receives gradients. Each selector records the fraction of the patch tokens it keeps; its
  auxiliary loss term ``token_ratio`` is ``loss_weight x mean_batch (kept fraction - target)^2``
  (:mod:`compress_run.core.auxiliary`). A new selector starts at its target: its decision layers' biases make a
  token's keep probability start near ``relative_keep`` (the paper does not say how the selectors start; with the
  default initialisation they start at 1/2, so training drops far more tokens than inference does: 87.5% by the
  third selector against 65.7% at inference for the Fashion-MNIST ViT's targets. In its 3 fine-tuning epochs
  (1262 steps) the ratio term stayed at 0.12 from the first epoch to the last, and the network reached 70.4% top-1
  against 86.2% dense).
* Inference: the block really drops tokens. It keeps the ``kept_count(patches, relative_keep)`` patch tokens of
  highest keep probability (in their original order), ``relative_keep`` being its cumulative target over the
  previous selector's, and runs attention and MLP on the shorter sequence; the MAC counter and the simulator,
  which trace this forward, count and price what runs.
* Package tokens: each selector appends a new token at the end of the sequence, the sum of the patch tokens it
  drops weighted by their keep probabilities (not normalised), so after three selectors the sequence ends in three
  package tokens (PeiyanFlying/SPViT ``vit_l2_3keep_senet.py``: ``VisionTransformerDiffPruning.forward``,
  ``represent_token = sum(spatial_x * softmax_score * hard_drop_decision)`` and ``x = cat(x, represent_token)``).
  Package tokens are always kept; a later selector scores them with the patch tokens (they count in its global
  context, as in the authors' ``prev_decision``) and its decision for them is forced to keep.

Every block from the first selector on is switched by a class swap (:class:`SoftTokenBlock` subclasses timm's
``Block``), so the unpruned network's parameter names stay; selectors are children ``token_selector`` of their
blocks, their targets, relative keep, loss weight and Gumbel temperature buffers, and :func:`restore_soft_tokens`
(called by ``core.restore``) gives a freshly built network the selectors a checkpoint records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from compress_run.core.tokens import kept_count, vit_blocks

EPS = 1e-6


class TokenSelector(nn.Module):
    """SPViT's multi-head token selector: ``forward(patches, policy)`` -> keep/drop log-probabilities (batch, n, 2)
    and keep probabilities (batch, n) of each patch token (``policy``: the tokens still kept, 1/0, or None)."""

    def __init__(self, dim: int, heads: int, target: float, relative_keep: float, loss_weight: float,
                 temperature: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"a token selector splits the width {dim} into {heads} heads: not divisible")
        head_dim = dim // heads
        half, quarter, squeeze = max(1, head_dim // 2), max(1, head_dim // 4), max(1, heads // 2)
        self.heads = heads
        self.local = nn.ModuleList(nn.Sequential(nn.LayerNorm(head_dim), nn.Linear(head_dim, head_dim), nn.GELU())
                                   for _ in range(heads))
        self.decide = nn.ModuleList(nn.Sequential(nn.Linear(head_dim, half), nn.GELU(), nn.Linear(half, quarter),
                                                  nn.GELU(), nn.Linear(quarter, 2)) for _ in range(heads))
        self.head_weights = nn.Sequential(nn.Linear(heads, squeeze), nn.GELU(), nn.Linear(squeeze, heads),
                                          nn.Sigmoid())
        self.register_buffer("target", torch.tensor(float(target)))
        self.register_buffer("relative_keep", torch.tensor(float(relative_keep)))
        self.register_buffer("loss_weight", torch.tensor(float(loss_weight)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.pending: torch.Tensor | None = None
        self.start_at(relative_keep)

    def start_at(self, keep: float) -> None:
        """Set the decision layers' biases so that a token's keep probability starts near ``keep`` (the layers'
        random weights spread it around that): keep/drop logits ``(log keep, log(1 - keep))``."""
        keep = min(max(float(keep), 0.01), 0.99)
        with torch.no_grad():
            for head in self.decide:
                head[-1].bias.copy_(torch.tensor([math.log(keep), math.log(1.0 - keep)]))

    def forward(self, patches: torch.Tensor, policy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n, dim = patches.shape
        per_head = patches.reshape(batch, n, self.heads, dim // self.heads)
        weights = self.head_weights(per_head.mean(-1))  # (batch, n, heads)
        log_probs, probs = 0.0, 0.0
        for head in range(self.heads):
            features = self.local[head](per_head[:, :, head])
            split = features.shape[-1] // 2
            local, context = features[..., :split], features[..., split:]
            if policy is None:
                context = context.mean(1, keepdim=True)
            else:
                context = ((context * policy[..., None]).sum(1, keepdim=True)
                           / policy.sum(1)[:, None, None].clamp_min(EPS))
            logits = self.decide[head](torch.cat([local, context.expand(-1, n, -1)], dim=-1))
            weight = weights[..., head:head + 1]
            log_probs = log_probs + weight * logits.log_softmax(-1)
            probs = probs + weight * logits.softmax(-1)
        total = weights.sum(-1, keepdim=True)
        return log_probs / total, (probs / total)[..., 0]

    def record(self, kept_fraction: torch.Tensor) -> None:
        self.pending = self.loss_weight * (kept_fraction - self.target).pow(2).mean()

    def pop_auxiliary_losses(self) -> dict[str, torch.Tensor]:
        term, self.pending = self.pending, None
        return {} if term is None else {"token_ratio": term}


class TokenFlow:
    """What the soft blocks of one network pass on within a training forward: the patch tokens still kept
    (batch, patches), set by each selector. A copied network gets its own (empty) flow."""

    def __init__(self) -> None:
        self.policy: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> TokenFlow:
        return TokenFlow()


class SoftTokenBlock(Block):
    """timm ``Block`` from SPViT's first selector on: masked attention in training, real token dropping at
    inference where it has a ``token_selector``."""

    token_pruning_on: bool = True
    token_flow: TokenFlow
    starts_flow: bool
    packages_in: int  # package tokens at the end of the sequence reaching this block

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self.token_pruning_on:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("soft token pruning with an attention mask is not supported")
        selector = self.selector()
        if not self.training:
            return super().forward(self.drop_tokens(x, selector) if selector is not None else x)
        if selector is not None:
            x = self.soft_select(x, selector)
        policy = self.token_flow.policy
        packages = self.packages_in + (1 if selector is not None else 0)
        attended = policy_attention(self.attn, self.norm1(x), torch.cat(
            [policy.new_ones(policy.shape[0], 1), policy, policy.new_ones(policy.shape[0], packages)], dim=1))
        x = x + self.drop_path1(self.ls1(attended))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def selector(self) -> TokenSelector | None:
        return self._modules.get("token_selector")

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class token, patch tokens, and the package tokens the selectors before this block appended."""
        end = x.shape[1] - self.packages_in
        return x[:, :1], x[:, 1:end], x[:, end:]

    def soft_select(self, x: torch.Tensor, selector: TokenSelector) -> torch.Tensor:
        cls, patches, packages = self.split(x)
        previous = patches.new_ones(patches.shape[:2]) if self.starts_flow else self.token_flow.policy
        scored = torch.cat([patches, packages], dim=1)
        log_probs, keep_probs = selector(scored, torch.cat([previous, previous.new_ones(packages.shape[:2])], dim=1))
        count = patches.shape[1]  # the package tokens' decisions are forced to keep: only the patches' are drawn
        sample = F.gumbel_softmax(log_probs, tau=float(selector.temperature), hard=True)[:, :count, 0]
        keep = sample * previous
        merged = package_token(patches, keep_probs[:, :count] * (previous - keep))
        self.token_flow.policy = keep
        selector.record(keep.mean(1))
        return torch.cat([cls, patches, packages, merged], dim=1)

    def drop_tokens(self, x: torch.Tensor, selector: TokenSelector) -> torch.Tensor:
        cls, patches, packages = self.split(x)
        _, keep_probs = selector(torch.cat([patches, packages], dim=1), None)
        keep_probs = keep_probs[:, :patches.shape[1]]
        order = keep_probs.argsort(dim=1, descending=True)
        kept = kept_count(patches.shape[1], float(selector.relative_keep))
        kept_idx, dropped_idx = order[:, :kept].sort(dim=1).values, order[:, kept:]
        dim = patches.shape[-1]
        merged = package_token(patches.gather(1, dropped_idx[..., None].expand(-1, -1, dim)),
                               keep_probs.gather(1, dropped_idx))
        return torch.cat([cls, patches.gather(1, kept_idx[..., None].expand(-1, -1, dim)), packages, merged], dim=1)

    def prunes_tokens(self) -> bool:
        return self.selector() is not None

    def token_counts(self, tokens: int) -> dict[str, int]:
        selector = self.selector()
        if selector is not None:
            patches = tokens - 1 - self.packages_in
            tokens = 1 + kept_count(patches, float(selector.relative_keep)) + self.packages_in + 1
        return {"attention": tokens, "links": tokens, "mlp": tokens}


def is_selector_parameter(name: str) -> bool:
    """Whether the parameter named ``name`` (in the network) belongs to a token selector."""
    return "token_selector." in name


def package_token(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The ``weights``-weighted sum of ``tokens`` (batch, n, dim) as one token (SPViT's package token: the dropped
    tokens weighted by their keep probabilities, not normalised)."""
    return (weights[..., None] * tokens).sum(1, keepdim=True)


def policy_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` on ``x`` where each query attends only to the tokens ``policy`` (batch, n; 1 kept, 0
    dropped) keeps, and to itself; the mask multiplies the exponentials, so it receives gradients."""
    batch, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (batch, heads, n, n)
    keys = policy[:, None, None, :]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    mask = keys + (1.0 - keys) * eye
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask
    weights = (weights + EPS / n) / (weights.sum(dim=-1, keepdim=True) + EPS)
    out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(batch, n, heads * head_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attach_soft_token_pruning(model: nn.Module, targets: Mapping[int, float], loss_weight: float = 2.0,
                              temperature: float = 1.0) -> None:
    """Put a token selector before block ``i`` for each ``targets[i]`` (the cumulative fraction of the patch
    tokens kept from there on: non-increasing in block order, in (0, 1]); ``loss_weight`` is the weight of the
    ratio penalty summed over selectors (each selector carries its share)."""
    blocks = vit_blocks(model)
    if not targets:
        raise ValueError("soft token pruning needs at least one selector block")
    order = sorted(targets)
    if order[0] < 0 or order[-1] >= len(blocks):
        raise ValueError(f"token selector at block {order[0] if order[0] < 0 else order[-1]}: the model has "
                         f"blocks 0..{len(blocks) - 1}")
    ratios = [float(targets[i]) for i in order]
    if any(not 0.0 < r <= 1.0 for r in ratios) or any(b > a for a, b in zip([1.0, *ratios], ratios, strict=False)):
        raise ValueError(f"token keep targets {ratios} (blocks {order}) must be in (0, 1] and non-increasing: "
                         "each is the cumulative fraction of the patch tokens kept from its block on")
    flow, previous = TokenFlow(), 1.0
    for index in range(order[0], len(blocks)):
        block = blocks[index]
        if type(block) is not Block:
            raise ValueError(f"soft token pruning at block {index}: {type(block).__name__} is not timm's plain "
                             "Block (token pruning of another kind is already attached?)")
        block.__class__ = SoftTokenBlock
        block.token_flow, block.starts_flow, block.token_pruning_on = flow, index == order[0], True
        block.packages_in = sum(1 for selector_block in order if selector_block < index)
        if index in targets:
            parameter = block.norm1.weight
            block.token_selector = TokenSelector(
                parameter.shape[0], block.attn.num_heads, targets[index], targets[index] / previous,
                loss_weight / len(order), temperature).to(parameter.device, parameter.dtype)
            previous = float(targets[index])


def restore_soft_tokens(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Give a freshly built ``model`` the token selectors ``state`` (a state dict) records; returns how many."""
    suffix = ".token_selector.target"
    keys = [k for k in state if k.startswith(prefix) and k.endswith(suffix)]
    if not keys:
        return 0
    names = {module: name for name, module in model.named_modules()}
    index = {f"{prefix}{names[block]}": i for i, block in enumerate(vit_blocks(model))}
    targets, weight, temperature = {}, 0.0, 1.0
    for key in keys:
        stem = key.removesuffix(suffix)
        if stem not in index:
            raise ValueError(f"the checkpoint has a token selector at {stem}, which is not a ViT block here")
        targets[index[stem]] = float(state[key])
        weight += float(state[f"{stem}.token_selector.loss_weight"])
        temperature = float(state[f"{stem}.token_selector.temperature"])
    attach_soft_token_pruning(model, targets, weight, temperature)
    return len(targets)

