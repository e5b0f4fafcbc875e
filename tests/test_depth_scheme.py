"""N:M schemes: candidate enumeration, validation, random masks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from leandit.compress.depth import global_scheme, parse_scheme


def test_one_of_two_candidates_are_each_block_alone():
    scheme = parse_scheme("1:2", 28)
    assert len(scheme.groups) == 14 and scheme.num_kept == 14 and scheme.depth == 28
    assert scheme.groups[3].layers == [6, 7]
    assert torch.equal(scheme.groups[0].candidates(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_two_of_four_candidates_in_lexicographic_order():
    rows = parse_scheme("2:4", 28).groups[0].candidates()
    expected = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert rows.tolist() == expected


def test_seven_of_fourteen_has_every_subset_once():
    scheme = parse_scheme("7:14", 28)
    rows = scheme.groups[1].candidates()
    assert rows.shape == (3432, 14) == (math.comb(14, 7), 14)
    assert torch.all(rows.sum(dim=1) == 7)
    assert len({tuple(r.tolist()) for r in rows}) == 3432
    # Row r is the r-th subset itertools.combinations yields.
    assert [i for i in range(14) if rows[100, i]] == list(list(itertools.combinations(range(14), 7))[100])
    assert scheme.groups[1].start == 14


def test_mixed_groups_cover_the_depth_in_order():
    scheme = parse_scheme("1:2,2:4,1:2,3:4", 12)
    assert [(g.start, g.n, g.m) for g in scheme.groups] == [(0, 1, 2), (2, 2, 4), (6, 1, 2), (8, 3, 4)]
    assert scheme.num_kept == 7 and scheme.num_candidates == 2 * 6 * 2 * 4
    assert str(scheme) == "1:2,2:4,1:2,3:4"
    same = parse_scheme([(1, 2), (2, 4), (1, 2), (3, 4)], 12)
    assert same == scheme
    mask = scheme.mask_from_choices([1, 5, 0, 3])
    assert mask.tolist() == [0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    assert scheme.fits(mask)


@pytest.mark.parametrize(
    "spec, depth, message",
    [
        ("1:3", 28, "28 is not a multiple of 3"),
        ("0:2", 28, "N must be between 1 and M"),
        ("3:2", 28, "N must be between 1 and M"),
        ("1:2,1:2", 6, "the M's must add up to 6"),
        ("one half", 28, "is not N:M"),
        ("14:28", 28, "candidate masks"),
    ],
)
def test_schemes_that_do_not_fit_are_named(spec, depth, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(spec, depth)


def test_random_masks_fit_their_scheme_and_cover_candidates():
    scheme = parse_scheme("2:4,1:2", 6)
    masks = scheme.random_masks(500, torch.Generator().manual_seed(0))
    assert all(scheme.fits(m) for m in masks)
    assert len({tuple(m.tolist()) for m in masks}) == 12  # all 6 x 2 combinations appear
    wide = global_scheme(28, 14)  # 40 million subsets: drawn by permutation
    draws = wide.random_masks(50, torch.Generator().manual_seed(1))
    assert all(wide.fits(m) for m in draws) and len({tuple(m.tolist()) for m in draws}) == 50
    with pytest.raises(ValueError, match="cannot keep 0 of 28"):
        global_scheme(28, 0)
