"""Low-rank multi-head attention (COMCAT's factorization), shared by any ViT low-rank method.

Per head h, attention only uses the products M_h = scale·W̃_qᵀW̃_k (the logits' bilinear form; W̃ = [W | b],
the bias folded in as a constant input 1) and N_h = W_vᵀ·P_h (value projection times the head's slice of
the output projection). Their SVDs M_h = A_h·B_hᵀ and N_h = E_h·F_h give an attention block of the same
form with narrower heads: q'/k' = Linear(C → H·r_qk) with bias, v' = Linear(C → H·r_vo) without bias
(b_v·P_h is constant because attention rows sum to 1, so it joins the output bias), o' = Linear(H·r_vo → C),
all plain dense GEMMs, softmax scale 1 (folded into M_h). At full rank it reproduces the timm block's output;
truncating the SVDs keeps the leading components of each head. ``gate_qk``/``gate_vo`` (optional, one
weight per component, not saved) scale components during a rank search: a 0/1 prefix gate equals the
truncated block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.factorized import FACTORIZED, Factorized


def _head_svds(matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [torch.linalg.svd(m, full_matrices=False) for m in matrices]


def attention_products(attn: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(M_h per head, N_h per head, output bias with b_v·P_h folded in) of a timm ``Attention``, float64."""
    heads, d = attn.num_heads, attn.head_dim
    c = attn.qkv.in_features
    weight = attn.qkv.weight.detach().double()
    bias = attn.qkv.bias.detach().double() if attn.qkv.bias is not None else weight.new_zeros(weight.shape[0])
    proj_w = attn.proj.weight.detach().double()
    out_bias = attn.proj.bias.detach().double().clone() if attn.proj.bias is not None else proj_w.new_zeros(c)
    m, n = [], []
    inner = heads * d
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        wq = torch.cat([weight[rows], bias[rows, None]], 1)                      # d × (C+1)
        wk = torch.cat([weight[inner:][rows], bias[inner:][rows, None]], 1)
        m.append(attn.scale * wq.T @ wk)                                         # (C+1) × (C+1)
        wv, bv, p_h = weight[2 * inner:][rows], bias[2 * inner:][rows], proj_w[:, rows]
        n.append(wv.T @ p_h.T)                                                    # C × C
        out_bias += p_h @ bv
    return m, n, out_bias


def check_timm_attention(attn: nn.Module) -> None:
    """Raise ValueError if ``attn`` has parts the factorization does not carry (qk-norm, gates, ...)."""
    problems = [name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, name, nn.Identity()),
                                                                               nn.Identity)]
    if getattr(attn, "gate", None) is not None:
        problems.append("gate")
    if attn.num_heads * attn.head_dim != attn.proj.in_features:
        problems.append("attn_dim")
    if problems:
        raise ValueError(f"attention with {', '.join(problems)} is not supported by the low-rank factorization")


class LowRankAttention(Factorized):
    """``compression_info`` density: MACs / those of the original block at the token count last seen."""

    form = "attention"

    def __init__(self, dim: int, num_heads: int, qk_rank: int, vo_rank: int, head_dim: int = 64) -> None:
        super().__init__()
        self._args = {"dim": dim, "num_heads": num_heads, "qk_rank": qk_rank, "vo_rank": vo_rank,
                      "head_dim": head_dim}
        self.num_heads, self.qk_rank, self.vo_rank = num_heads, qk_rank, vo_rank
        self.tokens = 1
        self.q = nn.Linear(dim, num_heads * qk_rank)
        self.k = nn.Linear(dim, num_heads * qk_rank)
        self.v = nn.Linear(dim, num_heads * vo_rank, bias=False)
        self.o = nn.Linear(num_heads * vo_rank, dim)
        self.gate_qk: torch.Tensor | None = None
        self.gate_vo: torch.Tensor | None = None

    @classmethod
    def from_attention(cls, attn: nn.Module, qk_rank: int, vo_rank: int) -> LowRankAttention:
        check_timm_attention(attn)
        heads, c = attn.num_heads, attn.qkv.in_features
        m, n, out_bias = attention_products(attn)
        new = cls(c, heads, qk_rank, vo_rank, attn.head_dim)
        q_w, q_b, k_w, k_b, v_w, o_w = [], [], [], [], [], []
        for (u, s, vh), (u2, s2, vh2) in zip(_head_svds(m), _head_svds(n), strict=True):
            root = s[:qk_rank].sqrt()
            a, b = u[:, :qk_rank] * root, vh[:qk_rank].T * root                  # (C+1) × r each
            q_w.append(a[:c].T), q_b.append(a[c]), k_w.append(b[:c].T), k_b.append(b[c])
            root2 = s2[:vo_rank].sqrt()
            v_w.append((u2[:, :vo_rank] * root2).T)                              # r × C
            o_w.append((root2[:, None] * vh2[:vo_rank]).T)                       # C × r
        with torch.no_grad():
            new.q.weight.copy_(torch.cat(q_w)), new.q.bias.copy_(torch.cat(q_b))
            new.k.weight.copy_(torch.cat(k_w)), new.k.bias.copy_(torch.cat(k_b))
            new.v.weight.copy_(torch.cat(v_w)), new.o.weight.copy_(torch.cat(o_w, 1)), new.o.bias.copy_(out_bias)
        return new.to(attn.qkv.weight.device)

    def ranks(self) -> list[int]:
        return [self.qk_rank, self.vo_rank]

    @torch.no_grad()
    def resvd(self, qk_rank: int, vo_rank: int) -> None:
        """Re-factor every head from the products of its current factors by SVD, keeping ``qk_rank`` and
        ``vo_rank`` components (at most the current ranks): afterwards the components are orthogonal and
        ordered by singular value, so a prefix of them is the best truncation (COMCAT between rank changes)."""
        heads, c = self.num_heads, self.q.in_features
        qk_rank, vo_rank = min(qk_rank, self.qk_rank), min(vo_rank, self.vo_rank)
        q = torch.cat([self.q.weight, self.q.bias[:, None]], 1).double()     # H·r × (C+1)
        k = torch.cat([self.k.weight, self.k.bias[:, None]], 1).double()
        v, o = self.v.weight.double(), self.o.weight.double()                # H·r × C, C × H·r
        q_w, q_b, k_w, k_b, v_w, o_w = [], [], [], [], [], []
        for h in range(heads):
            rows = slice(h * self.qk_rank, (h + 1) * self.qk_rank)
            u, s, vh = torch.linalg.svd(q[rows].T @ k[rows], full_matrices=False)
            root = s[:qk_rank].sqrt()
            a, b = u[:, :qk_rank] * root, vh[:qk_rank].T * root
            q_w.append(a[:c].T), q_b.append(a[c]), k_w.append(b[:c].T), k_b.append(b[c])
            rows = slice(h * self.vo_rank, (h + 1) * self.vo_rank)
            u2, s2, vh2 = torch.linalg.svd(v[rows].T @ o[:, rows].T, full_matrices=False)
            root2 = s2[:vo_rank].sqrt()
            v_w.append((u2[:, :vo_rank] * root2).T), o_w.append((root2[:, None] * vh2[:vo_rank]).T)
        device, dtype = self.q.weight.device, self.q.weight.dtype
        out_bias = self.o.bias.detach().clone()
        self.qk_rank, self.vo_rank = self._args["qk_rank"], self._args["vo_rank"] = qk_rank, vo_rank
        self.q, self.k = nn.Linear(c, heads * qk_rank), nn.Linear(c, heads * qk_rank)
        self.v, self.o = nn.Linear(c, heads * vo_rank, bias=False), nn.Linear(heads * vo_rank, c)
        for layer, weight in ((self.q, torch.cat(q_w)), (self.k, torch.cat(k_w)), (self.v, torch.cat(v_w)),
                              (self.o, torch.cat(o_w, 1))):
            layer.to(device=device, dtype=dtype).weight.copy_(weight)
        self.q.bias.copy_(torch.cat(q_b)), self.k.bias.copy_(torch.cat(k_b)), self.o.bias.copy_(out_bias)

    def mac_fraction(self) -> float:
        a, n = self._args, self.tokens
        inner, heads = a["num_heads"] * a["head_dim"], a["num_heads"]
        original = 4 * a["dim"] * inner + 2 * n * inner
        ours = (2 * a["dim"] * heads * self.qk_rank + 2 * a["dim"] * heads * self.vo_rank
                + n * heads * (self.qk_rank + self.vo_rank))
        return ours / original

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        self.tokens = tokens
        q = self.q(x).view(batch, tokens, self.num_heads, self.qk_rank).transpose(1, 2)
        k = self.k(x).view(batch, tokens, self.num_heads, self.qk_rank).transpose(1, 2)
        v = self.v(x).view(batch, tokens, self.num_heads, self.vo_rank).transpose(1, 2)
        if self.gate_qk is not None:
            q = q * self.gate_qk
        if self.gate_vo is not None:
            v = v * self.gate_vo
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.vo_rank))


FACTORIZED[LowRankAttention.__name__] = LowRankAttention
