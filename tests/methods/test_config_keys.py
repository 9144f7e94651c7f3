"""Every config key of every method changes what a run computes: flipping it (in a context where it applies)
changes the trained network or what the evaluate stage reports. A key whose effect needs more than one run
is covered by a named test instead (checked to exist). A key that changed nothing would be a dead knob."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY_LLM, run_pipeline, write_text_corpus
from tests.pipeline.test_adding_a_method import TOY_METHOD

BASE = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false", "evaluate.kernels=simulated",
        "model.width_mult=0.5"]
VIT = ["model=vit_fmnist", "model.embed_dim=64", "model.num_heads=2", "model.depth=2", "model.patch_size=2"]

COMMON = {"sparsity": "0.7", "distribution": "global", "pattern": "block:4:4", "exclude": "[classifier]",
          "mask_grads": "false"}
# key -> (flipped value, context overrides applied to the baseline and the flipped run alike)
FLIPS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "admm": {"rho": ("0.1", []), "update_epochs": ("2", []), "start_epoch": ("1", [])},
    "chex": {"sparsity": ("0.3", []), "target": ("flops", []), "flops_reduction": ("0.3", ["method.target=flops"]),
             "delta0": ("0.1", []), "delta_t_epochs": ("1", ["schedule.train.epochs=4"]),
             "t_max_fraction": ("0.5", ["schedule.train.epochs=4"]), "min_channels": ("3", ["method.sparsity=0.9"]),
             "channel_multiple": ("4", []), "prune_residual": ("false", []), "exclude": ("[layer1.0.conv1]", [])},
    "comcat": {"params_reduction": ("0.65", []), "search_epochs": ("3", []), "search_fraction": ("0.5", []),
               "train_fraction": ("0.5", []), "tau_start": ("1.0", []), "tau_end": ("1.0", ["method.search_epochs=3"]),
               "params_exponent": ("4.0", ["method.params_reduction=0.65"]), "arch_lr": ("0.3", []),
               "arch_weight_decay": ("0.5", []),
               "weight_lr": ("0.01", []), "weight_decay": ("0.0", []), "block_weight": ("0.0", []),
               "align_blocks": ("[0]", []), "attn_ranks": ("[32,64]", []), "mlp_ranks": ("[16,64]", [])},
    "elrt": {"target": ("ratio", []), "rank_ratio": ("0.25", ["method.target=ratio"]),
             "flops_reduction": ("0.5", []), "ortho_weight": ("1.0", []), "orthogonal_init": ("false", []),
             "exclude": ("[classifier]", []), "min_rank": ("6", ["method.flops_reduction=0.55"])},
    "gap": {"variant": ("random", []), "num_partitions": ("2", []),
            "partitioner": ("by_stage", ["method.num_partitions=3"]), "rounds": ("2", []),
            "reset_optimizer_each_step": ("false", [])},
    "gmp": {"start_epoch": ("0.5", ["method.frequency=1"]), "end_epoch": ("1.0", ["method.frequency=1"]),
            "frequency": ("1", [])},
    # 8x8 digits at width 0.5: only the mobile core at batch >= 64 has Tucker-2 ranks faster than dense
    "haloc": {"latency_fraction": ("0.9", []), "latency_source": ("simulated", []),
              "hardware": ("host_cpu", ["method.latency_source=simulated", "method.lut_batch=1024",
                                        "method.latency_fraction=0.95"]), "granularity": ("8", []),
              "search_epochs": ("0.5", []), "lut_batch": ("1024", ["method.latency_source=simulated"]),
              "tau_start": ("1.0", []), "tau_end": ("1.0", []), "latency_exponent": ("4.0", []),
              "feature_weight": ("0.0", []), "weight_lr": ("0.1", []), "arch_lr": ("0.3", []),
              "exclude": ("[first_conv,classifier,layer3.0.conv1]", [])},
    "l1_filter": {"sparsity": ("0.3", []), "target": ("flops", []), "flops_reduction": ("0.3", ["method.target=flops"]),
                  "min_channels": ("3", ["method.sparsity=0.9"]), "channel_multiple": ("3", []),
                  "prune_residual": ("false", []), "exclude": ("[layer1.0.conv1]", [])},
    "lth": {"protocol": ("oneshot", []), "prune_rate": ("0.3", []), "rewind_epoch": ("1", []),
            "init": ("trained", []), "distribution": ("uniform", [])},
    "mest": {"mode": ("em", []), "update_every": ("2", []), "distribution": ("erk", []),
             "grad_coefficient": ("10.0", []),
             "phase_epochs": ("[1,1]", ["method.update_every=1"]),
             "prune_to": ("[0.95,0.93,0.9]", ["method.update_every=1"]),
             "grow_to": ("[0.8,0.85,0.9]", ["method.update_every=1"]),
             "remove_n": ("200", ["method.remove_data_epoch=1"]),
             "remove_data_epoch": ("2", ["method.remove_n=200", "schedule.train.epochs=3"])},
    "multilevel": {"levels": ("[0.9,0.8]", []), "per_level_bn": ("false", []),
                   "segments": ("['layer1.*','layer[23].*']", []),
                   "pattern": ("block:4:4", [])},
    "reweighted": {"reg_lambda": ("0.01", []), "eps": ("0.1", []), "reweight_epochs": ("2", []), "norm": ("l1", [])},
    "rigl": {"delta_t": ("1", []), "alpha": ("0.6", ["method.delta_t=1"]),
             "end_fraction": ("0.3", ["method.delta_t=1"])},
    "svd": {"form": ("spatial", []), "target": ("energy", []), "energy": ("0.5", ["method.target=energy"]),
            "flops_reduction": ("0.3", []), "include_linear": ("true", ["method.exclude=[first_conv]"]),
            "exclude": ("[classifier]", []), "min_rank": ("6", ["method.flops_reduction=0.4"]),
            "skip_slower": ("true", ["method.target=energy"])},
    "trp": {"form": ("spatial", []), "target": ("flops", []), "energy": ("0.5", []),
            "flops_reduction": ("0.3", ["method.target=flops"]),
            "include_linear": ("true", ["method.exclude=[first_conv]"]), "exclude": ("[classifier]", []),
            "min_rank": ("6", ["method.target=flops", "method.flops_reduction=0.4"]), "period": ("1", []),
            "skip_slower": ("true", []),
            "nuclear_weight": ("0.1", [])},
}
MASK_METHODS = ("admm", "gap", "gmp", "lth", "magnitude", "mest", "multilevel", "reweighted", "rigl")
CONTEXT = {"mask_grads": ["trainer.gradient_clip_val=0.05"],  # masked gradients count in the clipped norm
           "pattern": ["method.sparsity=0.75"]}
METHOD_CONTEXT = {"comcat": [*VIT, "method.search_fraction=0.25", "method.train_fraction=0.25"],
                  "evit": [*VIT, "schedule.train.epochs=3"],
                  "spvit": [*VIT[:3], "model.depth=4", VIT[4]],
                  "freq_select": ["dataset.input_domain=dct", "dataset.dct_block=4", "method.calib_size=64"],
                  "haloc": ["method.granularity=4", "method.latency_source=macs", "method.hardware=mobile_a78",
                            "method.lut_batch=256", "method.search_epochs=0.25"],
                  "mest": ["method.update_every=1"], "rigl": ["method.delta_t=2"], "multilevel": [],
                  "lth": ["method.sparsity=0.5", "schedule.finetune.epochs=2"],
                  "rd": ["method.calib_size=16", "method.levels=5"],
                  "lpvit": ["model=vit_fmnist", "model.embed_dim=32", "model.num_heads=2", "model.depth=2",
                            "model.patch_size=2", "method.calib_size=32", "method.block=[16,16]"]}
# keys whose effect needs another run first (a ticket, a worker's round), each covered by the named test
COVERED_ELSEWHERE = {
    ("lth", "ticket"):
        "tests/methods/test_lth.py::test_imp_random_reinit_control_trains_the_tickets_masks_at_every_round",
    ("gap", "worker"): "tests/pipeline/test_pgap_jobs.py::test_pgap_jobs_merge_partition_i_from_worker_i",
    ("comcat", "factorize_head"): "tests/methods/test_comcat.py::test_head_is_factorized_when_it_has_rank_candidates",
    ("comcat", "head_ranks"): "tests/methods/test_comcat.py::test_head_is_factorized_when_it_has_rank_candidates",
    ("comcat", "finetune_block_weight"):
        "tests/methods/test_comcat.py::test_finetune_aligns_blocks_with_its_teacher_at_the_released_constant_weight",
    # speed and memory knobs that must *not* change the result: the test checks the curves are the same
    ("rd", "workers"): "tests/methods/test_rd.py::test_worst_case_curves_are_the_measured_worst_sample_mse",
    ("rd", "calib_batch_size"): "tests/methods/test_rd.py::test_worst_case_curves_are_the_measured_worst_sample_mse",
}


def method_test_flips(method: str) -> dict[str, tuple[str, list[str]]]:
    """``CONFIG_FLIPS`` of the method's own test module (tests/methods/test_<method>.py), if it has one."""
    path = REPO / "tests" / "methods" / f"test_{method}.py"
    if not path.is_file() or "CONFIG_FLIPS" not in path.read_text():
        return {}
    return dict(importlib.import_module(f"tests.methods.test_{method}").CONFIG_FLIPS)


def method_keys() -> list[tuple[str, str]]:
    """(method, key) for every key of every method's config class (the one place its keys are defined)."""
    import dataclasses

    from compress_run.pipeline.schema import method_schemas

    schemas = method_schemas()
    keys = []
    for path in sorted((REPO / "conf" / "method").glob("*.yaml")):
        if path.stem == TOY_METHOD:  # written and removed by that test while this one may run beside it
            continue
        schema = schemas[f"base_method_{path.stem}"]
        keys += [(path.stem, f.name) for f in dataclasses.fields(schema) if f.name != "_target_"]
    return keys


def flip_of(method: str, key: str) -> tuple[str, list[str]]:
    own = method_test_flips(method)
    if key in own:
        return own[key]
    if key in FLIPS.get(method, {}):
        return FLIPS[method][key]
    if key in COMMON and method in MASK_METHODS:
        return COMMON[key], CONTEXT.get(key, [])
    raise KeyError(f"no flip for {method}.{key}: add one to FLIPS (or COVERED_ELSEWHERE with a test)")


def test_every_key_has_a_flip_or_a_covering_test():
    for method, key in method_keys():
        if (method, key) in COVERED_ELSEWHERE:
            path, _, name = COVERED_ELSEWHERE[method, key].partition("::")
            assert f"def {name}(" in (REPO / path).read_text(), COVERED_ELSEWHERE[method, key]
        else:
            flip_of(method, key)  # raises for a key nobody checks


def outcome(overrides: list[str], out: Path) -> str:
    """A digest of what a run produced: the last stage's network (weights, masks, shapes) and the levels."""
    results = run_pipeline(overrides, out)
    digest = hashlib.sha256()
    stages = [s for s in ("quantize", "finetune", "compress", "train") if (out / "checkpoints" / f"{s}.ckpt").is_file()]
    state = torch.load(out / "checkpoints" / f"{stages[0]}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode())
        if torch.is_tensor(value):
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().double().cpu().numpy().round(7).tobytes())
    digest.update(repr([m.get("test/acc") for m in results.get("level_mixes", [])]).encode())
    digest.update(json.dumps(method_report(results), sort_keys=True, default=str).encode())
    quant_config = results.get("config", {}).get("quant") or {}
    quant = {k: v for k, v in results.get("quant", {}).items() if k not in quant_config and k != "resolved"}
    digest.update(json.dumps(quant, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def method_report(results: dict) -> dict:
    """What the method reported about its work (search trajectories, LUTs, chosen ranks), without the echo
    of its own config and of schedule values (a search's temperature): a knob that changes a search's
    course is live even when a smoke-scale search ends on the same choice."""
    config = results.get("config", {}).get("method", {})
    report = {k: v for k, v in results.get("method", {}).items() if k not in config and not k.startswith("target")}
    # and what it measured on the finished network (Method.network_metrics: metrics method/<key>)
    report.update({k: v for k, v in results.get("metrics", {}).items() if k.startswith("method/")})
    for key, value in report.items():
        if "history" in key and isinstance(value, list):
            report[key] = [{k: v for k, v in row.items() if k not in ("tau", "step", "epoch")}
                           if isinstance(row, dict) else row for row in value]
    return report


_BASELINES: dict[tuple[str, ...], str] = {}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "key"), [k for k in method_keys() if k not in COVERED_ELSEWHERE],
                         ids=[f"{m}.{k}" for m, k in method_keys() if (m, k) not in COVERED_ELSEWHERE])
def test_flipping_a_key_changes_the_run(tmp_path, method, key):
    value, context = flip_of(method, key)
    common = [*BASE, f"method={method}", *METHOD_CONTEXT.get(method, []), *context]
    if method in ("comcat", "evit", "lpvit", "spvit"):  # ViTs: the context sets their width
        common.remove("model.width_mult=0.5")
    cache_key = tuple(common)
    if cache_key not in _BASELINES:
        _BASELINES[cache_key] = outcome(common, tmp_path / "base")
    flipped = outcome([*common, f"method.{key}={value}"], tmp_path / "flipped")
    assert flipped != _BASELINES[cache_key], f"method.{key}={value} changed nothing (with {context}): a dead knob"


def _doc(method: str) -> str:
    target = OmegaConf.load(REPO / "conf" / "method" / f"{method}.yaml")["_target_"]
    return importlib.import_module(target.rsplit(".", 1)[0]).__doc__ or ""


def test_method_modules_document_every_key():
    import re

    for method, key in method_keys():
        doc = _doc(method)
        # keys a docstring inherits: "as for ``magnitude``", "besides those of ``svd``"
        docs = [doc] + [_doc(other) for other in re.findall(r"(?:as for|besides those of) ``(\w+)``", doc)]
        assert any(f"``{key}``" in d for d in docs), f"method {method}: key ``{key}`` is not in its module docstring"


def quant_keys() -> list[tuple[str, str]]:
    """(quantizer, key) for every key of every quantizer's config class (schemas base_quant_<name>)."""
    import dataclasses

    from compress_run.pipeline.schema import quant_schemas

    return [(name.removeprefix("base_quant_"), f.name) for name, schema in sorted(quant_schemas().items())
            for f in dataclasses.fields(schema) if f.name != "_target_"]


QUANT_OPTION = {"ptq": "w8a8", "qat": "qat_w8a8", "gptq": "gptq_w4a8"}  # a conf/quant option of each quantizer


LANGUAGE_MODEL_QUANTIZERS = ("gptq",)


@functools.cache
def knob_corpus() -> Path:
    """One small text corpus per test process (the baseline run is cached by its overrides, the root among them)."""
    return write_text_corpus(Path(tempfile.mkdtemp(prefix="knob_corpus_")) / "shakespeare")


def test_every_quant_key_has_a_flip_and_a_docstring_entry():
    for quantizer, key in quant_keys():
        assert key in method_test_flips(quantizer), f"no flip for quant.{key} in tests/methods/test_{quantizer}.py"
        target = OmegaConf.load(REPO / "conf" / "quant" / f"{QUANT_OPTION[quantizer]}.yaml")["_target_"]
        assert f"``{key}``" in importlib.import_module(target.rsplit(".", 1)[0]).__doc__, key


@pytest.mark.slow
@pytest.mark.parametrize(("quantizer", "key"), quant_keys(), ids=[f"{q}.{k}" for q, k in quant_keys()])
def test_flipping_a_quant_key_changes_the_run(tmp_path, quantizer, key):
    value, context = method_test_flips(quantizer)[key]
    # the int8 ONNX Runtime check at evaluate (tests/hardware/test_int8_host.py) is most of a run's time and
    # reads what the quantize stage wrote, which the digest already holds
    base = BASE
    if quantizer in LANGUAGE_MODEL_QUANTIZERS:  # a causal LM on a small corpus (GPTQ quantizes decoder blocks)
        base = [*TINY_LLM, f"dataset.root={knob_corpus()}", "evaluate.measure_latency=false"]
    common = [*base, "evaluate.int8_host=false", "method=dense", f"quant={QUANT_OPTION[quantizer]}", *context]
    cache_key = tuple(common)
    if cache_key not in _BASELINES:
        _BASELINES[cache_key] = outcome(common, tmp_path / "base")
    flipped = outcome([*common, f"quant.{key}={value}"], tmp_path / "flipped")
    assert flipped != _BASELINES[cache_key], f"quant.{key}={value} changed nothing (with {context}): a dead knob"
