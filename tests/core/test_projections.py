"""Pattern projections: every output passes its pattern's checker on random weights of many shapes
(N:M exactly N per group of M, block whole blocks, gather-scatter equal per-row and per-bank counts in
every row group, filter/channel whole rows/input channels), the checker catches violations, and pattern
specs parse or fail with the accepted forms."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.projections import (
    as_matrix,
    check_gather_scatter,
    fixed_density,
    from_matrix,
    parse_pattern,
    pattern_shape_problem,
    project,
)

SHAPES = [(16, 16), (32, 48), (30, 70), (64, 16, 3, 3), (48, 32, 3, 3), (17, 5), (64, 27), (96, 40, 1, 1)]


def _scores(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).abs()


@pytest.mark.parametrize("shape", SHAPES)
def test_matrix_view_round_trips(shape):
    t = torch.randn(shape)
    assert torch.equal(from_matrix(as_matrix(t), t.shape), t)
    if len(shape) == 4:  # input channel fastest along a row
        assert torch.equal(as_matrix(t)[0, : shape[1]], t[0, :, 0, 0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_exactly_the_n_largest_of_every_m(shape, n, m):
    scores = _scores(shape)
    mask = project(f"nm:{n}:{m}", scores, 0.123)  # the requested density is ignored
    matrix, kept = as_matrix(scores), as_matrix(mask)
    for start in range(0, matrix.shape[1], m):
        group_scores, group_kept = matrix[:, start:start + m], kept[:, start:start + m]
        assert (group_kept.sum(1) == min(n, group_scores.shape[1])).all()
        smallest_kept = torch.where(group_kept, group_scores, torch.inf).min(1).values
        largest_dropped = torch.where(group_kept, -torch.inf, group_scores).max(1).values
        assert (smallest_kept >= largest_dropped).all()
    assert fixed_density(f"nm:{n}:{m}") == n / m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r,c", [(4, 4), (1, 4), (16, 16)])
@pytest.mark.parametrize("density", [0.5, 0.1])
def test_block_keeps_whole_blocks(shape, r, c, density):
    scores = _scores(shape)
    matrix = as_matrix(project(f"block:{r}:{c}", scores, density)).float()
    rows, cols = matrix.shape
    blocks = []
    for i in range(0, rows, r):
        for j in range(0, cols, c):
            tile = matrix[i:i + r, j:j + c]
            assert tile.min() == tile.max()  # all kept or all pruned
            blocks.append(tile[0, 0].item())
    assert sum(blocks) == round(density * len(blocks))


def test_block_mean_scores_partial_edge_blocks_fairly():
    scores = torch.ones(5, 8)
    scores[4] = 3.0  # a 1-row edge block of 4 x 4 blocks: sum 12 < full block's 16, mean 3 > 1
    mean_mask = project("block:4:4:mean", scores, 0.5)  # 2 of the 4 blocks: both edge blocks
    assert mean_mask[4].all() and not mean_mask[:4].any()
    assert not project("block:4:4", scores, 0.5)[4].any()


@pytest.mark.parametrize("shape", [(16, 16), (32, 48), (30, 70), (64, 16, 3, 3), (48, 32, 3, 3), (64, 27),
                                   (128, 64, 3, 3), (20, 200)])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05, 0.02])
@pytest.mark.parametrize("banks,elems", [(16, 1), (16, 4), (8, 2)])
def test_gather_scatter_output_passes_the_checker(shape, density, banks, elems):
    scores = _scores(shape, seed=hash((shape, density)) % 1000)
    mask = project(f"gather_scatter:{banks}:{elems}", scores, density)
    assert check_gather_scatter(mask, banks, elems) == []
    if shape[0] % (banks // elems) == 0 and as_matrix(scores).shape[1] % banks == 0:
        assert abs(mask.float().mean().item() - density) <= banks / as_matrix(scores).shape[1] + 1e-6


def test_gather_scatter_prefers_large_entries_and_checker_catches_violations():
    scores = _scores((32, 64))
    mask = project("gather_scatter:16", scores, 0.25)
    kept, dropped = scores[mask], scores[~mask]
    assert kept.mean() > dropped.mean() * 2
    broken = mask.clone()
    row, col = torch.nonzero(broken)[0]
    broken[row, col] = False  # one row and one bank now short by one
    problems = check_gather_scatter(broken, 16, 1)
    assert any("row counts" in p for p in problems) and any("bank counts" in p for p in problems)


def test_gather_scatter_holds_on_the_rows_after_the_last_full_group():
    scores = _scores((40, 64))                 # 2 full groups of 16 rows + a partial group of 8
    mask = project("gather_scatter:16", scores, 0.25)
    assert check_gather_scatter(mask, 16, 1) == []
    tail = mask[32:]
    assert (tail.sum(1) == tail.sum(1)[0]).all() and tail.any()    # equal counts, not an irregular tail
    broken = mask.clone()
    row, col = torch.nonzero(broken[32:])[0]
    broken[32 + row, col] = False
    assert check_gather_scatter(broken, 16, 1)                     # the partial group is checked too


def test_gather_scatter_meets_the_density_when_columns_are_not_a_multiple_of_the_banks():
    mask = project("gather_scatter:16", _scores((64, 27)), 0.5)  # the 64x27 layer ended at 0.19
    assert check_gather_scatter(mask, 16, 1) == []
    assert abs(mask.float().mean().item() - 0.5) <= 0.01


def _zoo_shapes(models: list[str]) -> list[tuple[int, ...]]:
    from hydra.utils import instantiate

    from tests.conftest import compose

    shapes = set()
    for model in models:
        cfg, _ = compose([f"model={model}"])
        net = instantiate(cfg.model)
        shapes |= {tuple(m.weight.shape) for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    return sorted(shapes)


def _check_zoo(models: list[str], densities: tuple[float, ...]) -> None:
    checked = refused = 0
    for shape in _zoo_shapes(models):
        for density in densities:
            problem = pattern_shape_problem("gather_scatter:16", shape, density)
            if problem:  # refused loudly, never projected quietly into something else
                refused += 1
                if "columns (C_in" in problem:
                    with pytest.raises(ValueError, match="cannot hold the pattern"):
                        project("gather_scatter:16", torch.rand(shape), density)
                continue
            mask = project("gather_scatter:16", torch.rand(shape), density)
            assert check_gather_scatter(mask, 16, 1) == [], shape
            assert abs(mask.float().mean().item() - density) <= 0.01, (shape, density)
            checked += 1
    assert checked > 10


def test_gather_scatter_on_every_layer_of_the_small_zoo_models_at_90_percent():
    _check_zoo(["resnet20", "resnet56", "mobilenet_v2", "deit_tiny"], (0.1,))


@pytest.mark.slow
def test_gather_scatter_on_every_layer_of_every_zoo_model():
    _check_zoo(["resnet20", "resnet32", "resnet56", "vgg16_bn", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
                "resnet101", "deit_tiny", "deit_small", "deit_base"], (0.5, 0.1))


def test_tiled_gather_scatter_groups_rows_by_need_and_keeps_more_of_the_score():
    torch.manual_seed(0)
    scale = torch.rand(64, 1) ** 4 * 10           # rows of very different magnitude, interleaved
    scores = (torch.rand(64, 96) * scale).abs()
    plain = project("gather_scatter:16", scores, 0.2)
    tiled = project("gather_scatter:16:1:64", scores, 0.2)
    assert check_gather_scatter(tiled, 16, 1, tile=64) == [] and int(tiled.sum()) == int(plain.sum())
    assert check_gather_scatter(tiled, 16, 1) != []  # its groups are not the consecutive ones
    assert (scores * tiled).sum() > (scores * plain).sum()
    with pytest.raises(ValueError, match="multiple of B/E"):
        parse_pattern("gather_scatter:16:1:24")


@pytest.mark.parametrize("shape", [(64, 16, 3, 3), (32, 48)])
def test_filter_and_channel_keep_whole_rows_and_input_channels(shape):
    scores = _scores(shape)
    filters = project("filter", scores, 0.25)
    per_filter = filters.reshape(shape[0], -1)
    assert ((per_filter.all(1)) | (~per_filter.any(1))).all() and per_filter.all(1).sum() == round(0.25 * shape[0])
    channels = project("channel", scores, 0.5)
    per_channel = channels.transpose(0, 1).reshape(shape[1], -1)
    assert ((per_channel.all(1)) | (~per_channel.any(1))).all() and per_channel.all(1).sum() == round(0.5 * shape[1])


@pytest.mark.parametrize("spec,message", [("nm:5:4", "0 < N <= M"), ("diagonal", "unknown pattern"),
                                          ("block:4:x", "arguments must be"), ("gather_scatter:16:3", "E dividing B"),
                                          ("irregular:1", "at most 0")])
def test_bad_pattern_specs_name_the_accepted_forms(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(spec)


def test_pattern_is_a_method_config_choice(tmp_path):
    from tests.conftest import run_pipeline

    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=magnitude",
                            "method.sparsity=0.5", "method.pattern=nm:2:4", "evaluate.measure_latency=false"],
                           tmp_path)
    assert results["metrics"]["model/prunable_sparsity"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(Exception, match="N:M fixes the sparsity"):
        run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=magnitude", "method.sparsity=0.9",
                      "method.pattern=nm:2:4"], tmp_path / "bad")
