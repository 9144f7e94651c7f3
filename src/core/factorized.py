"""Factorized (low-rank) layers, shared by every low-rank method (svd, trp, ELRT, HALOC).

* :class:`LowRankLinear` — W ≈ B·A: ``first`` Linear(in → r, no bias), ``second`` Linear(r → out, bias).
* :class:`LowRankConv2d` — ``form="channel"``: k×k conv (C_in → r, the original stride/padding) then
  1×1 (r → C_out); ``form="spatial"``: k_h×1 conv (C_in → r, vertical stride/padding) then 1×k_w
  (r → C_out, horizontal stride/padding). Both from a truncated SVD of the matching reshaping of the
  kernel, split as U·√S and √S·Vᵀ.
* :class:`Tucker2Conv2d` — 1×1 (C_in → r_in) → k×k core (r_in → r_out, original stride/padding) →
  1×1 (r_out → C_out), initialised by HOSVD: the factors are the leading left singular vectors of the
  kernel's mode-0 (output) and mode-1 (input) unfoldings, the core is the kernel projected on them.

At full rank every factorization reproduces the layer's output (up to float rounding); truncated, the
two-factor SVD's squared Frobenius error equals the discarded singular energy. Each layer stores its
constructor arguments as ``extra_state`` so a checkpoint rebuilds it (:func:`restore_factorized`), and
reports ``compression_info()`` with ``kind="lowrank"``, its form, ranks and the fraction of the original
layer's MACs it keeps (for the spatial form the intermediate width is taken as W_out·stride_w, exact for
'same' padding). Grouped convs are not factorized (:func:`factorizable`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


def _split_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U·√S, √S·Vᵀ, S) of the rank-``rank`` truncated SVD of ``matrix``."""
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), s


def singular_values(layer: nn.Module, form: str = "channel") -> torch.Tensor:
    """Singular values of the matrix the two-factor form of ``layer`` truncates."""
    return torch.linalg.svdvals(_matrix(layer, form).detach().double())


def _matrix(layer: nn.Module, form: str) -> torch.Tensor:
    w = layer.weight
    if isinstance(layer, nn.Linear) or form == "channel":
        return w.reshape(w.shape[0], -1)
    if form == "spatial":  # rows (C_in, k_h), columns (C_out, k_w)
        return w.permute(1, 2, 0, 3).reshape(w.shape[1] * w.shape[2], w.shape[0] * w.shape[3])
    raise ValueError(f"unknown factorization form '{form}' (channel | spatial)")


def _unmatrix(matrix: torch.Tensor, shape: torch.Size, form: str) -> torch.Tensor:
    """Inverse of :func:`_matrix`: the weight of ``shape`` whose reshaping for ``form`` is ``matrix``."""
    if len(shape) == 2 or form == "channel":
        return matrix.reshape(shape)
    c_out, c_in, kh, kw = shape
    return matrix.reshape(c_in, kh, c_out, kw).permute(2, 0, 1, 3).contiguous()


def truncated_weight(layer: nn.Module, rank: int, form: str = "channel") -> torch.Tensor:
    """``layer.weight`` replaced by the rank-``rank`` truncated SVD of its ``form`` matrix (same shape)."""
    u, s, vh = torch.linalg.svd(_matrix(layer, form).detach().double(), full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return _unmatrix(low, layer.weight.shape, form).to(layer.weight.dtype)


def nuclear_subgradient(layer: nn.Module, form: str = "channel") -> torch.Tensor:
    """U·Vᵀ of the ``form`` matrix (over its non-zero singular values), a subgradient of its nuclear norm."""
    u, s, vh = torch.linalg.svd(_matrix(layer, form).detach().double(), full_matrices=False)
    keep = s > s.max() * 1e-12 if len(s) else s.bool()
    return _unmatrix(u[:, keep] @ vh[keep], layer.weight.shape, form).to(layer.weight.dtype)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the total squared singular energy."""
    cumulative = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-300)
    return min(int((cumulative < energy - 1e-12).sum().item()) + 1, len(s))


def two_factor_fraction(c_in: int, c_out: int, kernel: tuple[int, int], rank: int, form: str,
                        stride_w: int = 1) -> float:
    """MACs of a rank-``rank`` two-factor layer / MACs of the layer (linear: kernel (1, 1))."""
    kh, kw = kernel
    if form == "spatial":
        return (c_in * kh * rank * stride_w + rank * c_out * kw) / (c_in * c_out * kh * kw)
    return (c_in * kh * kw * rank + rank * c_out) / (c_in * c_out * kh * kw)


def tucker2_fraction(c_in: int, c_out: int, kernel: tuple[int, int], rank_in: int, rank_out: int,
                     stride: tuple[int, int] = (1, 1)) -> float:
    """MACs of a Tucker-2 conv / MACs of the conv (the first 1×1 runs at the input resolution)."""
    kh, kw = kernel
    return (c_in * rank_in * stride[0] * stride[1] + rank_in * rank_out * kh * kw + rank_out * c_out) / (
        c_in * c_out * kh * kw)


def layer_fraction(layer: nn.Module, rank: int, form: str = "channel") -> float:
    """``two_factor_fraction`` of a linear or conv layer."""
    if isinstance(layer, nn.Linear):
        return two_factor_fraction(layer.in_features, layer.out_features, (1, 1), rank, "channel")
    return two_factor_fraction(layer.in_channels, layer.out_channels, tuple(layer.kernel_size), rank, form,
                               layer.stride[1])


def factorizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1
                                            and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple))


class Factorized(nn.Module, ABC):
    """Base of the factorized layers: extra_state with constructor args, compression_info."""

    form: str

    def ctor_args(self) -> dict[str, Any]:
        return dict(self._args)

    def get_extra_state(self) -> dict[str, Any]:
        return {"factorized": type(self).__name__, "args": self.ctor_args()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def ranks(self) -> list[int]:
        """The two-factor layers' single rank; Tucker-2 has two."""
        return [self._args["rank"]]

    @abstractmethod
    def mac_fraction(self) -> float: ...

    def dense_like(self) -> nn.Module | None:
        """A dense layer of the geometry this one replaces (fresh weights: for pricing its shape), or None when it
        replaced more than one layer (COMCAT's factorized attention)."""
        a = self._args
        if "in_features" in a:
            return nn.Linear(a["in_features"], a["out_features"], bias=a["bias"])
        if "in_channels" in a:
            return nn.Conv2d(a["in_channels"], a["out_channels"], a["kernel_size"], a["stride"], a["padding"],
                             a["dilation"], bias=a["bias"])
        return None

    def compression_info(self) -> dict[str, Any]:
        return {"kind": "lowrank", "form": self.form, "ranks": self.ranks(), "density": self.mac_fraction()}


class LowRankLinear(Factorized):
    form = "svd"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self._args = {"in_features": in_features, "out_features": out_features, "rank": rank, "bias": bias}
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)
        self.gate: torch.Tensor | None = None  # one weight per component during a rank search (not saved)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> LowRankLinear:
        new = cls(layer.in_features, layer.out_features, rank, layer.bias is not None)
        left, right, _ = _split_svd(layer.weight, rank)
        with torch.no_grad():
            new.first.weight.copy_(right)
            new.second.weight.copy_(left)
            if layer.bias is not None:
                new.second.bias.copy_(layer.bias)
        return new.to(layer.weight.device)

    def mac_fraction(self) -> float:
        a = self._args
        return two_factor_fraction(a["in_features"], a["out_features"], (1, 1), a["rank"], "channel")

    @torch.no_grad()
    def resvd(self, rank: int) -> None:
        """Re-factor from the product of the current factors by SVD, keeping ``rank`` components (at most the
        current rank): orthogonal components ordered by singular value, so a prefix is the best truncation."""
        rank = min(rank, self._args["rank"])
        left, right, _ = _split_svd(self.second.weight @ self.first.weight, rank)
        device, dtype = self.first.weight.device, self.first.weight.dtype
        bias = None if self.second.bias is None else self.second.bias.detach().clone()
        self.first = nn.Linear(self._args["in_features"], rank, bias=False).to(device=device, dtype=dtype)
        self.second = nn.Linear(rank, self._args["out_features"], bias=bias is not None).to(device=device, dtype=dtype)
        self.first.weight.copy_(right)
        self.second.weight.copy_(left)
        if bias is not None:
            self.second.bias.copy_(bias)
        self._args["rank"] = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        return self.second(hidden if self.gate is None else hidden * self.gate.to(hidden.dtype))


def _conv_args(layer: nn.Conv2d) -> dict[str, Any]:
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": tuple(layer.kernel_size), "stride": tuple(layer.stride), "padding": tuple(layer.padding),
            "dilation": tuple(layer.dilation), "bias": layer.bias is not None}


class LowRankConv2d(Factorized):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank: int,
                 form: str = "channel", stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True) -> None:
        super().__init__()
        if form not in ("channel", "spatial"):
            raise ValueError(f"unknown factorization form '{form}' (channel | spatial)")
        self.form = form
        self._args = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": tuple(kernel_size),
                      "rank": rank, "form": form, "stride": tuple(stride), "padding": tuple(padding),
                      "dilation": tuple(dilation), "bias": bias}
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
        if form == "channel":
            self.first = nn.Conv2d(in_channels, rank, (kh, kw), stride, padding, dilation, bias=False)
            self.second = nn.Conv2d(rank, out_channels, 1, bias=bias)
        else:
            self.first = nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
            self.second = nn.Conv2d(rank, out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias)

    @classmethod
    def like(cls, layer: nn.Conv2d, rank: int, form: str = "channel") -> LowRankConv2d:
        """A freshly initialised two-factor conv in place of ``layer`` (for pricing or training from scratch)."""
        return cls(**{**_conv_args(layer), "rank": rank, "form": form}).to(layer.weight.device)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, rank: int, form: str = "channel") -> LowRankConv2d:
        new = cls(**{**_conv_args(layer), "rank": rank, "form": form})
        c_out, c_in, kh, kw = layer.weight.shape
        left, right, _ = _split_svd(_matrix(layer, form), rank)
        with torch.no_grad():
            if form == "channel":
                new.first.weight.copy_(right.reshape(rank, c_in, kh, kw))
                new.second.weight.copy_(left.reshape(c_out, rank, 1, 1))
            else:  # left: (C_in·k_h, r) -> first[r, i, h, 0]; right: (r, C_out·k_w) -> second[o, r, 0, w]
                new.first.weight.copy_(left.reshape(c_in, kh, rank).permute(2, 0, 1)[..., None])
                new.second.weight.copy_(right.reshape(rank, c_out, kw).permute(1, 0, 2)[:, :, None, :])
            if layer.bias is not None:
                new.second.bias.copy_(layer.bias)
        return new.to(layer.weight.device)

    def mac_fraction(self) -> float:
        a = self._args
        return two_factor_fraction(a["in_channels"], a["out_channels"], a["kernel_size"], a["rank"], self.form,
                                   a["stride"][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class Tucker2Conv2d(Factorized):
    form = "tucker2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank_in: int,
                 rank_out: int, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True) -> None:
        super().__init__()
        self._args = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": tuple(kernel_size),
                      "rank_in": rank_in, "rank_out": rank_out, "stride": tuple(stride), "padding": tuple(padding),
                      "dilation": tuple(dilation), "bias": bias}
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(rank_in, rank_out, kernel_size, stride, padding, dilation, bias=False)
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias)

    @classmethod
    def like(cls, layer: nn.Conv2d, rank_in: int, rank_out: int) -> Tucker2Conv2d:
        """A freshly initialised Tucker-2 conv in place of ``layer`` (for training from scratch)."""
        return cls(**{**_conv_args(layer), "rank_in": rank_in, "rank_out": rank_out}).to(layer.weight.device)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, rank_in: int, rank_out: int) -> Tucker2Conv2d:
        """HOSVD: factors from the mode unfoldings, core = kernel ×₀ U_outᵀ ×₁ U_inᵀ."""
        new = cls(**{**_conv_args(layer), "rank_in": rank_in, "rank_out": rank_out})
        w = layer.weight.detach().double()
        u_out = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :rank_out]
        u_in = torch.linalg.svd(w.transpose(0, 1).reshape(w.shape[1], -1), full_matrices=False)[0][:, :rank_in]
        core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
        with torch.no_grad():
            new.first.weight.copy_(u_in.T[:, :, None, None].float())
            new.core.weight.copy_(core.float())
            new.last.weight.copy_(u_out[:, :, None, None].float())
            if layer.bias is not None:
                new.last.bias.copy_(layer.bias)
        return new.to(layer.weight.device)

    def ranks(self) -> list[int]:
        return [self._args["rank_in"], self._args["rank_out"]]

    def mac_fraction(self) -> float:
        a = self._args
        return tucker2_fraction(a["in_channels"], a["out_channels"], a["kernel_size"], a["rank_in"], a["rank_out"],
                                a["stride"])

    def factor_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_in: C_in × r_in, U_out: C_out × r_out), the matrices ELRT keeps near-orthogonal."""
        return self.first.weight[:, :, 0, 0].T, self.last.weight[:, :, 0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


FACTORIZED = {cls.__name__: cls for cls in (LowRankLinear, LowRankConv2d, Tucker2Conv2d)}


def full_rank(layer: nn.Module, form: str = "channel") -> int:
    return min(_matrix(layer, form).shape)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def restore_factorized(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> int:
    """Give ``model`` the factorized layers a state dict describes (call before ``load_state_dict``)."""
    count = 0
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith("._extra_state") and isinstance(value, dict)
                and value.get("factorized") in FACTORIZED):
            continue
        name = key[len(prefix): -len("._extra_state")]
        set_module(model, name, FACTORIZED[value["factorized"]](**value["args"]))
        count += 1
    return count


def is_factorized(model: nn.Module) -> bool:
    return any(isinstance(m, Factorized) for m in model.modules())


import compress_run.core.lowrank_attention  # noqa: E402,F401  (registers LowRankAttention in FACTORIZED)
