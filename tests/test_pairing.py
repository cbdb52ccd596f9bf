"""One dropout mask for a benign batch and its adversarial twin: SNS and logit pairing see the
difference of the inputs, not dropout noise."""
import pytest
import torch
from torch import nn

import neurosens as ns
from neurosens.methods import make_loss
from neurosens.models import build_model
from neurosens.pairing import SharedDropout

pytestmark = pytest.mark.usefixtures("one_thread")


def trades_cnn():
    torch.manual_seed(0)
    return build_model("trades-cnn", num_classes=10, in_channels=1, input_size=28).train()


def images(n=6, seed=1):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


class Probe(nn.Module):
    """A linear layer, then a dropout whose output ``seen`` keeps."""

    def __init__(self, drop):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.drop, self.seen = nn.Conv2d(1, 4, 1), drop, []
        self.drop.register_forward_hook(lambda m, i, out: self.seen.append(out.detach()))

    def forward(self, x):
        return self.drop(self.conv(x)).flatten(1)


@pytest.mark.parametrize("forward", ["joint", "separate"])
def test_the_sns_term_of_identical_inputs_is_zero_under_dropout(forward):
    model, x = trades_cnn(), images()
    reg = ns.SNSRegularizer(model, k=0.3)
    with reg.capture(forward):
        model(torch.cat([x, x])) if forward == "joint" else (model(x), model(x))
    assert reg.loss().item() == 0
    # Without the shared masks, dropout alone makes the halves differ.
    hooks = ns.capture.ActivationCapture(model, "fc2")
    with hooks, torch.no_grad():
        a, b = model(torch.cat([x, x])).chunk(2)
    assert not torch.equal(a, b)


def test_joint_halves_share_one_mask_of_the_right_rate_and_scale():
    probe = Probe(nn.Dropout(0.25)).train()
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(2)) + 0.5  # no zero before dropout
    with torch.no_grad():
        plain = probe.conv(torch.cat([x, x]))
        with SharedDropout(probe)("joint") as shared:
            probe(torch.cat([x, x]))
    out = probe.seen[-1]
    assert shared.ran and shared.forwards == 1
    assert torch.equal(out[:50], out[50:])
    kept = out != 0
    torch.testing.assert_close(out[kept], plain[kept] / 0.75, rtol=2e-7, atol=0)
    assert abs(kept[:50].float().mean().item() - 0.75) < 0.02  # 12,800 draws
    # Each element draws its own: no map of 64 pixels is kept or dropped whole.
    per_map = kept[:50].flatten(2).float().mean(2)
    assert ((per_map > 0) & (per_map < 1)).all()


def test_channel_dropout_drops_whole_maps_and_the_second_forward_reuses_the_first_masks():
    probe = Probe(nn.Dropout2d(0.5)).train()
    x, x_adv = torch.rand(2, 8, 1, 6, 6, generator=torch.Generator().manual_seed(3)).unbind(0)
    with torch.no_grad(), SharedDropout(probe)("separate") as shared:
        probe(x + 1), probe(x_adv + 1)
    first, second = probe.seen[-2:]
    assert shared.forwards == 2
    kept = first.flatten(2).ne(0)
    assert torch.equal(kept.all(2), kept.any(2))  # a map is kept or dropped whole
    assert torch.equal(second.flatten(2).ne(0), kept)
    assert 0 < kept.all(2).float().mean() < 1


def test_outside_the_block_dropout_is_itself_again():
    probe = Probe(nn.Dropout(0.5)).train()
    with SharedDropout(probe)("joint"):
        pass
    assert "forward" not in vars(probe.drop)
    with torch.no_grad():
        out = probe(torch.ones(2, 1, 4, 4).repeat(20, 1, 1, 1))
    assert not torch.equal(out[:20], out[20:])  # independent masks again


def test_eval_mode_and_a_zero_rate_leave_outputs_untouched():
    for drop, train in ((nn.Dropout(0.5), False), (nn.Dropout(0.0), True)):
        probe = Probe(drop).train(train)
        x = torch.rand(4, 1, 3, 3)
        with torch.no_grad(), SharedDropout(probe)("joint") as shared:
            out = probe(x)
        assert not shared.ran and torch.equal(out, probe.conv(x).flatten(1))


def test_a_pair_run_otherwise_than_declared_is_refused_under_dropout():
    model, x = trades_cnn(), images(4)
    reg = ns.SNSRegularizer(model, k=0.3)
    with reg.capture():
        model(x), model(x)
    with pytest.raises(RuntimeError, match=r"2 forward\(s\) ran inside capture\(forward='joint'\) with dropout in "
                                           r"training mode, .* pass capture\(forward='separate'\)"):
        reg.loss()
    with reg.capture("separate"):
        model(torch.cat([x, x]))
    with pytest.raises(RuntimeError, match=r"pass capture\(forward='joint'\)"):
        reg.loss()
    with pytest.raises(ValueError, match=r"SNS: forward='both' is unknown; expected one of joint, separate"):
        with reg.capture("both"):
            pass
    with pytest.raises(RuntimeError, match=r"the adversarial forward has 2 rows where the benign one had 4"):
        with reg.capture("separate"):
            model(x), model(x[:2])


def test_attention_dropout_that_cannot_be_shared_is_named_in_a_warning():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True), 1,
                                    enable_nested_tensor=False).train()
    reg = ns.SNSRegularizer(encoder, layers="auto", k=1)
    with pytest.warns(UserWarning, match=r"SNS: the dropout of layers.0.self_attn draws its own mask"):
        with reg.capture():
            pass


def test_logit_pairing_of_identical_inputs_is_zero_under_dropout():
    model, x = trades_cnn(), images()
    y = torch.arange(6)
    loss, logs = make_loss("alp", alp_lam=1.0, alp_distance="l2")(model, x, y, lambda x, y: x)
    assert logs["pair"].item() == 0


class SequenceFirstHead(nn.Module):
    """A sequence-first encoder layer (its dropout sees [T, 2N, C]) under a batch-first head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5)
        self.enc.self_attn.dropout = 0.0
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x).transpose(0, 1)).mean(0))


def test_dropout_that_cannot_be_shared_keeps_its_own_masks_and_is_named():
    from torchvision.ops import StochasticDepth

    class Plain(nn.Dropout):  # a subclass running nn.Dropout's forward is shared
        pass

    model = nn.Sequential(nn.Linear(4, 8), Plain(0.5), StochasticDepth(0.5, "row"), nn.Linear(8, 3)).train()
    x = torch.rand(6, 4)
    reg = ns.SNSRegularizer(model, layers=["3"], k=1.0)
    with pytest.warns(UserWarning, match=r"SNS: the dropout of 2 draws its own mask"):
        with reg.capture():
            out = model(torch.cat([x, x]))
    assert not torch.equal(*out.chunk(2))  # stochastic depth drops rows on their own
    model[2].p = 0.0
    with reg.capture():
        out = model(torch.cat([x, x]))
    assert torch.equal(*out.chunk(2))  # the subclass's masks are shared
    model = SequenceFirstHead().train()
    x = torch.rand(4, 8, 4)  # T = 2N: a split of dim 0 would pass unseen
    reg = ns.SNSRegularizer(model, layers=["head"], k=1.0)
    with pytest.warns(UserWarning, match=r"the dropout of enc.dropout, enc.dropout1, enc.dropout2 draws its own mask"):
        with reg.capture():
            model(torch.cat([x, x]))


def test_channel_dropout_of_an_unbatched_2d_input_drops_whole_rows_as_torch_does():
    probe = nn.Sequential(nn.Dropout1d(0.5)).train()
    with torch.no_grad(), SharedDropout(probe)("joint"):
        out = probe(torch.ones(8, 6))
    kept = out != 0
    assert torch.equal(kept.all(1), kept.any(1)) and torch.equal(out[:4], out[4:])
