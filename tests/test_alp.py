"""Adversarial logit pairing against a hand-written loss, and its place among the methods."""
import pytest
import torch
import torch.nn.functional as F

from neurosens.methods import SNSLoss, make_loss
from neurosens.training import TrainConfig

from conftest import fresh_model

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=12, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_loss_and_gradient_are_adversarial_ce_plus_lam_times_the_distance(distance):
    model = fresh_model(dtype=torch.float64)
    x, x_adv, y = batch()
    loss, logs = make_loss("alp", alp_lam=0.7, alp_distance=distance)(model, x, y, lambda x, y: x_adv)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    z, z_adv = model(x), model(x_adv)
    d = z - z_adv
    if distance == "l1":
        pair = sum(abs(d[i, j]) for i in range(len(y)) for j in range(10)) / (10 * len(y))
    else:
        pair = sum(torch.sqrt(sum(d[i, j] ** 2 for j in range(10))) for i in range(len(y))) / len(y)
    by_hand = F.cross_entropy(z_adv, y) + 0.7 * pair
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(logs["pair"], pair.detach())
    for g, h in zip(grads, torch.autograd.grad(by_hand, list(model.parameters()))):
        torch.testing.assert_close(g, h)


def test_l1_pairing_is_sns_on_every_logit():
    x, x_adv, y = batch()
    alp_model, sns_model = fresh_model(dtype=torch.float64), fresh_model(dtype=torch.float64)
    alp, _ = make_loss("alp", alp_lam=1.3, alp_distance="l1")(alp_model, x, y, lambda x, y: x_adv)
    sns, _ = SNSLoss(sns_model, layers="logits", select="all", lam=1.3, metric="l1")(sns_model, x, y, lambda x, y: x_adv)
    torch.testing.assert_close(alp, sns)


def test_bad_options_fail():
    with pytest.raises(ValueError, match="distance='cosine'"):
        make_loss("alp", alp_distance="cosine")
    with pytest.raises(ValueError, match="lam=-1"):
        make_loss("alp", alp_lam=-1)
    with pytest.raises(ValueError, match="alp_distance='l3'"):
        TrainConfig(method="alp", alp_distance="l3")
