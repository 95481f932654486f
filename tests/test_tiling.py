"""Tests for useg.tiling: tile placement and mirrored borders, the grid both strategies share."""

from __future__ import annotations

import numpy as np
import pytest

from useg.tiling import mirror_indices, tile_starts

# ----------------------------------------------------------------------------- tile_starts


@pytest.mark.parametrize(
    "size,tile,step,expected",
    [
        (10, 10, 5, [0]),
        (7, 10, 5, [0]),
        (1, 1, 1, [0]),
        (11, 10, 5, [0, 1]),
        (20, 10, 5, [0, 5, 10]),
        (20, 10, 10, [0, 10]),
        (21, 10, 10, [0, 6, 11]),
        (5, 1, 1, [0, 1, 2, 3, 4]),
        (100, 7, 3, None),
    ],
)
def test_tile_starts(size, tile, step, expected):
    starts = tile_starts(size, tile, step)
    if expected is not None:
        assert starts == expected
    assert starts[0] == 0
    assert starts[-1] == max(0, size - tile)
    gaps = np.diff(starts)
    assert np.all(gaps >= 1) and np.all(gaps <= step)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


@pytest.mark.parametrize("args", [(0, 4, 2), (10, 0, 2), (10, 4, 0), (10, 4.5, 2), (10, 4, 5)])
def test_tile_starts_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        tile_starts(*args)


# Outputs of tile_starts(size, tile, step) recorded before ``align`` existed: align=1 must keep them.
OLD_STARTS = [
    ((100, 7, 3), list(range(0, 94, 3))),
    ((37, 16, 8), [0, 7, 14, 21]),
    ((53, 24, 12), [0, 10, 19, 29]),
    ((97, 48, 48), [0, 25, 49]),
    ((200, 64, 32), [0, 27, 54, 82, 109, 136]),
    ((31, 12, 9), [0, 6, 13, 19]),
    ((130, 48, 24), [0, 21, 41, 62, 82]),
    ((1000, 48, 24), [0, 24, 48, 71, 95, 119, 143, 167, 190, 214, 238, 262, 286, 309, 333, 357, 381, 405,
                      428, 452, 476, 500, 524, 547, 571, 595, 619, 643, 666, 690, 714, 738, 762, 785, 809,
                      833, 857, 881, 904, 928, 952]),
]


@pytest.mark.parametrize("args,expected", OLD_STARTS)
def test_tile_starts_align_1_is_the_old_even_spread(args, expected):
    assert tile_starts(*args) == expected
    assert tile_starts(*args, align=1) == expected


@pytest.mark.parametrize("align", [2, 3, 4, 8, 16])
def test_tile_starts_aligned_properties(align):
    for size in range(1, 90, 3):
        for tile in range(align, 40, 5):
            for step in sorted({1, align, max(1, tile // 2), max(1, (3 * tile) // 4), tile}):
                starts = tile_starts(size, tile, step, align)
                assert starts[0] == 0 and starts[-1] == max(0, size - tile)
                assert all(s % align == 0 for s in starts[:-1]), (size, tile, step, starts)
                gaps = np.diff(starts)
                # step < align cannot be met by aligned starts: the densest aligned spacing is used
                assert np.all(gaps >= 1) and np.all(gaps <= max(step, align)), (size, tile, step, starts)
                covered = np.zeros(size, bool)
                for s in starts:
                    covered[s : s + tile] = True
                assert covered.all()
                if step >= align:  # no more windows than the aligned spacing requires
                    assert len(starts) <= len(tile_starts(size, tile, step // align * align)) + 1


@pytest.mark.parametrize(
    "args,expected",
    [
        ((130, 48, 24, 16), [0, 16, 32, 48, 64, 82]),  # step 24 -> aligned gaps of 16
        ((200, 64, 32, 16), [0, 32, 64, 80, 112, 136]),
        ((97, 48, 48, 16), [0, 32, 49]),
        ((60, 16, 8, 4), [0, 8, 16, 20, 28, 36, 44]),  # as many windows as unaligned
        ((100, 64, 6, 16), [0, 16, 32, 36]),  # step < align: gaps of align
        ((40, 64, 32, 16), [0]),  # tile >= size
        ((40, 8, 8, 8), [0, 8, 16, 24, 32]),  # the flush start happens to be aligned
    ],
)
def test_tile_starts_aligned_examples(args, expected):
    assert tile_starts(*args[:3], align=args[3]) == expected


@pytest.mark.parametrize("kwargs", [{"align": 0}, {"align": -4}, {"align": 2.5}, {"align": 32}])
def test_tile_starts_rejects_bad_align(kwargs):
    with pytest.raises(ValueError):
        tile_starts(100, 16, 8, **kwargs)  # align 32 > tile 16 would leave holes


# ----------------------------------------------------------------------------- mirror_indices


@pytest.mark.parametrize("size", [2, 3, 5])
@pytest.mark.parametrize("pad", [1, 4, 11])
def test_mirror_indices_match_numpy_reflect(size, pad):
    x = np.arange(size)
    expected = np.pad(x, pad, mode="reflect")
    np.testing.assert_array_equal(x[mirror_indices(-pad, size + 2 * pad, size)], expected)


def test_mirror_indices_single_voxel_is_edge():
    np.testing.assert_array_equal(mirror_indices(-3, 7, 1), np.zeros(7))
