"""Attack bounds: pixel space [0, 1] by default, clip=(lo, hi) for other ranges, one-time warnings."""
import warnings

import pytest
import torch
from torch import nn

from neurosens.attacks import CW, FGSM, PGD, AutoAttack, make_attack
from neurosens.models import Normalize

MEAN, STD = 0.4, 0.2
LO, HI = (0 - MEAN) / STD, (1 - MEAN) / STD


def classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def pixels(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def caught(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in seen]


def test_normalizing_inside_the_model_or_attacking_normalized_inputs_within_clip_agree():
    net = classifier()
    x, y = pixels()
    in_model = nn.Sequential(Normalize([MEAN], [STD]), net).double()
    pixel_adv = PGD(in_model, eps=0.05, alpha=0.01, steps=7, random_start=False)(x, y)
    # The same attack in normalized units: eps and step scale by 1/std, the bounds are [0, 1] mapped.
    z = (x - MEAN) / STD
    z_adv, messages = caught(lambda: PGD(net, eps=0.05 / STD, alpha=0.01 / STD, steps=7, random_start=False,
                                         clip=(LO, HI))(z, y))
    assert messages == []
    torch.testing.assert_close(z_adv * STD + MEAN, pixel_adv, rtol=0, atol=1e-12)
    assert (pixel_adv - x).abs().max() <= 0.05 + 1e-12 and (pixel_adv - x).abs().max() > 0.049
    assert z_adv.min() >= LO and z_adv.max() <= HI


def test_inputs_outside_the_bounds_warn_once_per_attack():
    net = classifier()
    x, y = pixels()
    z = (x - MEAN) / STD
    atk = PGD(net, eps=0.03, steps=3)
    z_adv, messages = caught(lambda: [atk(z, y), atk(z, y)][-1])
    assert len(messages) == 1
    assert messages[0].startswith(f"PGD: inputs span [{z.min().item():.3g}, {z.max().item():.3g}], outside the attack's "
                                  "bounds clip=(0.0, 1.0)")
    assert "neurosens.models.Normalize" in messages[0] and "clip=(lo, hi)" in messages[0]
    # What the warning is about: clipping to [0, 1] moved normalized pixels far beyond eps.
    assert (z_adv - z).abs().max() > 1.5
    _, messages = caught(lambda: FGSM(net, eps=0.03)(x, y))
    assert messages == []


def test_an_eps_spanning_the_whole_range_warns_as_a_0_255_budget():
    net = classifier()
    _, messages = caught(lambda: PGD(net, eps=8))
    assert messages == ["PGD: eps=8 spans the whole input range clip=(0.0, 1.0) (width 1), so the budget constrains "
                        "nothing; on the 0-255 scale write eps=8/255"]
    _, messages = caught(lambda: [PGD(net, eps=8 / 255), PGD(net, eps=2.0, norm="l2"), CW(net, eps=8, clip=(0, 255))])
    assert messages == []


def test_bad_bounds_are_refused_and_make_attack_passes_them():
    net = classifier()
    for clip in [(1, 0), (0,), (0, float("inf")), "0,1"]:
        with pytest.raises(ValueError, match=r"clip=.*must be a pair \(lo, hi\) of finite numbers with lo < hi"):
            PGD(net, eps=0.1, clip=clip)
    with pytest.raises(ValueError, match=r"AutoAttack: clip=\(-1, 1\): torchattacks' AutoAttack works in \[0, 1\] only"):
        AutoAttack(net, eps=0.1, clip=(-1, 1))
    for name in ("fgsm", "pgd", "cw"):
        assert make_attack(name, net, 0.1, clip=(-1, 1)).clip == (-1.0, 1.0)
    x, y = pixels()
    x_adv = make_attack("pgd", net, 0.4, clip=(0.25, 0.75))(x.clamp(0.25, 0.75), y)
    assert x_adv.min() >= 0.25 and x_adv.max() <= 0.75
