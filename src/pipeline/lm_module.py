"""Causal language models in the pipeline: the training loss (next-token cross-entropy) and the evaluation
(perplexity, mean NLL, token accuracy; KL and top-1 agreement against the uncompressed model).

Perplexity follows GPTQ's ``llama_eval`` (IST-DASLab/gptq, llama.py): non-overlapping windows of the split's
token stream, the mean next-token NLL over every predicted token, ``exp`` of it. KL is
KL(p_reference ‖ p_compressed) per predicted token, averaged (nats); top-1 agreement is the fraction of positions
where both models' most likely next token is the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compress_run.pipeline.lit_module import ClassifierModule

LM_KEYS = ("test/ppl", "test/nll")


class CausalLMModule(ClassifierModule):
    """:class:`ClassifierModule` with the next-token loss: batches are (tokens [B, T], targets [B, T])."""

    def _step(self, batch, prefix: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if prefix == "train":
            self.last_train_logits = None  # per-example callbacks (forgetting) do not apply to token streams
        return self.finish_step(prefix, loss, "token_acc", (logits.argmax(-1) == y).float().mean(), len(y))


@torch.no_grad()
def split_metrics(net: nn.Module, data: Dataset, batch_size: int, reference: nn.Module | None = None,
                  progress: Callable[[str], None] | None = None, name: str = "",
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """NLL, perplexity and token accuracy of ``net`` on ``data`` (and KL / top-1 agreement against
    ``reference``), one sequence's log-softmax at a time (a 49k vocabulary makes full-batch logits large)."""
    net.eval()
    if reference is not None:
        reference.eval()
    nll = kl = 0.0
    tokens = correct = agree = 0
    started, done = time.perf_counter(), 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = net(x)
        ref_logits = reference(x) if reference is not None else None
        for k in range(len(x)):
            logp = F.log_softmax(logits[k].float(), dim=-1)
            nll -= float(logp.gather(-1, y[k].unsqueeze(-1)).sum())
            top = logp.argmax(-1)
            correct += int((top == y[k]).sum())
            tokens += y[k].numel()
            if ref_logits is not None:
                ref = F.log_softmax(ref_logits[k].float(), dim=-1)
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += int((ref.argmax(-1) == top).sum())
        done += len(x)
        if progress is not None and (done == len(data) or time.perf_counter() - started > 30):
            progress(f"{name}: {done}/{len(data)} sequences ({time.perf_counter() - started:.0f} s)")
            started = time.perf_counter() if done < len(data) else started
    mean = nll / max(1, tokens)
    out = {f"{name}/nll": mean, f"{name}/ppl": math.exp(min(mean, 700.0)),
           f"{name}/token_acc": correct / max(1, tokens), f"{name}/tokens": float(tokens)}
    if reference is not None:
        out[f"{name}/kl"] = kl / max(1, tokens)
        out[f"{name}/top1_agreement"] = agree / max(1, tokens)
    return out


def lm_metrics(net: nn.Module, sets: Mapping[str, Dataset], batch_size: int, reference: nn.Module | None = None,
               log: Callable[[str], None] | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """:func:`split_metrics` for every split of ``sets`` (test, ood)."""
    out: dict[str, Any] = {}
    for name, data in sets.items():
        out.update(split_metrics(net, data, batch_size, reference, log, name, device))
    return dict(sorted(out.items()))
