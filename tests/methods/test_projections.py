"""Pattern projections: every output passes its pattern's checker on random weights of many shapes
(N:M exactly N per group of M, block whole blocks, gather-scatter equal per-row and per-bank counts in
every row group, filter/channel whole rows/input channels), the checker catches violations, and pattern
specs parse or fail with the accepted forms."""

from __future__ import annotations

import pytest
import torch

from compress_run.methods.projections import (
    as_matrix,
    check_gather_scatter,
    fixed_density,
    from_matrix,
    parse_pattern,
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
