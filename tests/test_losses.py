from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from useg.losses import SegLoss, dice_ce_loss, soft_dice_loss, weighted_cross_entropy


@pytest.fixture(params=[(2, 3, 5, 7), (2, 3, 4, 5, 3)], ids=["2d", "3d"])
def batch(request):
    shape = request.param
    logits = torch.randn(*shape, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    return logits, target


def test_all_ones_weights_equal_cross_entropy(batch):
    logits, target = batch
    ones = torch.ones(target.shape)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones), F.cross_entropy(logits, target))
    target = target.clone()
    target.view(-1)[::3] = 255
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones, ignore_index=255),
                               F.cross_entropy(logits, target, ignore_index=255))


def test_weight_map_scales_each_pixel(batch):
    logits, target = batch
    w = torch.ones(target.shape)
    w.view(-1)[0] = 3.0
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    expected = (per_pixel.sum() + 2 * per_pixel.view(-1)[0]) / per_pixel.numel()
    torch.testing.assert_close(weighted_cross_entropy(logits, target, w), expected)


def test_dice_perfect_and_worst(batch):
    logits, target = batch
    k = logits.shape[1]
    perfect = F.one_hot(target, k).movedim(-1, 1).float() * 50
    assert soft_dice_loss(perfect, target).item() < 1e-3
    worst = F.one_hot((target + 1) % k, k).movedim(-1, 1).float() * 50
    assert soft_dice_loss(worst, target).item() > 0.99


def test_dice_ignores_pixels():
    target = torch.tensor([[[0, 1], [1, 1]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [1, 0]]]), 2).movedim(-1, 1).float() * 50
    assert soft_dice_loss(logits, target).item() > 0.1
    target_ignored = target.clone()
    target_ignored[0, 1, 1] = -1
    assert soft_dice_loss(logits, target_ignored, ignore_index=-1).item() < 1e-3


def test_gradients_and_bf16(batch):
    logits, target = batch
    loss = dice_ce_loss(logits, target)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    bf = SegLoss("dice_ce")(logits.detach().bfloat16(), target)
    assert bf.dtype == torch.float32
    assert bf.item() == pytest.approx(loss.item(), abs=0.05)


def test_seg_loss_kinds_and_validation(batch):
    logits, target = batch
    ce = SegLoss("ce")(logits, target)
    dice = SegLoss("dice")(logits, target)
    torch.testing.assert_close(SegLoss("dice_ce")(logits, target), ce + dice)
    with pytest.raises(ValueError, match="choose one of"):
        SegLoss("focal")
    with pytest.raises(ValueError, match="center_crop"):
        weighted_cross_entropy(logits, target[..., :-1])
