"""Post-processing of label images: the steps, their JSON, and the choice by Dice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from useg.postprocess import (
    Postprocessing,
    apply_postprocessing,
    choose_postprocessing,
    mean_dice,
    min_sizes_from,
    object_sizes,
)

SHAPES = {2: (13, 17), 3: (7, 9, 11)}  # odd sizes


def _disc(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _label_images(max_label=2):
    shapes = st.sampled_from([(6, 7), (9, 5), (3, 4, 5), (4, 4, 3)])
    return shapes.flatmap(lambda s: arrays(np.int64, s, elements=st.integers(-1, max_label)))


def _postprocessings():
    classes = st.lists(st.integers(1, 2), unique=True, max_size=2).map(tuple)
    sizes = st.dictionaries(st.integers(1, 2), st.integers(1, 6), max_size=2).map(
        lambda d: tuple(sorted(d.items())))
    return st.builds(Postprocessing, largest_foreground=st.booleans(), largest_classes=classes,
                     min_sizes=sizes, connectivity=st.sampled_from([None, 1, 2]))


@settings(max_examples=80, deadline=None)
@given(_label_images(), _postprocessings())
def test_steps_only_remove_foreground_and_leave_ignore_alone(labels, pp):
    out = apply_postprocessing(labels, pp)
    assert out.shape == labels.shape and out.dtype == labels.dtype
    changed = out != labels
    assert np.all(out[changed] == 0)  # removed pixels become background, nothing is added
    assert np.all(labels[changed] > 0)  # only foreground is removed: background and IGNORE stay
    assert np.array_equal(apply_postprocessing(labels, Postprocessing()), labels)  # no step: identity


@settings(max_examples=60, deadline=None)
@given(_label_images(), st.sampled_from([None, 1]))
def test_largest_component_leaves_one_and_is_idempotent(labels, connectivity):
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity or labels.ndim)
    for pp, masks in ((Postprocessing(largest_foreground=True, connectivity=connectivity), lambda a: [a > 0]),
                      (Postprocessing(largest_classes=(1, 2), connectivity=connectivity),
                       lambda a: [a == 1, a == 2])):
        out = apply_postprocessing(labels, pp)
        for before, after in zip(masks(labels), masks(out), strict=True):
            assert ndimage.label(after, structure=structure)[1] == min(1, before.sum())
            if before.any():  # the kept component is one of the largest
                sizes = np.bincount(ndimage.label(before, structure=structure)[0].ravel())[1:]
                assert after.sum() == sizes.max()
        assert np.array_equal(apply_postprocessing(out, pp), out)
    # together they are not idempotent: removing a class's small parts can split the foreground
    both = Postprocessing(largest_foreground=True, largest_classes=(1, 2))
    once = apply_postprocessing(np.array([[1, 1, 1, 2, 1, 2, 2]]), both)
    assert once.tolist() == [[1, 1, 1, 0, 0, 2, 2]]  # applied once, as chosen and as predict does
    assert apply_postprocessing(once, both).tolist() == [[1, 1, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("dims", [2, 3])
def test_largest_component_of_one_object_is_the_identity(dims):
    shape = SHAPES[dims]
    labels = np.zeros(shape, np.int64)
    labels[_disc(shape, [s // 2 for s in shape], 3)] = 1
    labels[_disc(shape, [s // 2 for s in shape], 1)] = 2  # two classes, one object of foreground
    pp = Postprocessing(largest_foreground=True, largest_classes=(1, 2))
    assert np.array_equal(apply_postprocessing(labels, pp), labels)


@pytest.mark.parametrize("dims", [2, 3])
def test_connectivity_is_full_unless_stated(dims):
    labels = np.zeros(SHAPES[dims], np.uint8)
    labels[(0,) * dims] = labels[(1,) * dims] = 1  # touching by a corner only
    labels[(4,) * dims] = 1
    full = apply_postprocessing(labels, Postprocessing(largest_foreground=True))
    assert full.sum() == 2 and full[(4,) * dims] == 0
    faces = apply_postprocessing(labels, Postprocessing(largest_foreground=True, connectivity=1))
    assert faces.sum() == 1  # three single pixels: the first one found is kept
    with pytest.raises(ValueError, match="connectivity 3"):
        apply_postprocessing(labels[0] if dims == 3 else labels, Postprocessing(connectivity=3))


def test_object_sizes_and_candidates():
    masks = [np.zeros((10, 10), np.int64) for _ in range(2)]
    masks[0][:4, :4] = 1
    masks[0][8:, 8:] = 2
    masks[1][5:8, 0:3] = 1
    sizes = object_sizes(masks, [1, 2, 3])
    assert sizes[1].tolist() == [9, 16] and sizes[2].tolist() == [4] and sizes[3].size == 0
    assert min_sizes_from(sizes) == {1: 9, 2: 4}
    assert min_sizes_from(sizes, 100) == {1: 16, 2: 4}
    with pytest.raises(ValueError, match="percentile"):
        min_sizes_from(sizes, 101)


def test_json_round_trip_and_validation():
    pp = Postprocessing(largest_foreground=True, largest_classes=(2,), min_sizes=((1, 12), (3, 4)),
                        connectivity=1)
    assert Postprocessing.from_json(pp.to_json()) == pp
    assert Postprocessing.from_dict({}) == Postprocessing()
    for bad, match in [({"largest_classes": [0]}, ">= 1"), ({"min_sizes": {"1": 0}}, "1 voxel"),
                       ({"min_sizes": {"x": 3}}, "class numbers"), ({"connectivity": 4}, "connectivity"),
                       ({"largest_foreground": "yes"}, "true or false"), ({"lcc": True}, "unknown"),
                       ({"largest_classes": [1, 1]}, "once"), ({"min_sizes": [1]}, "an object")]:
        with pytest.raises(ValueError, match=match):
            Postprocessing.from_dict(bad)


def _cases(dims, spurious, n=3):
    """(prediction, truth) pairs: one disc per case, the prediction a little larger, with or
    without a small far-away false positive."""
    shape = (33, 35) if dims == 2 else (15, 17, 19)
    pairs = []
    for k in range(n):
        centre = [s // 2 + k - 1 for s in shape]
        truth = _disc(shape, centre, 5).astype(np.int64)
        pred = _disc(shape, centre, 6).astype(np.int64)
        if spurious:
            pred[(slice(1, 3),) * dims] = 1
        pairs.append((pred, truth))
    return pairs


@pytest.mark.parametrize("dims", [2, 3])
def test_a_step_that_helps_is_kept(dims):
    pairs = _cases(dims, spurious=True)
    pp, fig = choose_postprocessing(pairs, [1], min_sizes={1: 20})
    assert pp == Postprocessing(largest_foreground=True)  # the size filter then changes nothing: not kept
    assert [s["kept"] for s in fig["steps"]] == [True, False]
    assert fig["after"]["foreground"] > fig["before"]["foreground"]
    expected = pairs[0][0].copy()
    expected[(slice(1, 3),) * dims] = 0
    assert np.array_equal(apply_postprocessing(pairs[0][0], pp), expected)  # the blob, and only it, removed
    sized, fig = choose_postprocessing(pairs, [1], min_sizes={1: 20, 2: 3})  # class 2 is no class here
    assert sized == pp and len(fig["steps"]) == 2
    no_largest, fig = choose_postprocessing([(p * 2, t * 2) for p, t in pairs], [1, 2], min_sizes={2: 20})
    assert no_largest == Postprocessing(largest_foreground=True)  # class 2's steps add nothing after it


@pytest.mark.parametrize("dims", [2, 3])
def test_a_step_that_hurts_is_not_kept(dims):
    pairs = []
    for pred, truth in _cases(dims, spurious=False):
        truth[(slice(0, 3),) * dims] = 1  # a real small object: removing it would lower the Dice
        pred[(slice(0, 3),) * dims] = 1
        pairs.append((pred, truth))
    pp, fig = choose_postprocessing(pairs, [1], min_sizes={1: 30})
    assert pp.is_identity and not any(s["kept"] for s in fig["steps"])
    assert fig["after"] == fig["before"]


def test_multi_class_steps_and_the_tolerance():
    truth = np.zeros((30, 30), np.int64)
    truth[2:12, 2:12], truth[15:25, 15:25] = 1, 2
    pred = truth.copy()
    pred[27:29, 2:4] = 2  # a stray class-2 blob: class 2's largest component removes it
    pred[20:22, 2:4] = 1  # a real-looking class-1 blob also in the truth
    truth[20:22, 2:4] = 1
    pp, fig = choose_postprocessing([(pred, truth)], [1, 2])
    assert pp.largest_classes == (2,) and not pp.largest_foreground  # the foreground step removes class 1 too
    assert [s["step"] for s in fig["steps"]] == ["largest_foreground", "largest_class", "largest_class"]
    assert fig["after"]["classes"][1] == fig["before"]["classes"][1] and fig["after"]["classes"][2] == 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_label_images(), st.integers(0, 2**31)), min_size=1, max_size=3),
       st.floats(0, 0.05))
def test_chosen_steps_never_lower_the_mean_dice(cases, tolerance):
    pairs = []
    for pred, seed in cases:  # truth: the prediction with some pixels changed
        rng = np.random.default_rng(seed)
        truth = np.where(rng.random(pred.shape) < 0.3, rng.integers(0, 3, pred.shape), np.maximum(pred, 0))
        pairs.append((np.maximum(pred, 0), truth))
    sizes = min_sizes_from(object_sizes([t for _, t in pairs], [1, 2]), 50)
    pp, fig = choose_postprocessing(pairs, [1, 2], min_sizes=sizes, tolerance=tolerance)
    after = mean_dice([(apply_postprocessing(p, pp), t) for p, t in pairs], [1, 2])
    assert after == fig["after"]  # the figures are those of the chosen post-processing, applied at once
    assert after["foreground"] >= fig["before"]["foreground"]
    assert all(after["classes"][c] >= fig["before"]["classes"][c] - tolerance - 1e-12 for c in (1, 2))


def test_mean_dice_skips_ignored_truth_and_counts_absent_classes_as_one():
    truth = np.array([[1, 1, -1, 0]])
    pred = np.array([[1, 1, 1, 0]])
    assert mean_dice([(pred, truth)], [1, 2]) == {"foreground": 1.0, "classes": {1: 1.0, 2: 1.0}}
    with pytest.raises(ValueError, match="at least one"):
        mean_dice([], [1])
