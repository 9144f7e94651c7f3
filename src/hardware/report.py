"""The evaluate stage's hardware numbers: MAC views, simulated latency per profile, measured host latency.

:func:`hardware_metrics` traces the model at batch 1 and batch N once, simulates every requested profile
on those traces (and, for a factorized network, prices every factorized layer against the dense layer it
replaces: ``lowrank/slower_than_dense/<profile>`` names those slower on that profile), times the *executed*
form on this host (masked layers whose sparse path the host profile prefers run through the CSR/BSR kernels)
and returns flat metrics plus per-layer rows.

The executed form: with ``kernels="measured"`` every masked layer runs the kernel that was fastest on its
real input at batch 1 (CSR, BSR, gather-scatter or dense; :mod:`compress_run.kernels.select`); with
``kernels="simulated"`` the host profile's simulator picks the formats. Before that, every batch norm that
follows a conv or linear layer is folded into it (:mod:`compress_run.kernels.fold`, as ONNX Runtime and other
inference runtimes do; ``latency_host/batchnorm`` says what was folded, or why nothing was).

Masked attention (E-ViT's attention level: patch queries keeping only the links of a mask built at an earlier
block) has two forms with the same output (:func:`compress_run.core.tokens.linked_attention`): ``gathered`` does
only the kept links (gathering their keys and values), ``masked`` computes every link and masks the others out of
the softmax. The MAC count is the
gathered form's (the kept links); each profile is priced on the form it runs faster
(``latency_sim/attention_form/<profile>``), and the host latency is measured running the form the host profile
chose (``latency_host/attention_form``), so the simulated and the measured latency are of the same computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compress_run.core.compression_info import compression_infos
from compress_run.core.tokens import every_token_kept, gathered_links, has_sparse_attention, has_token_pruning
from compress_run.hardware.kernel_choice import choose_kernels
from compress_run.hardware.layer_cost import factorized_costs
from compress_run.hardware.macs import mac_report
from compress_run.hardware.measure import model_latency_ms
from compress_run.hardware.profile import HardwareConfig
from compress_run.hardware.simulator import Simulation, Simulator, layer_bits
from compress_run.hardware.trace import ModelTrace, trace_model
from compress_run.kernels.fold import fold_batchnorm
from compress_run.kernels.gather_scatter import GSConv2d, GSLinear
from compress_run.kernels.select import to_fastest
from compress_run.kernels.sparse import SparseConv2d, SparseLinear


def hardware_metrics(net: nn.Module, sample_shape: tuple[int, ...], profiles: list[HardwareConfig],
                     host: HardwareConfig, batch: int, measure: bool = True, warmup: int = 5,
                     repeats: int = 20, kernels: str = "measured"
                     ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Flat metrics (the first profile is the run's primary hardware) and batch-1 per-layer rows per profile."""
    forms = attention_forms(net, sample_shape, (1, batch))  # each profile is priced on its cheaper form
    traces = forms["gathered"]
    infos = compression_infos(net)  # read the masks once for every view and profile
    bits = layer_bits(net)
    macs = mac_report(net, traces[1], infos)
    if has_token_pruning(net):  # the dense view keeps every token; the effective view is the forward that runs
        with every_token_kept(net):
            macs.per_module = mac_report(net, trace_model(net, (1, *sample_shape)), infos).per_module
    metrics: dict[str, Any] = {
        "model/macs_dense": macs.dense, "model/macs_effective": round(macs.effective),
        "model/flops_dense": 2 * macs.dense, "model/flops_effective": round(2 * macs.effective),
        "macs_per_layer": {name: {"dense": round(macs.per_module.get(name, 0)),
                                  "effective": round(macs.per_module_effective.get(name, 0))}
                           for name in {**macs.per_module, **macs.per_module_effective}}}
    if traces[1].unpriced_ops:  # MAC work no formula covers: the counts above are too low by that much
        metrics["model/unpriced_ops"] = traces[1].unpriced_ops
    per_layer: dict[str, list[dict[str, Any]]] = {}
    priced: dict[str, tuple[str, dict[int, Simulation]]] = {}
    for i, profile in enumerate(profiles):
        form, sims = priced[profile.name] = cheapest_form(forms, profile, infos, bits)
        if len(forms) > 1:
            metrics[f"latency_sim/attention_form/{profile.name}"] = form
        executed = round(sims[1].macs("executed"))
        if i == 0:
            metrics["model/macs_executed"] = executed
            metrics["model/flops_executed"] = 2 * executed
            metrics["hardware"] = profile.name
        metrics[f"model/macs_executed/{profile.name}"] = executed
        metrics[f"latency_sim_ms/{profile.name}"] = round(sims[1].total_ms, 4)
        metrics[f"latency_sim_ms/{profile.name}/b{batch}"] = round(sims[batch].total_ms, 4)
        per_layer[profile.name] = layer_rows(sims[1])
        costs = factorized_costs(net, sample_shape, profile)
        if costs:  # factorized layers the profile prices slower than the dense layer they replace
            metrics[f"lowrank/slower_than_dense/{profile.name}"] = sorted(n for n, c in costs.items() if c["slower"])
            if i == 0:
                metrics["lowrank_per_layer"] = costs
    if measure:
        host_form, host_sims = priced.get(host.name) or cheapest_form(forms, host, infos, bits)
        deployed, folding, choice = host_deployment(net, sample_shape, kernels, host_sims)
        metrics["latency_host/batchnorm"] = folding
        if choice is not None:
            metrics["kernels_per_layer"] = choice
        with gathered_links(host_form == "gathered"):  # the attention form the host profile prices cheaper
            metrics["latency_host_ms/b1"] = round(model_latency_ms(deployed, (1, *sample_shape), warmup, repeats), 4)
            metrics[f"latency_host_ms/b{batch}"] = round(
                model_latency_ms(deployed, (batch, *sample_shape), warmup, repeats), 4)
        if len(forms) > 1:
            metrics["latency_host/attention_form"] = host_form
        metrics["latency_host/threads"] = torch.get_num_threads()
        metrics["latency_host/sparse_layers"] = sum(isinstance(m, SparseLinear | SparseConv2d | GSLinear | GSConv2d)
                                                    for m in deployed.modules())
        metrics["latency_host/kernel_choice"] = kernels
        if bits:  # the host runs the integer grids in float: its time is not an int8 kernel's
            metrics["latency_host/quantized_layers_run_as"] = "fake-quant float kernels"
    return metrics, per_layer


def host_deployment(net: nn.Module, sample_shape: tuple[int, ...], kernels: str, host_sims: dict[int, Simulation]
                    ) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """The network as the host runs it: batch norm folded, each masked layer on the kernel measured fastest
    (``kernels: measured``) or on the format the host profile prices cheapest; and the measured choice, if any."""
    sample = torch.randn(2, *sample_shape, generator=torch.Generator().manual_seed(0))
    executed, folding = fold_batchnorm(net, sample)  # the inference form runtimes execute
    if kernels == "measured":
        choice = choose_kernels(executed, sample_shape)
        return to_fastest(executed, choice), folding, choice
    return to_fastest(executed, {name: {"kernel": fmt} for name, fmt in host_sims[1].formats().items()}), folding, None


def host_form(net: nn.Module, sample_shape: tuple[int, ...], host: HardwareConfig
              ) -> tuple[str, dict[int, Simulation]]:
    """The attention form (masked or gathered) the host profile prices cheaper at batch 1, and its simulations."""
    forms = attention_forms(net, sample_shape, (1,))
    return cheapest_form(forms, host, compression_infos(net), layer_bits(net))


def attention_forms(net: nn.Module, sample_shape: tuple[int, ...], batches: tuple[int, ...]
                    ) -> dict[str, dict[int, ModelTrace]]:
    """Traces per batch size of each form ``net`` can run: ``gathered`` (sparse attention doing the kept links
    only; the form the MAC count reports) and, when it has sparse attention, ``masked``."""
    forms = {"gathered": {b: trace_model(net, (b, *sample_shape)) for b in batches}}
    if has_sparse_attention(net):
        forms["masked"] = {b: trace_model(net, (b, *sample_shape), gathered=False) for b in batches}
    return forms


def cheapest_form(forms: dict[str, dict[int, ModelTrace]], profile: HardwareConfig, infos: dict[str, Any],
                  bits: dict[str, Any]) -> tuple[str, dict[int, Simulation]]:
    """The form (of sparse attention: ``gathered`` or ``masked``) whose batch-1 trace ``profile`` prices lowest,
    with its simulations at every traced batch size; a network without sparse attention has one form."""
    priced = {form: {b: Simulator(profile).run(trace, infos, bits) for b, trace in traces.items()}
              for form, traces in forms.items()}
    form = min(priced, key=lambda f: priced[f][1].total_ms)
    return form, priced[form]


def layer_rows(sim: Simulation) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for layer in sim.layers:
        row = rows.setdefault(layer.module or "(model)", {"module": layer.module or "(model)", "kind": layer.kind,
                                                          "format": layer.fmt, "ms": 0.0, "macs_executed": 0.0})
        row["ms"] += layer.total_ms
        row["macs_executed"] += layer.macs_executed
        if layer.fmt != "dense":
            row["format"] = layer.fmt
    return [{**r, "ms": round(r["ms"], 5), "macs_executed": round(r["macs_executed"])} for r in rows.values()]


def print_hardware_table(metrics: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    profiles = [k.removeprefix("latency_sim_ms/") for k in metrics
                if k.startswith("latency_sim_ms/") and k.count("/") == 1]
    if not profiles:
        return
    batch_keys = [k for k in metrics if k.startswith(f"latency_sim_ms/{profiles[0]}/b")]
    batch = batch_keys[0].rsplit("/b", 1)[1] if batch_keys else None
    table = Table(title="MACs and latency per hardware profile", title_justify="left")
    for col in ("hardware", "MACs dense", "MACs effective", "MACs executed", "sim ms (b1)",
                *([f"sim ms (b{batch})"] if batch else [])):
        table.add_column(col, justify="left" if col == "hardware" else "right")
    for name in profiles:
        row = [name, f"{metrics['model/macs_dense'] / 1e6:,.2f} M", f"{metrics['model/macs_effective'] / 1e6:,.2f} M",
               f"{metrics[f'model/macs_executed/{name}'] / 1e6:,.2f} M", f"{metrics[f'latency_sim_ms/{name}']:.3f}"]
        if batch:
            row.append(f"{metrics[f'latency_sim_ms/{name}/b{batch}']:.3f}")
        table.add_row(*row)
    if "latency_host_ms/b1" in metrics:
        row = [f"measured on this host ({metrics['latency_host/threads']} threads)", "", "", "",
               f"{metrics['latency_host_ms/b1']:.3f}"]
        if batch:
            row.append(f"{metrics.get(f'latency_host_ms/b{batch}', float('nan')):.3f}")
        table.add_row(*row)
    console.print(table)


def print_breakdown(per_layer: dict[str, list[dict[str, Any]]], top: int, console: Console | None = None) -> None:
    console = console or Console()
    for name, rows in per_layer.items():
        total = sum(r["ms"] for r in rows) or 1.0
        table = Table(title=f"{name}: the {top} slowest layers (batch 1, simulated)", title_justify="left")
        for col in ("layer", "kind", "format", "ms", "share", "MACs executed"):
            table.add_column(col, justify="left" if col in ("layer", "kind", "format") else "right")
        for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
            table.add_row(r["module"], r["kind"], r["format"], f"{r['ms']:.4f}", f"{r['ms'] / total:.1%}",
                          f"{r['macs_executed'] / 1e6:,.2f} M")
        console.print(table)


def plot_breakdown(per_layer: dict[str, list[dict[str, Any]]], path: Path, top: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_layer), figsize=(5 * len(per_layer), 0.3 * top + 1.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], per_layer.items(), strict=True):
        rows = sorted(rows, key=lambda r: -r["ms"])[:top][::-1]
        ax.barh([r["module"] for r in rows], [r["ms"] for r in rows],
                color=["tab:orange" if r["format"] != "dense" else "tab:blue" for r in rows])
        ax.set_title(f"{name} (total {sum(r['ms'] for r in per_layer[name]):.3f} ms)")
        ax.set_xlabel("simulated ms, batch 1 (orange: sparse format)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
