"""results.json (one per run) and the Rich summary table printed at the end of every run."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from compress_run.core.errors import UserError
from compress_run.hardware.profile import load_profile
from compress_run.hardware.report import print_hardware_table
from compress_run.pipeline.provenance import code_version, host_info, run_load
from compress_run.pipeline.validate import fingerprint

PACKAGES = ("compress-run", "torch", "torchvision", "lightning", "hydra-core", "omegaconf", "timm", "numpy",
            "transformers", "gguf")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def profile_dates(cfg: DictConfig) -> dict[str, str | None]:
    """When and where each hardware profile the run priced with was fitted (None: a spec-sheet profile)."""
    primary = cfg.get("hardware") or {}
    found: dict[str, str | None] = {str(primary.get("name")): primary.get("calibrated")} if primary else {}
    for name in dict.fromkeys(cfg.get("evaluate", {}).get("hardware") or []):
        if name in found:
            continue
        try:
            found[str(name)] = load_profile(str(name)).calibrated
        except (UserError, OSError, KeyError, ValueError):  # a record is still written without the date
            found[str(name)] = None
    return found


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_at_end(at_start: dict[str, Any] | None) -> dict[str, Any]:
    """The code a run ran: read when it started (a commit made while it ran is not its code); if the code read now
    differs, the record says so."""
    now = code_version()
    if at_start is None:
        return now
    changed = (now.get("commit"), now.get("dirty")) != (at_start.get("commit"), at_start.get("dirty"))
    return {**at_start, "changed_during_run": changed} if changed else at_start


def build_results(cfg: DictConfig, out: Path, records: dict[str, dict[str, Any]], overrides: list[str],
                  choices: dict[str, str], started: str, code: dict[str, Any] | None = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    evaluate = records.get("evaluate", {}).get("metrics", {})
    for stage, rec in records.items():
        if rec.get("status") != "done":
            continue
        metrics[f"time/{stage}_s"] = rec.get("wall_s")
        if "cpu_s" in rec:
            metrics[f"time/{stage}_cpu_s"] = rec["cpu_s"]
        for key in ("test/acc", "val/acc", "test/ppl", "ood/ppl"):
            if key in rec.get("metrics", {}):
                metrics[f"{stage}/{key}"] = rec["metrics"][key]
    # this run's own stages: a stage taken over from another run (start_from) is that run's time and start
    done = [rec for rec in records.values() if rec.get("status") == "done" and not rec.get("taken_from")]
    metrics["time/total_s"] = round(sum(rec.get("wall_s") or 0.0 for rec in done), 3)
    metrics["time/total_cpu_s"] = round(sum(rec.get("cpu_s") or 0.0 for rec in done), 3)
    starts = [rec.get("started_at") for rec in done]  # None in it: a stage recorded before starts were kept
    first = started if not starts else None if None in starts else min(starts)
    scalar = (int, float, str)
    metrics.update({k: v for k, v in evaluate.items() if k != "accuracy_from" and (
        isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v)))})
    return {
        "status": "ok",
        "output_dir": str(out),
        "choices": choices,
        "overrides": list(overrides),
        "seed": cfg.seed,
        "git": code_at_end(code),
        "config_digest": fingerprint(cfg),
        "versions": versions(),
        "host": host_info(),
        "load": run_load({s: r for s, r in records.items() if not r.get("taken_from")}),
        "hardware_profiles": profile_dates(cfg),
        # the first stage's first start (a later evaluate-only re-run or a resume keeps it); this process's start
        "started_at": first,
        "process_started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics,
        "sparsity_per_layer": evaluate.get("sparsity_per_layer", {}),
        "macs_per_layer": evaluate.get("macs_per_layer", {}),
        "latency_per_layer": evaluate.get("latency_per_layer", {}),
        "method": evaluate.get("method", {}),
        "kernels_per_layer": evaluate.get("kernels_per_layer", {}),  # host kernel chosen per masked layer
        # factorized layers priced against the dense layer each replaces, on the run's profile
        "lowrank_per_layer": evaluate.get("lowrank_per_layer", {}),
        # the quantize stage's summary and the bit widths of every quantized layer ({} without quant=)
        "quant": {**records.get("quantize", {}).get("metrics", {}).get("quant", {}),
                  "bits_per_layer": evaluate.get("quant_bits_per_layer", {})}
        if evaluate.get("quant_bits_per_layer") else {},
        # causal LMs: what was loaded or built, and what the text splits hold
        "llm": {"model": evaluate["llm/model"], "data": evaluate.get("llm/data")} if "llm/model" in evaluate else {},
        # accuracy under noisy analog computation (evaluate.noise_snr_db): the noise model and one row per SNR and K
        "noise": {"model": evaluate["noise/model"], "curve": evaluate.get("noise_curve", [])}
        if "noise/model" in evaluate else {},
        "levels": evaluate.get("levels", []),  # multi-level models: one row per level
        "level_mixes": evaluate.get("level_mixes", []),  # ... and one per switch of level part-way
        "stages": records,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.2f}%"
    return f"{value:.1f}s" if isinstance(value, float) else str(value)


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_language_model(m: dict[str, Any], console: Console) -> None:
    """A causal LM's evaluation: perplexity and agreement with the uncompressed model, bytes, per-token cost."""
    for split in ("test", "ood"):
        if f"{split}/ppl" in m:
            line = (f"{split}: perplexity {m[f'{split}/ppl']:.3f} (mean NLL {m[f'{split}/nll']:.4f} nats over "
                    f"{int(m[f'{split}/tokens']):,} tokens), next-token accuracy {100 * m[f'{split}/token_acc']:.2f}%")
            if f"{split}/kl" in m:
                line += (f"; against the uncompressed model: KL {m[f'{split}/kl']:.4f} nats/token, top-1 agreement "
                         f"{100 * m[f'{split}/top1_agreement']:.2f}%")
            console.print(line)
    if "model/macs_per_token/prefill" in m:
        context = m["llm/context_tokens"]
        console.print(f"MACs per token: {m['model/macs_per_token/prefill'] / 1e6:,.2f} M prefill (a {context}-token "
                      f"prompt), {m['model/macs_per_token/decode'] / 1e6:,.2f} M decode (at {context} tokens of "
                      f"context); weights {m.get('model/weight_bytes', 0) / 2**20:,.1f} MiB stored")
        rows = [k.removeprefix("sim_tokens_per_s/").removesuffix("/decode") for k in m
                if k.startswith("sim_tokens_per_s/") and k.endswith("/decode")]
        table = Table(title="tokens per second, batch 1 (simulated per profile; measured on this host)",
                      title_justify="left")
        for col in ("hardware", "prefill", "decode", "decode ms/token"):
            table.add_column(col, justify="left" if col == "hardware" else "right")
        for name in rows:
            table.add_row(name, _number(m[f"sim_tokens_per_s/{name}/prefill"], 1),
                          _number(m[f"sim_tokens_per_s/{name}/decode"], 1),
                          _number(m[f"latency_sim_ms/{name}/decode_token"], 3))
        if "host_tokens_per_s/decode" in m:
            table.add_row(f"measured on this host ({m['latency_host/threads']} threads)",
                          _number(m["host_tokens_per_s/prefill"], 1), _number(m["host_tokens_per_s/decode"], 1),
                          _number(m["latency_host_ms/decode_token"], 3))
        console.print(table)
        if m.get("latency_host/quantized_layers_run_as"):
            console.print(f"(the host ran the quantized layers as {m['latency_host/quantized_layers_run_as']})")
    if "int8_host/int8_decode_ms" in m:
        console.print(
            f"int8 kernels on the host ({m['int8_host/runtime']}, {m['int8_host/layers']} layers): decode "
            f"{m['int8_host/decode_tokens_per_s']:.1f} tokens/s against {m['int8_host/float_decode_tokens_per_s']:.1f} "
            f"in float ({m['int8_host/speedup/decode']:.2f}x), prefill {m['int8_host/speedup/prefill']:.2f}x; "
            f"perplexity on {m['int8_host/test_windows_tokens']:,} test tokens {m['int8_host/test_windows_ppl']:.3f} "
            f"(fake-quantized {m['int8_host/fake_quant_test_windows_ppl']:.3f})")


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout, highlight=False,
                                 width=None if sys.stdout.isatty() else 120)
    c = results["choices"]
    title = (f"compress-run: method={c.get('method')} model={c.get('model')} dataset={c.get('dataset')} "
             f"schedule={c.get('schedule')}")
    console.print(title)
    table = Table()
    language_model = "test/ppl" in results["metrics"]
    columns = ("test ppl", "ood ppl", "test KL") if language_model else ("val acc", "test acc")
    for col in ("stage", "status", "wall time", *columns, "sparsity"):
        table.add_column(col, justify="left" if col in ("stage", "status") else "right")
    for stage, rec in results["stages"].items():
        m = rec.get("metrics", {})
        status = rec["status"] if rec["status"] == "done" else f"skipped ({rec.get('reason', '')})"
        scores = (_number(m.get("test/ppl")), _number(m.get("ood/ppl")), _number(m.get("test/kl"), 4)) \
            if language_model else (_fmt(m.get("val/acc"), True), _fmt(m.get("test/acc"), True))
        table.add_row(stage, status, _fmt(rec.get("wall_s")), *scores, _fmt(m.get("model/prunable_sparsity"), True))
    console.print(table)
    m = results["metrics"]
    if language_model:
        print_language_model(m, console)
    if "model/params_dense" in m:
        console.print(f"params: {m['model/params_dense']:,} dense, {m['model/params_nonzero']:,} non-zero "
                      f"(model sparsity {100 * m['model/sparsity']:.2f}%, prunable-layer sparsity "
                      f"{100 * m['model/prunable_sparsity']:.2f}%)")
    if "model/params_original" in m:
        console.print(f"restructured (compacted or factorized): {m['model/params_dense']:,} params stored, "
                      f"{m['model/params_original']:,} in the original network "
                      f"({100 * m['model/params_reduction']:.2f}% fewer)")
    kernels = [row["kernel"] for row in results.get("kernels_per_layer", {}).values()]
    if kernels:
        counts = ", ".join(f"{kernels.count(k)} {k}" for k in sorted(set(kernels)))
        console.print(f"host kernels (fastest measured per masked layer): {counts}")
    if "model/macs_dense" in m and not language_model:
        dense, effective = m["model/macs_dense"], m["model/macs_effective"]
        console.print(f"MACs (batch 1): {dense / 1e6:,.2f} M dense, {effective / 1e6:,.2f} M effective "
                      f"({dense / max(effective, 1):.2f}x fewer; FLOPs = 2 x MACs)")
        print_hardware_table(m, console)
    if "int8_host/test/acc" in m:
        line = (f"int8 on the host ({m['int8_host/runtime']}): test acc {100 * m['int8_host/test/acc']:.2f}%, "
                f"same class as the evaluated network on {100 * m['int8_host/agreement']:.2f}% of "
                f"{m['int8_host/test_images']:,} test images")
        if "int8_host/latency_ms/b1" in m:
            line += (f"; batch 1 {m['int8_host/latency_ms/b1']:.3f} ms against "
                     f"{m['int8_host/float_latency_ms/b1']:.3f} ms for the float graph "
                     f"({m['int8_host/speedup/b1']:.2f}x)")
        console.print(line)
    if "latency_deploy_ms/b1" in m:
        line = f"deployed ({m['latency_deploy/runtime']}): batch 1 {m['latency_deploy_ms/b1']:.3f} ms"
        if "latency_deploy/speedup_over_eager/b1" in m:
            line += f", {m['latency_deploy/speedup_over_eager/b1']:.2f}x the eager PyTorch speed"
        console.print(line)
    elif "latency_deploy/skipped" in m:
        console.print(f"deployed latency not measured: {m['latency_deploy/skipped']}")
    if results.get("noise", {}).get("curve"):
        print_noise_curve(results["noise"], console)
    console.print(f"results: {Path(results['output_dir']) / 'results.json'}")


def print_noise_curve(noise: dict[str, Any], console: Console) -> None:
    """Test top-1 under noise: one row per SNR, one column per vote count (a language model: its perplexities)."""
    curve = noise["curve"]
    language = "test_ppl" in curve[0]
    votes = sorted({row["votes"] for row in curve})
    model = noise["model"]
    parts = [f"{model['site']} noise", *([f"weight noise {model['weight_noise']:g}"] if model["weight_noise"] else []),
             *(f"{k.split('_')[0].upper()} {model[k]} bits" for k in ("dac_bits", "adc_bits") if model[k] is not None)]
    if language:
        table = Table(title=f"perplexity under noise ({', '.join(parts)}; one pass)", title_justify="left")
        splits = [key for key in ("test_ppl", "ood_ppl") if key in curve[0]]
        for col in ("SNR (dB)", *(key.replace("_ppl", " perplexity") for key in splits)):
            table.add_column(col, justify="right")
        for row in curve:
            table.add_row(f"{row['snr_db']:g}", *(_number(row[key]) for key in splits))
        console.print(table)
        return
    table = Table(title=f"test top-1 under noise ({', '.join(parts)}; {curve[0]['rule']} vote of K passes)",
                  title_justify="left")
    for col in ("SNR (dB)", *(f"K={k}" for k in votes), "single pass (mean ± std)"):
        table.add_column(col, justify="right")
    for snr in dict.fromkeys(row["snr_db"] for row in curve):
        rows = {row["votes"]: row for row in curve if row["snr_db"] == snr}
        first = next(iter(rows.values()))
        single = f"{100 * first['pass_top1_mean']:.2f} ± {100 * first['pass_top1_std']:.2f}%" \
            if first["passes_run"] > 1 else "-"
        table.add_row(f"{snr:g}", *(_fmt(rows[k]["top1"], True) for k in votes), single)
    console.print(table)
