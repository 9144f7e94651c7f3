"""The evaluate stage's hardware numbers for a causal LM: prefill and decode, per token, on every profile.

A causal LM serves a prompt in two phases with different costs. *Prefill* runs the whole prompt at once (one
forward of ``context`` tokens: large GEMMs, compute-bound on most hardware); *decode* produces one token at a time
against the KV cache of the tokens before it (GEMV-shaped products that read every weight once per token, so
memory-bound: the weight bytes at their precision over the bandwidth, plus the cache). Both phases are traced op by
op (:func:`compress_run.hardware.trace.trace_call`; decode: one step with a cache of ``context - 1`` tokens) and
priced by the same simulator as every other network, each quantized layer's weight at its bits. The host measures
both with PyTorch eager at batch 1: the prefill of ``context`` tokens, and the median time of one decode step over
``decode_tokens`` successive steps after a prefill of ``context - decode_tokens`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress_run.core.compression_info import compression_infos
from compress_run.hardware.macs import mac_report
from compress_run.hardware.measure import median_seconds
from compress_run.hardware.profile import HardwareConfig
from compress_run.hardware.report import layer_rows
from compress_run.hardware.simulator import Simulator, layer_bits
from compress_run.hardware.trace import ModelTrace, trace_call, trace_model


def random_tokens(count: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, count), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_trace(net: nn.Module, context: int) -> ModelTrace:
    """One decode step of ``net`` (a :class:`compress_run.models.causal_lm.CausalLM`) with ``context - 1``
    tokens in its cache."""
    net.eval()
    cache = net.prefill(random_tokens(context - 1, net.vocab_size))
    token = random_tokens(1, net.vocab_size, seed=1)
    return trace_call(net, lambda: net.decode_step(token, cache), (1, 1))


@torch.no_grad()
def decode_ms(net: nn.Module, context: int, steps: int) -> float:
    """Median host time of one decode step over ``steps`` successive steps that end at ``context`` tokens."""
    net.eval()
    steps = max(1, min(steps, context - 1))
    cache = net.prefill(random_tokens(context - steps, net.vocab_size))
    token = random_tokens(1, net.vocab_size, seed=1)
    times = []

    def step() -> None:
        nonlocal token
        logits = net.decode_step(token, cache)
        token = logits[:, -1:].argmax(-1)

    for _ in range(steps):
        times.append(median_seconds(step, warmup=0, repeats=1))
    times.sort()
    return times[len(times) // 2] * 1e3


def llm_hardware_metrics(net: nn.Module, context: int, profiles: list[HardwareConfig], measure: bool = True,
                         warmup: int = 2, repeats: int = 5, decode_tokens: int = 16
                         ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Flat metrics (the first profile is the run's primary hardware) and the decode step's per-layer rows per
    profile. ``latency_sim_ms/<profile>`` is the prefill of ``context`` tokens (the forward every other network
    reports); ``/decode_token`` one decode step; ``sim_tokens_per_s/<profile>/decode`` its inverse."""
    net = net.cpu().eval()
    infos, bits = compression_infos(net), layer_bits(net)
    prefill = trace_model(net, (1, context), dtype=torch.long)
    decode = decode_trace(net, context)
    macs_prefill, macs_decode = mac_report(net, prefill, infos), mac_report(net, decode, infos)
    metrics: dict[str, Any] = {
        "llm/context_tokens": context,
        "model/macs_dense": macs_prefill.dense, "model/macs_effective": round(macs_prefill.effective),
        "model/flops_dense": 2 * macs_prefill.dense, "model/flops_effective": round(2 * macs_prefill.effective),
        "model/macs_per_token/prefill": round(macs_prefill.effective / context),
        "model/macs_per_token/decode": round(macs_decode.effective),
        "model/macs_per_token/decode_dense": macs_decode.dense,
        "macs_per_layer": {name: {"dense": round(macs_prefill.per_module.get(name, 0)),
                                  "effective": round(macs_prefill.per_module_effective.get(name, 0))}
                           for name in {**macs_prefill.per_module, **macs_prefill.per_module_effective}}}
    unpriced = sorted({*prefill.unpriced_ops, *decode.unpriced_ops})
    if unpriced:
        metrics["model/unpriced_ops"] = unpriced
    per_layer: dict[str, list[dict[str, Any]]] = {}
    for i, profile in enumerate(profiles):
        sim_prefill = Simulator(profile).run(prefill, infos, bits)
        sim_decode = Simulator(profile).run(decode, infos, bits)
        executed = round(sim_prefill.macs("executed"))
        if i == 0:
            metrics.update({"model/macs_executed": executed, "model/flops_executed": 2 * executed,
                            "hardware": profile.name})
        metrics[f"model/macs_executed/{profile.name}"] = executed
        metrics[f"latency_sim_ms/{profile.name}"] = round(sim_prefill.total_ms, 4)
        metrics[f"latency_sim_ms/{profile.name}/decode_token"] = round(sim_decode.total_ms, 5)
        metrics[f"sim_tokens_per_s/{profile.name}/prefill"] = round(context / sim_prefill.total_ms * 1e3, 1)
        metrics[f"sim_tokens_per_s/{profile.name}/decode"] = round(1e3 / sim_decode.total_ms, 1)
        per_layer[profile.name] = layer_rows(sim_decode)
    if measure:
        tokens = random_tokens(context, net.vocab_size)
        with torch.inference_mode():
            prefill_ms = median_seconds(lambda: net(tokens), warmup=min(warmup, 1), repeats=repeats) * 1e3
        step_ms = decode_ms(net, context, decode_tokens)
        metrics.update({"latency_host_ms/b1": round(prefill_ms, 3), "latency_host_ms/decode_token": round(step_ms, 3),
                        "host_tokens_per_s/prefill": round(context / prefill_ms * 1e3, 1),
                        "host_tokens_per_s/decode": round(1e3 / step_ms, 2),
                        "latency_host/threads": torch.get_num_threads(), "latency_host/kernel_choice": "dense eager"})
        if bits:
            metrics["latency_host/quantized_layers_run_as"] = "fake-quant float kernels"
    return metrics, per_layer
