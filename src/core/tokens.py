"""Token pruning of timm ViTs: blocks that keep only the most attended patch tokens, as compression state.

A pruning block runs its attention on every token that reaches it, then keeps the ``ceil(keep x n)`` patch
tokens the class token attends to most (attention of the class-token row, averaged over heads; EViT, Liang et
al., ICLR 2022, and the token level of Tri-level E-ViT, Kong et al., AAAI 2023), optionally fuses the others
into one token, their sum weighted by that attention (``fuse``: EViT's inattentive-token fusion; the weights
are the dropped tokens' attention shares, not renormalised, as in EViT's code), and runs its MLP and
every later block on the shorter sequence. The class token always stays first; a fused token is an ordinary
token for later blocks. A block may also sparsify its attention (the attention level of Tri-level E-ViT): each
query keeps its ``ceil(links x n)`` highest-scoring keys and the softmax runs over those. The forward really drops
tokens, so the MAC counter and the latency simulator, which trace the forward, count and price exactly the
schedule that runs; :func:`every_token_kept` gives the same network's unpruned forward (the dense view).
Sparse attention has two forms with the same output: under :func:`gathered_links` (entered by the trace that
counts MACs) the weighted sum gathers only the kept values, so the trace does and counts the kept links alone;
otherwise (training, validation) it is a softmax with the other links masked out, multiplied with all values. The
hardware report prices both forms on every profile and takes the cheaper one, and measures the host latency in
the form the host profile chose. The masked form is the faster one on CPU: for the small Fashion-MNIST ViT
(batch 128, 50 tokens, 3 heads of 32, 30% of the links) forward + backward took 79 ms against 351 ms (the
gather's backward scatters into an n-fold expanded value gradient), inference forward at batch 1000 303 ms
against 767 ms, and timm's fused dense attention 53 and 151 ms, one thread each.

A block is switched by a class swap (:class:`TokenPruningBlock` subclasses timm's ``Block``), so parameter,
mask and buffer names stay those of the unpruned network; three buffers per pruning block (``token_keep``,
``token_fuse``, ``token_attention``) carry the schedule in the state dict, and :func:`restore_token_pruning`
(called by ``core.restore``) gives a freshly built network the schedule a checkpoint records. Without sparse
attention the class-token attention is recomputed from the block's own ``qkv`` output (a hook reads it), at
``n x dim`` MACs per image, so the attention itself stays timm's (fused) kernel; with it, the attention is
computed explicitly (scores for every pair, values for the kept links only).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from timm.models.vision_transformer import Block
from torch import nn


class TokenPruningBlock(Block):
    """timm ``Block`` that keeps the top ``token_keep`` fraction of patch tokens after its attention and lets each
    query keep only its top ``token_attention`` fraction of attention links (buffers ``token_keep``,
    ``token_fuse``, ``token_attention``: the schedule travels in the state dict and checkpoints)."""

    token_pruning_on: bool = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        keep, links = float(self.token_keep), float(self.token_attention)
        if not self.token_pruning_on or (keep >= 1.0 and links >= 1.0):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("token pruning with an attention mask is not supported")
        if links < 1.0:
            attended, scores = sparse_attention(self.attn, self.norm1(x), links)
            x = x + self.drop_path1(self.ls1(attended))
        else:
            captured: list[torch.Tensor] = []
            handle = self.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            finally:
                handle.remove()
            scores = class_attention(captured[0], self.attn.num_heads, self.attn.head_dim, self.attn.q_norm,
                                     self.attn.k_norm, self.attn.scale)
        if keep < 1.0:
            x = select_tokens(x, scores, keep, bool(self.token_fuse))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def prunes_tokens(self) -> bool:
        return float(self.token_keep) < 1.0 or float(self.token_attention) < 1.0

    def token_counts(self, tokens: int) -> dict[str, int]:
        """Tokens (class token included) this block's attention and MLP run on for ``tokens`` reaching it, and the
        links each query keeps."""
        links, mlp = tokens, tokens
        if float(self.token_attention) < 1.0:
            links = kept_links(tokens, float(self.token_attention))
        if float(self.token_keep) < 1.0:
            patches = tokens - 1
            kept = kept_count(patches, float(self.token_keep))
            mlp = kept + 1 + (1 if bool(self.token_fuse) and kept < patches else 0)
        return {"attention": tokens, "links": links, "mlp": mlp}


def kept_links(tokens: int, fraction: float) -> int:
    """Attention links a query keeps of ``tokens`` keys (at least one; the product is rounded to 4 decimals before
    the ceiling, so a fraction stored in float32, 0.3 as 0.30000001, still keeps ceil(0.3 x 10) = 3)."""
    return max(1, min(tokens, math.ceil(round(fraction * tokens, 4))))


_GATHERED_LINKS = False


@contextlib.contextmanager
def gathered_links(on: bool = True) -> Iterator[None]:
    """Sparse attention in its gather form (the weighted sum reads only the kept values) while inside: the form a
    trace counts, since it performs exactly the kept links. Outside, or with ``on=False``, the masked form runs
    (same output; on CPU the faster one)."""
    global _GATHERED_LINKS
    previous, _GATHERED_LINKS = _GATHERED_LINKS, on
    try:
        yield
    finally:
        _GATHERED_LINKS = previous


def sparse_attention(attn: nn.Module, x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` on ``x`` where each query attends only to its ``kept_links`` highest-scoring keys (softmax
    over those; the attention level of Tri-level E-ViT), and the class token's full attention to the patch tokens,
    averaged over heads (for token selection). Under :func:`gathered_links` the weighted sum gathers only the kept
    values (``kept_links`` multiply-adds per query and channel, which a trace counts); otherwise the other links
    are masked out of the softmax and the product runs over every value (the same output, faster)."""
    batch, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (batch, heads, n, n)
    class_scores = logits[:, :, 0].softmax(dim=-1)[:, :, 1:].mean(dim=1)
    top, index = logits.topk(kept_links(n, fraction), dim=-1, sorted=False)  # (batch, heads, n, links)
    if _GATHERED_LINKS:
        weights = attn.attn_drop(top.softmax(dim=-1))
        values = v[:, :, None].expand(-1, -1, n, -1, -1).gather(3, index[..., None].expand(-1, -1, -1, -1, head_dim))
        out = (weights[..., None, :] @ values).squeeze(-2)  # (batch, heads, n, head_dim)
    else:
        dropped = torch.full_like(logits, float("-inf")).scatter(-1, index, 0.0)
        out = attn.attn_drop((logits + dropped).softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, heads * head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), class_scores


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


def select_tokens(x: torch.Tensor, scores: torch.Tensor, keep: float, fuse: bool) -> torch.Tensor:
    """The class token, the ``kept_count`` patch tokens of highest ``scores`` (in their original order), and with
    ``fuse`` one token: the sum of the dropped ones weighted by their scores (EViT's reference code)."""
    cls, patches = x[:, :1], x[:, 1:]
    n_keep = kept_count(patches.shape[1], keep)
    if n_keep == patches.shape[1]:
        return x
    order = scores.argsort(dim=1, descending=True)
    kept_idx = order[:, :n_keep].sort(dim=1).values
    kept = patches.gather(1, kept_idx[..., None].expand(-1, -1, patches.shape[-1]))
    parts = [cls, kept]
    if fuse:
        dropped_idx = order[:, n_keep:]
        weights = scores.gather(1, dropped_idx)  # not renormalised: EViT's fused token is this attention-weighted sum
        dropped = patches.gather(1, dropped_idx[..., None].expand(-1, -1, patches.shape[-1]))
        parts.append((weights[..., None] * dropped).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


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
    """Make block ``i`` keep ``keep[i]`` of the patch tokens reaching it, and each query of block ``j`` keep
    ``attention[j]`` of its attention links (fractions in (0, 1]; blocks absent from a mapping keep everything)."""
    blocks = vit_blocks(model)
    attention = dict(attention or {})
    for index in sorted(set(keep) | set(attention)):
        for what, ratio in (("token keep ratio", keep.get(index, 1.0)),
                            ("attention keep ratio", attention.get(index, 1.0))):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"{what} {ratio} at block {index} is not in (0, 1]")
        if not 0 <= index < len(blocks):
            raise ValueError(f"token pruning at block {index}: the model has blocks 0..{len(blocks) - 1}")
        block = blocks[index]
        if type(block) not in (Block, TokenPruningBlock):
            raise ValueError(f"token pruning at block {index}: {type(block).__name__} is not timm's Block")
        make_pruning_block(block, float(keep.get(index, 1.0)), bool(fuse), float(attention.get(index, 1.0)))


def make_pruning_block(block: Block, keep: float, fuse: bool, attention: float = 1.0) -> None:
    if not isinstance(block, TokenPruningBlock):
        block.__class__ = TokenPruningBlock
        block.register_buffer("token_keep", torch.tensor(keep))
        block.register_buffer("token_fuse", torch.tensor(fuse))
        block.register_buffer("token_attention", torch.tensor(attention))
    else:
        block.token_keep.fill_(keep)
        block.token_fuse.fill_(fuse)
        block.token_attention.fill_(attention)
    block.token_pruning_on = True


def restore_token_pruning(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Give the blocks of a freshly built ``model`` the token pruning ``state`` (a state dict) records; returns
    how many blocks prune."""
    count = 0
    for name, module in model.named_modules():
        key = f"{prefix}{name}.token_keep" if name else f"{prefix}token_keep"
        if key in state:
            if type(module) not in (Block, TokenPruningBlock):
                raise ValueError(f"the checkpoint prunes tokens at {name}, which is not a timm ViT block here")
            stem = key.removesuffix("token_keep")
            fuse = state.get(stem + "token_fuse", torch.tensor(False))
            links = state.get(stem + "token_attention", torch.tensor(1.0))
            make_pruning_block(module, float(state[key]), bool(fuse), float(links))
            count += 1
    return count


def token_schedule(model: nn.Module, patch_tokens: int) -> list[dict[str, int]]:
    """Tokens (class token included) each block's attention and MLP run on, and the attention links each query
    keeps (``links``), for ``patch_tokens`` input patches (blocks that prune say how: ``token_counts``)."""
    rows, n = [], patch_tokens + 1
    for block in vit_blocks(model):
        if getattr(block, "token_pruning_on", False) and hasattr(block, "token_counts"):
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
    """Whether a block of ``model`` keeps only part of each query's attention links (it has two forms to run)."""
    return any(isinstance(m, TokenPruningBlock) and m.token_pruning_on and float(m.token_attention) < 1.0
               for m in model.modules())


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
