"""SNS training with BatchNorm: one forward of [x; x_adv] per step by default."""
import pytest
import torch
from torch import nn

from neurosens.methods import SNSLoss
from neurosens.sns import SNSConfig
from neurosens.training import TrainConfig


class GivenAdversary:
    """The training attack, replaced by fixed adversarial inputs so the step is deterministic."""

    def __init__(self, x_adv):
        self.x_adv = x_adv

    def __call__(self, x, y):
        return self.x_adv


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    return x, (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1), torch.randint(0, 3, (8,), generator=g)


def test_joint_forward_updates_batchnorm_statistics_once_from_both_halves():
    net = bn_net()
    x, x_adv, y = batch()
    loss_fn = SNSLoss(net, layers=["0", "4"], k=2)
    assert loss_fn.forward == "joint"
    with torch.no_grad():
        pre = net[0](torch.cat([x, x_adv]))
    loss_fn(net.train(), x, y, GivenAdversary(x_adv))
    bn = net[1]
    assert bn.num_batches_tracked.item() == 1
    # By hand: one momentum step (0.1) from (0, 1) towards the joint batch's mean and unbiased variance.
    mean = pre.mean((0, 2, 3))
    var = pre.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var, rtol=1e-12, atol=1e-12)


def test_separate_forwards_update_twice():
    net = bn_net()
    x, x_adv, y = batch()
    SNSLoss(net, layers=["0", "4"], k=2, forward="separate")(net.train(), x, y, GivenAdversary(x_adv))
    assert net[1].num_batches_tracked.item() == 2


def test_without_batchnorm_joint_and_separate_give_the_same_loss_and_gradients():
    x, x_adv, y = batch()
    results = []
    for forward in ("joint", "separate"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
        loss, logs = SNSLoss(net, layers=["0", "3"], k=2, clean_weight=0.5, forward=forward)(net.train(), x, y,
                                                                                               GivenAdversary(x_adv))
        loss.backward()
        results.append((loss.detach(), logs["sns"], net[0].weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_forward_option_is_checked_and_reaches_the_train_config():
    with pytest.raises(ValueError, match=r"SNS: forward='both' is unknown; expected one of joint, separate"):
        SNSConfig(forward="both").check()
    with pytest.raises(ValueError, match=r"TrainConfig: sns_forward='both' is unknown"):
        TrainConfig(method="sns", sns_forward="both")
    assert TrainConfig(method="sns").sns_config().forward == "joint"
