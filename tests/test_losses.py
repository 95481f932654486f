from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from useg.losses import SegLoss, dice_ce_loss, soft_dice_loss, weighted_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[(2, 3, 5, 7), (2, 3, 4, 5, 3)], ids=["2d", "3d"])
def batch(request):
    shape = request.param  # odd spatial sizes on purpose
    logits = torch.randn(*shape, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    return logits, target


def _onehot_logits(labels, k, scale=50.0):
    return F.one_hot(labels, k).movedim(-1, 1).float() * scale


def test_all_ones_weights_equal_cross_entropy(batch):
    logits, target = batch
    ones = torch.ones(target.shape)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones), F.cross_entropy(logits, target))
    torch.testing.assert_close(weighted_cross_entropy(logits, target), F.cross_entropy(logits, target))
    target = target.clone()
    target.view(-1)[::3] = 255
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones, ignore_index=255),
                               F.cross_entropy(logits, target, ignore_index=255))


@pytest.mark.parametrize("ignore", [False, True])
def test_doubling_one_pixels_weight(batch, ignore):
    logits, target = batch
    target = target.clone()
    if ignore:
        target.view(-1)[1::2] = -1
    counted = (target != -1).sum()
    w = torch.ones(target.shape)
    w.view(-1)[0] = 2.0  # pixel 0 is never ignored
    per_pixel = F.cross_entropy(logits, target, reduction="none", ignore_index=-1)
    base = weighted_cross_entropy(logits, target, None, ignore_index=-1 if ignore else None)
    got = weighted_cross_entropy(logits, target, w, ignore_index=-1 if ignore else None)
    torch.testing.assert_close(got - base, per_pixel.view(-1)[0] / counted)
    w.view(-1)[1] = 100.0  # an ignored pixel's weight changes nothing
    if ignore:
        torch.testing.assert_close(weighted_cross_entropy(logits, target, w, ignore_index=-1), got)


def test_everything_ignored_gives_zero_with_a_gradient():
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = dice_ce_loss(logits, torch.full((1, 3, 3), 7), ignore_index=7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert weighted_cross_entropy(logits, torch.full((1, 3, 3), 7), ignore_index=7).item() == 0.0


def test_dice_perfect_and_worst(batch):
    logits, target = batch
    k = logits.shape[1]
    assert soft_dice_loss(_onehot_logits(target, k), target).item() < 1e-3
    assert soft_dice_loss(_onehot_logits((target + 1) % k, k), target).item() > 0.99
    assert soft_dice_loss(_onehot_logits((target + 1) % k, k), target, include_background=True).item() > 0.99


def test_batch_dice_by_hand():
    # two images, K = 2; image 0 holds no foreground: per-image Dice would be 0/0 there
    target = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [0, 0]]])
    pred = torch.tensor([[[0, 1], [0, 0]], [[1, 0], [0, 0]]])
    logits = _onehot_logits(pred, 2)
    # class 1 over the batch: intersection 1, |pred| 2, |truth| 2 -> Dice 0.5
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-4)
    # class 0: intersection 5, |pred| 6, |truth| 6 -> Dice 5/6; mean with class 1 -> 2/3
    assert soft_dice_loss(logits, target, include_background=True).item() == pytest.approx(1 / 3, abs=1e-4)


def test_dice_ignores_pixels():
    target = torch.tensor([[[0, 1], [1, 1]]])
    logits = _onehot_logits(torch.tensor([[[0, 1], [1, 0]]]), 2)
    assert soft_dice_loss(logits, target).item() > 0.1
    target_ignored = target.clone()
    target_ignored[0, 1, 1] = -1
    assert soft_dice_loss(logits, target_ignored, ignore_index=-1).item() < 1e-3


def test_gradients_flow(batch):
    logits, target = batch
    w = torch.rand(target.shape) + 0.5
    dice_ce_loss(logits, target, w, ignore_index=None).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # a gradient step on the loss lowers it
    with torch.no_grad():
        before = dice_ce_loss(logits, target, w)
        after = dice_ce_loss(logits - 0.1 * logits.grad, target, w)
    assert after < before


def test_bf16_logits_and_autocast(batch):
    logits, target = batch
    ref = dice_ce_loss(logits, target)
    bf = SegLoss("dice_ce")(logits.detach().bfloat16(), target)
    assert bf.dtype == torch.float32
    assert bf.item() == pytest.approx(ref.item(), abs=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = weighted_cross_entropy(logits.bfloat16(), target)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=0.05)


def test_seg_loss_kinds(batch):
    logits, target = batch
    w = torch.rand(target.shape)
    ce = SegLoss("ce")(logits, target, w)
    dice = SegLoss("dice")(logits, target, w)
    torch.testing.assert_close(ce, weighted_cross_entropy(logits, target, w))
    torch.testing.assert_close(SegLoss("dice_ce")(logits, target, w), ce + dice)
    target = target.clone()
    target.view(-1)[::2] = 9
    torch.testing.assert_close(SegLoss("dice", ignore_index=9, include_background=True)(logits, target),
                               soft_dice_loss(logits, target, ignore_index=9, include_background=True))
    assert not torch.allclose(SegLoss("dice", ignore_index=9)(logits, target),
                              SegLoss("dice", ignore_index=9, include_background=True)(logits, target))
    with pytest.raises(ValueError, match="choose one of dice_ce, ce, dice"):
        SegLoss("focal")


def test_validation(batch):
    logits, target = batch
    with pytest.raises(ValueError, match="center_crop"):
        weighted_cross_entropy(logits, target[..., :-1])
    with pytest.raises(ValueError, match="center_crop"):
        soft_dice_loss(logits, target[:1])
    with pytest.raises(ValueError, match="weight"):
        weighted_cross_entropy(logits, target, torch.ones(target.shape)[..., :-1])
    with pytest.raises(ValueError, match="integer"):
        weighted_cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="K >= 2"):
        soft_dice_loss(logits[:, :1], target)


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 4, 5, 3)])
def test_region_loss_is_bce_plus_dice_and_rewards_the_right_regions(shape):
    from useg.losses import region_loss, region_targets

    regions = ((1, 2, 3), (2, 3), (3,))
    target = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(0))
    y = region_targets(target, regions)
    assert y.shape == (shape[0], 3, *shape[1:]) and torch.equal(y[:, 2], (target == 3).float())
    good = region_loss((y * 2 - 1) * 20, target, regions)  # confident and right
    bad = region_loss((1 - y * 2) * 20, target, regions)
    assert good < 0.01 < 1.5 < bad
    assert torch.allclose(SegLoss("ce", regions=regions)((y * 2 - 1) * 20, target), good)
    with pytest.raises(ValueError, match="regions"):
        region_loss(torch.zeros(shape[0], 2, *shape[1:]), target, regions)
