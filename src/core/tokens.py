"""Token pruning of timm ViTs: blocks that keep only the most attended patch tokens, and attention masks built
from the attention of the tokens kept, as compression state.

A pruning block runs its attention on every token that reaches it, then keeps the ``ceil(keep x n)`` patch
tokens the class token attends to most (attention of the class-token row, averaged over heads; EViT, Liang et
al., ICLR 2022, and the token level of Tri-level E-ViT, Kong et al., AAAI 2023), optionally fuses the others
into one token, their sum weighted by that attention (``fuse``: EViT's inattentive-token fusion; the weights
are the dropped tokens' attention shares, not renormalised, as in EViT's code), and runs its MLP and
every later block on the shorter sequence. The class token always stays first; a fused token is an ordinary
token for later blocks.

A block may also *build an attention mask* (the attention level of Tri-level E-ViT, in the form of the authors'
code, ZLKong/Tri-Level-ViT ``models/models_attn_tok.py``: ``Block.forward``'s ``attn_prune`` branch and
``Attention.forward``): from its own attention probabilities, averaged over heads, restricted to the patch tokens
it keeps (patch-to-patch rows and columns), each kept patch query keeps its ``ceil(links x r)`` highest-scoring
patch keys; the class token's row and column stay whole. The mask is not used by the block that builds it but by
every block after it, up to and including the next building block, which builds the next mask from its own
(masked) attention. Blocks before the first building block run dense attention. The mask travels from block to
block within one forward in a :class:`LinkCarrier` the blocks of one network share; every block from the first
building block on is a :class:`TokenPruningBlock` (``token_masked``: it applies the carried mask).

Masked attention has two forms with the same output: under :func:`gathered_links` (entered by the trace that
counts MACs) a patch query computes its scores and weighted sum over the class key and its kept patch keys only,
so the trace does and counts the kept links alone; otherwise (training, validation) the dropped links get
``-inf`` before the softmax over every key (the fused kernel where the block needs no probabilities). The
hardware report prices both forms on every profile and takes the cheaper one, and measures the host latency in
the form the host profile chose.

``token_anneal`` (a plain attribute, 0 by default, not saved) moves every ratio of a block towards 1: ratio
``r`` runs as ``r + (1 - r) x token_anneal``; Tri-level E-ViT's keep-rate warm-up sets it during training.

A block is switched by a class swap (:class:`TokenPruningBlock` subclasses timm's ``Block``), so parameter,
mask and buffer names stay those of the unpruned network; four buffers per switched block (``token_keep``,
``token_fuse``, ``token_attention``, ``token_masked``) carry the schedule in the state dict, and
:func:`restore_token_pruning` (called by ``core.restore``) gives a freshly built network the schedule a checkpoint
records. A block that prunes tokens without building or applying a mask keeps timm's fused attention; the
class-token attention is then recomputed from the block's own ``qkv`` output (a hook reads it), at ``n x dim``
MACs per image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn


class LinkCarrier:
    """The attention mask the last mask-building block of a network chose, for the blocks after it within one
    forward: ``links`` (batch, patches, k), the patch keys each patch query keeps (positions among the patch
    tokens), or None (dense). A copied network gets its own, empty carrier."""

    def __init__(self) -> None:
        self.links: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> LinkCarrier:
        return LinkCarrier()


class TokenPruningBlock(Block):
    """timm ``Block`` that keeps the top ``token_keep`` fraction of patch tokens after its attention, builds an
    attention mask keeping ``token_attention`` of each kept patch query's patch links when that is below 1, and
    applies the mask of the block before it when ``token_masked`` (buffers: the schedule travels in the state
    dict and checkpoints)."""

    token_pruning_on: bool = True
    token_anneal: float = 0.0
    link_carrier: LinkCarrier

    def ratios(self) -> tuple[float, float]:
        """The token keep ratio and the link keep ratio this forward runs (``token_anneal`` applied)."""
        anneal = self.token_anneal
        keep, links = float(self.token_keep), float(self.token_attention)
        return keep + (1.0 - keep) * anneal, links + (1.0 - links) * anneal

    def builds_links(self) -> bool:
        return float(self.token_attention) < 1.0

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        prunes, masked = float(self.token_keep) < 1.0, bool(self.token_masked)
        if not self.token_pruning_on or not (prunes or masked or self.builds_links()):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("token pruning with an attention mask is not supported")
        keep, fraction = self.ratios()
        incoming = self.link_carrier.links if masked else None
        probs = scores = None
        if self.builds_links() or (prunes and incoming is not None):
            attended, probs = linked_attention(self.attn, self.norm1(x), incoming, need_probs=True)
            scores = probs[:, :, 0, 1:].mean(dim=1)
        elif incoming is not None or not prunes:
            attended, _ = linked_attention(self.attn, self.norm1(x), incoming, need_probs=False)
        else:
            captured: list[torch.Tensor] = []
            handle = self.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                attended = self.attn(self.norm1(x))
            finally:
                handle.remove()
            scores = class_attention(captured[0], self.attn.num_heads, self.attn.head_dim, self.attn.q_norm,
                                     self.attn.k_norm, self.attn.scale)
        x = x + self.drop_path1(self.ls1(attended))
        kept_idx = None
        if prunes and scores is not None:
            x, kept_idx = select_tokens(x, scores, keep, bool(self.token_fuse), with_index=True)
        if self.builds_links():
            self.link_carrier.links = choose_links(probs, kept_idx, fraction)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def prunes_tokens(self) -> bool:
        return float(self.token_keep) < 1.0 or float(self.token_attention) < 1.0

    def token_counts(self, tokens: int, carried: int | None) -> tuple[dict[str, int], int | None]:
        """Tokens (class token included) this block's attention and MLP run on for ``tokens`` reaching it, the
        keys each patch query attends to (``links``: the class key and the ``carried`` patch keys of the mask it
        applies, else every token), and the patch links the mask it passes on keeps per query."""
        links = carried + 1 if bool(self.token_masked) and carried is not None else tokens
        mlp = tokens
        if float(self.token_keep) < 1.0:
            patches = tokens - 1
            kept = kept_count(patches, float(self.token_keep))
            mlp = kept + 1 + (1 if bool(self.token_fuse) and kept < patches else 0)
        if self.builds_links():
            carried = kept_links(mlp - 1, float(self.token_attention))
        return {"attention": tokens, "links": links, "mlp": mlp}, carried


def kept_links(tokens: int, fraction: float) -> int:
    """Attention links a query keeps of ``tokens`` keys (at least one; the product is rounded to 4 decimals before
    the ceiling, so a fraction stored in float32, 0.3 as 0.30000001, still keeps ceil(0.3 x 10) = 3)."""
    return max(1, min(tokens, math.ceil(round(fraction * tokens, 4))))


_GATHERED_LINKS = False


@contextlib.contextmanager
def gathered_links(on: bool = True) -> Iterator[None]:
    """Masked attention in its gather form (a patch query reads only its kept keys) while inside: the form a
    trace counts, since it performs exactly the kept links. Outside, or with ``on=False``, the masked form runs
    (same output)."""
    global _GATHERED_LINKS
    previous, _GATHERED_LINKS = _GATHERED_LINKS, on
    try:
        yield
    finally:
        _GATHERED_LINKS = previous


def link_bias(links: torch.Tensor, tokens: int) -> torch.Tensor:
    """Additive attention bias (batch, tokens, tokens) of a link mask: 0 on the class token's row and column and on
    each patch query's kept patch keys, ``-inf`` elsewhere."""
    batch, patches, _ = links.shape
    patch = links.new_full((batch, patches, patches), float("-inf"), dtype=torch.float32)
    patch = patch.scatter(-1, links, 0.0)
    return F.pad(patch, (tokens - patches, 0, tokens - patches, 0), value=0.0)


def linked_attention(attn: nn.Module, x: torch.Tensor, links: torch.Tensor | None, need_probs: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention`` on ``x`` under the link mask ``links`` (None: dense), and with ``need_probs`` its
    attention probabilities (batch, heads, n, n; zero on dropped links). Under :func:`gathered_links` a patch query
    computes only its kept links; otherwise dropped links are masked out of a softmax over every key."""
    if links is None and not need_probs:
        return attn(x), None
    batch, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = None
    if links is not None and _GATHERED_LINKS:
        out, probs = gathered_attention(q * attn.scale, k, v, links, attn.attn_drop, need_probs)
    elif need_probs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (batch, heads, n, n)
        if links is not None:
            logits = logits + link_bias(links, n).to(logits.dtype)[:, None]
        probs = logits.softmax(dim=-1)
        out = attn.attn_drop(probs) @ v
    else:
        bias = link_bias(links, n).to(q.dtype)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, heads * head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, links: torch.Tensor, drop: nn.Module,
                       need_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention doing only the kept links (``q`` already scaled; shapes (batch, heads, n, head_dim)): the
    class query over every key, each patch query over the class key and its ``links`` patch keys."""
    batch, heads, n, head_dim = q.shape
    patches, count = links.shape[1], links.shape[2]
    first = n - patches  # the class token
    cls_w = (q[:, :, :first] @ k.transpose(-2, -1)).softmax(dim=-1)  # (batch, heads, 1, n)
    cls_out = drop(cls_w) @ v
    index = links[:, None, :, :, None].expand(batch, heads, patches, count, head_dim)
    kept_k = k[:, :, first:, None].transpose(2, 3).expand(-1, -1, patches, -1, -1).gather(3, index)
    kept_v = v[:, :, first:, None].transpose(2, 3).expand(-1, -1, patches, -1, -1).gather(3, index)
    q_patch = q[:, :, first:]
    to_cls = q_patch @ k[:, :, :first].transpose(-2, -1)  # (batch, heads, patches, 1)
    to_patches = (q_patch[..., None, :] @ kept_k.transpose(-2, -1)).squeeze(-2)  # (batch, heads, patches, count)
    weights = torch.cat([to_cls, to_patches], dim=-1).softmax(dim=-1)
    dropped = drop(weights)
    patch_out = dropped[..., :first] @ v[:, :, :first] + (dropped[..., None, first:] @ kept_v).squeeze(-2)
    out = torch.cat([cls_out, patch_out], dim=2)
    if not need_probs:
        return out, None
    patch_probs = weights.new_zeros(batch, heads, patches, patches).scatter(
        -1, links[:, None].expand(-1, heads, -1, -1), weights[..., first:])
    patch_rows = torch.cat([weights[..., :first], patch_probs], dim=-1)
    return out, torch.cat([cls_w, patch_rows], dim=2)


def choose_links(probs: torch.Tensor, kept_idx: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
    """The mask a building block passes on: for each patch token it keeps, the ``kept_links(r, fraction)`` kept
    patch tokens it attends to most (its attention probabilities averaged over heads), or None at ``fraction``
    >= 1. Positions are among the kept patch tokens, in the order the block leaves them."""
    if fraction >= 1.0:
        return None
    patch = probs[:, :, 1:, 1:].mean(dim=1)  # (batch, patches, patches)
    if kept_idx is not None:
        patches = patch.shape[1]
        kept = kept_idx.shape[1]
        patch = patch.gather(1, kept_idx[..., None].expand(-1, -1, patches))
        patch = patch.gather(2, kept_idx[:, None, :].expand(-1, kept, -1))
    return patch.topk(kept_links(patch.shape[-1], fraction), dim=-1, sorted=False).indices


def class_attention(qkv: torch.Tensor, heads: int, head_dim: int, q_norm: nn.Module, k_norm: nn.Module,
                    scale: float) -> torch.Tensor:
    """Attention of the class token (position 0) to every patch token, averaged over heads: (batch, n - 1)."""
    batch, n, _ = qkv.shape
    q, k, _v = qkv.reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = q_norm(q[:, :, :1]), k_norm(k)
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (batch, heads, 1, n)
    return attn[:, :, 0, 1:].mean(dim=1)


def kept_count(patch_tokens: int, keep: float) -> int:
    """Patch tokens a block with ``keep`` keeps of ``patch_tokens`` (at least one; rounded as in ``kept_links``)."""
    return max(1, min(patch_tokens, math.ceil(round(keep * patch_tokens, 4))))


def select_tokens(x: torch.Tensor, scores: torch.Tensor, keep: float, fuse: bool, with_index: bool = False
                  ) -> Any:
    """The class token, the ``kept_count`` patch tokens of highest ``scores`` (in their original order), and with
    ``fuse`` one token: the sum of the dropped ones weighted by their scores (EViT's reference code). With
    ``with_index`` also the kept patch positions (batch, kept), or None when every token is kept."""
    cls, patches = x[:, :1], x[:, 1:]
    n_keep = kept_count(patches.shape[1], keep)
    if n_keep == patches.shape[1]:
        return (x, None) if with_index else x
    order = scores.argsort(dim=1, descending=True)
    kept_idx = order[:, :n_keep].sort(dim=1).values
    kept = patches.gather(1, kept_idx[..., None].expand(-1, -1, patches.shape[-1]))
    parts = [cls, kept]
    if fuse:
        dropped_idx = order[:, n_keep:]
        weights = scores.gather(1, dropped_idx)  # not renormalised: EViT's fused token is this attention-weighted sum
        dropped = patches.gather(1, dropped_idx[..., None].expand(-1, -1, patches.shape[-1]))
        parts.append((weights[..., None] * dropped).sum(dim=1, keepdim=True))
    out = torch.cat(parts, dim=1)
    return (out, kept_idx) if with_index else out


def vit_blocks(model: nn.Module) -> nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(b, Block) for b in blocks):
        raise ValueError("token pruning needs a timm VisionTransformer (model.blocks of timm Blocks); "
                         f"{type(model).__name__} is not one")
    if getattr(model, "global_pool", "token") != "token" or getattr(model, "cls_token", None) is None:
        raise ValueError("token pruning keeps the class token first and classifies from it: the model needs a "
                         "class token and global_pool='token'")
    return blocks


def attach_token_pruning(model: nn.Module, keep: Mapping[int, float], fuse: bool = False,
                         attention: Mapping[int, float] | None = None) -> None:
    """Make block ``i`` keep ``keep[i]`` of the patch tokens reaching it, and block ``j`` build an attention mask
    keeping ``attention[j]`` of each kept patch query's patch links, applied by every block after ``j`` (fractions
    in (0, 1]; blocks absent from a mapping keep everything)."""
    blocks = vit_blocks(model)
    attention = {int(i): float(r) for i, r in (attention or {}).items()}
    builders = sorted(i for i, r in attention.items() if r < 1.0)
    if fuse and builders:
        raise ValueError("token fusion (EViT) with an attention mask is not supported: the mask keeps links among "
                         "the patch tokens and the class token only, and Tri-level E-ViT, whose attention level it "
                         "is, fuses no tokens")
    for index in sorted(set(keep) | set(attention)):
        for what, ratio in (("token keep ratio", keep.get(index, 1.0)),
                            ("attention keep ratio", attention.get(index, 1.0))):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"{what} {ratio} at block {index} is not in (0, 1]")
        if not 0 <= index < len(blocks):
            raise ValueError(f"token pruning at block {index}: the model has blocks 0..{len(blocks) - 1}")
    stale = sorted(i for i, r in keep.items() if r < 1.0 and builders and i > builders[0] and i not in builders)
    if stale:
        raise ValueError(f"block {stale[0]} drops tokens after block {builders[0]} built an attention mask, but builds "
                         "none itself: the mask would name tokens that are gone (give it an attention keep ratio, "
                         "as Tri-level E-ViT does at every token-pruning block)")
    switched = set(keep) | set(builders) | set(range(builders[0] + 1, len(blocks)) if builders else ())
    for index in sorted(switched):
        block = blocks[index]
        if type(block) not in (Block, TokenPruningBlock):
            raise ValueError(f"token pruning at block {index}: {type(block).__name__} is not timm's Block")
        make_pruning_block(block, float(keep.get(index, 1.0)), bool(fuse), float(attention.get(index, 1.0)),
                           masked=bool(builders) and index > builders[0])
    share_link_carrier(model)


def make_pruning_block(block: Block, keep: float, fuse: bool, attention: float = 1.0, masked: bool = False) -> None:
    if not isinstance(block, TokenPruningBlock):
        block.__class__ = TokenPruningBlock
        block.register_buffer("token_keep", torch.tensor(keep))
        block.register_buffer("token_fuse", torch.tensor(fuse))
        block.register_buffer("token_attention", torch.tensor(attention))
        block.register_buffer("token_masked", torch.tensor(masked))
    else:
        block.token_keep.fill_(keep)
        block.token_fuse.fill_(fuse)
        block.token_attention.fill_(attention)
        block.token_masked.fill_(masked)
    block.token_pruning_on = True


def share_link_carrier(model: nn.Module) -> None:
    """One :class:`LinkCarrier` for all the token-pruning blocks of ``model``."""
    carrier = LinkCarrier()
    for module in model.modules():
        if isinstance(module, TokenPruningBlock):
            module.link_carrier = carrier


def restore_token_pruning(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Give the blocks of a freshly built ``model`` the token pruning ``state`` (a state dict) records; returns
    how many blocks are switched."""
    count = 0
    for name, module in model.named_modules():
        key = f"{prefix}{name}.token_keep" if name else f"{prefix}token_keep"
        if key in state:
            if type(module) not in (Block, TokenPruningBlock):
                raise ValueError(f"the checkpoint prunes tokens at {name}, which is not a timm ViT block here")
            stem = key.removesuffix("token_keep")
            fuse = state.get(stem + "token_fuse", torch.tensor(False))
            links = state.get(stem + "token_attention", torch.tensor(1.0))
            if stem + "token_masked" not in state and float(links) < 1.0:
                raise ValueError(
                    f"the checkpoint's block {name} keeps {float(links):g} of each query's attention links in the "
                    "per-block form of compress-run before the attention level followed Tri-level E-ViT's code "
                    "(a mask built at the token-pruning blocks and applied by the blocks after them); that network "
                    "cannot be rebuilt now: retrain it with the current method=evit")
            masked = state.get(stem + "token_masked", torch.tensor(False))
            make_pruning_block(module, float(state[key]), bool(fuse), float(links), bool(masked))
            count += 1
    if count:
        share_link_carrier(model)
    return count


def token_schedule(model: nn.Module, patch_tokens: int) -> list[dict[str, int]]:
    """Tokens (class token included) each block's attention and MLP run on, and the keys each patch query attends
    to (``links``), for ``patch_tokens`` input patches (blocks that prune say how: ``token_counts``)."""
    rows, n, carried = [], patch_tokens + 1, None
    for block in vit_blocks(model):
        if isinstance(block, TokenPruningBlock) and block.token_pruning_on:
            row, carried = block.token_counts(n, carried)
        elif getattr(block, "token_pruning_on", False) and hasattr(block, "token_counts"):
            row = block.token_counts(n)
        else:
            row = {"attention": n, "links": n, "mlp": n}
        rows.append(row)
        n = row["mlp"]
    return rows


def has_token_pruning(model: nn.Module) -> bool:
    return any(getattr(m, "token_pruning_on", False) and m.prunes_tokens() for m in model.modules()
               if hasattr(m, "prunes_tokens"))


def has_sparse_attention(model: nn.Module) -> bool:
    """Whether a block of ``model`` builds an attention mask that later blocks apply (it has two forms to run)."""
    return any(isinstance(m, TokenPruningBlock) and m.token_pruning_on and m.builds_links()
               for m in model.modules())


def set_token_anneal(model: nn.Module, anneal: float) -> None:
    """Run every token-pruning block of ``model`` at ``ratio + (1 - ratio) x anneal`` (0: the configured ratios)."""
    for module in model.modules():
        if isinstance(module, TokenPruningBlock):
            module.token_anneal = anneal


@contextlib.contextmanager
def every_token_kept(model: nn.Module) -> Iterator[None]:
    """The same network with token pruning switched off (its dense view), restored on exit."""
    pruning = [m for m in model.modules() if hasattr(m, "token_pruning_on") and hasattr(m, "prunes_tokens")]
    states = [m.token_pruning_on for m in pruning]
    try:
        for block in pruning:
            block.token_pruning_on = False
        yield
    finally:
        for block, state in zip(pruning, states, strict=True):
            block.token_pruning_on = state
