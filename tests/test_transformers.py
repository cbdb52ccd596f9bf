"""Transformers and token layouts: layer selection, the neuron dim of [N, T, C] outputs, SNS on a ViT."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

import neurosens as ns
from neurosens.capture import ActivationCapture
from neurosens.layers import select_layers

BLOCK = "encoder.layers.encoder_layer_{}"
MLP_IN = BLOCK + ".mlp.0"


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def pairs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 28, 28, generator=g)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 10, (n,), generator=g)


def by_hand(model, layer, x, x_adv):
    """Mean over samples of the mean |a - b| over the 17 tokens, for each of the layer's features."""
    outs = {}
    for key, inputs in (("a", x), ("b", x_adv)):
        with ActivationCapture(model, layer) as cap, torch.no_grad():
            model.eval()(inputs)
        outs[key] = cap.activations[layer]
    assert outs["a"].shape == (len(x), 17, outs["a"].shape[-1])
    return (outs["a"] - outs["b"]).abs().mean(1).mean(0)


def test_auto_skips_the_attention_projection_that_never_runs():
    vit = tiny_vit()
    chosen = list(select_layers(vit, "auto"))
    assert not any(name.endswith("out_proj") for name in chosen)
    assert chosen == ["conv_proj"] + [MLP_IN.format(i) if j == 0 else BLOCK.format(i) + ".mlp.3"
                                      for i in range(2) for j in range(2)] + ["heads.head"]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2)
    assert list(select_layers(encoder, "auto")) == [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    x, x_adv, _ = pairs()
    report = ns.measure(vit, [(x, x_adv)], progress=False)
    assert report.layers == chosen


def test_mlp_layer_has_its_features_as_neurons_along_the_last_dim():
    vit = tiny_vit()
    x, x_adv, _ = pairs()
    layer = MLP_IN.format(1)
    report = ns.measure(vit, [(x[:4], x_adv[:4]), (x[4:], x_adv[4:])], layers=[layer, BLOCK.format(1) + ".mlp.1"],
                        progress=False)
    assert report[layer].shape == (64,)
    assert report.meta["layers"][layer]["channel_dim"] == 2
    torch.testing.assert_close(report[layer], by_hand(vit, layer, x, x_adv).double(), rtol=1e-5, atol=1e-7)
    # The GELU after it in its nn.Sequential has the same 64 neurons.
    gelu = BLOCK.format(1) + ".mlp.1"
    torch.testing.assert_close(report[gelu], by_hand(vit, gelu, x, x_adv).double(), rtol=1e-5, atol=1e-7)
    values, neurons = report.topk(layer, k=0.1)
    expected = torch.sort(report[layer], descending=True)
    assert values.tolist() == expected.values[:6].tolist() and len(set(neurons.tolist())) == 6  # 10% of 64


def test_an_explicit_channel_dim_that_contradicts_the_module_is_refused_unless_per_layer():
    vit = tiny_vit()
    x, x_adv, _ = pairs(4)
    layer = MLP_IN.format(0)
    with pytest.raises(ValueError, match=rf"layer '{layer}': channel_dim=1 would take the 17 entries of dim 1 .*"
                                         r"nn.Linear\(out_features=64\) has its 64 neurons on dim 2"):
        ns.measure(vit, [(x, x_adv)], layers=layer, channel_dim=1, progress=False)
    report = ns.measure(vit, [(x, x_adv)], layers=layer, channel_dim={layer: 1}, progress=False)
    assert report[layer].shape == (17,)


def test_a_3d_output_of_an_undeclared_module_needs_a_channel_dim():
    class Mix(nn.Module):
        def forward(self, x):
            return x * 2

    net = nn.Sequential(nn.Linear(5, 6), nn.Identity(), Mix())
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"layer '2' \(Mix\) gives a 3-d output \[6, 4, 6\]: .*channel_dim=\{'2': 1\} or -1"):
        ns.measure(net, [(x, x + 1)], layers="2", progress=False)
    report = ns.measure(net, [(x, x + 1)], layers=["1", "2"], channel_dim=-1, progress=False)
    assert report["1"].shape == report["2"].shape == (6,)


def test_presets_for_activations_mlp_units_and_blocks():
    vit = tiny_vit()
    assert list(select_layers(vit, "auto", auto="activations")) == [BLOCK.format(i) + ".mlp.1" for i in range(2)]
    assert list(select_layers(vit, "auto", auto="mlp")) == [MLP_IN.format(i) for i in range(2)]
    assert list(select_layers(vit, "auto", auto="blocks")) == [BLOCK.format(i) for i in range(2)]
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 4), nn.Hardswish(), nn.ReLU6(), nn.Linear(4, 2))
    assert list(select_layers(net, "auto", auto="activations")) == ["1", "3", "4"]
    assert list(select_layers(net, "auto", auto="relu")) == ["4"]
    with pytest.raises(ValueError, match=r"layers='auto' \(auto='blocks': each transformer block's output, the residual "
                                         r"stream\) selects nothing in Sequential"):
        select_layers(net, "auto", auto="blocks")
    x, x_adv, _ = pairs(4)
    report = ns.measure(vit, [(x, x_adv)], layers="auto", auto="blocks", progress=False)
    block = BLOCK.format(0)
    assert report[block].shape == (32,)
    torch.testing.assert_close(report[block], by_hand(vit, block, x, x_adv).double(), rtol=1e-5, atol=1e-7)


def test_sns_on_a_vit_stabilizes_mlp_features():
    vit = tiny_vit()
    x, x_adv, y = pairs(8)
    reg = ns.SNSRegularizer(vit, layers="auto", auto="mlp", k=8, lam=1.0)
    opt = torch.optim.SGD(vit.parameters(), lr=0.05)
    vit.train()
    for step in range(2):
        captured = {}
        handles = [module.register_forward_hook(lambda m, i, out, name=name: captured.__setitem__(name, out.detach()))
                   for name, module in reg.modules.items()]
        with reg.capture():
            logits, logits_adv = vit(torch.cat([x, x_adv])).chunk(2)
        for handle in handles:
            handle.remove()
        term = reg.loss()
        # By hand: per-sample mean |a - b| over tokens of the 8 most sensitive features, averaged.
        expected = []
        for name, out in captured.items():
            a, b = out.chunk(2)
            per_sample = (a - b).abs().mean(1)
            top = per_sample.sum(0).topk(8).indices
            assert sorted(top.tolist()) == sorted(reg.selections[name].tolist())
            expected.append(per_sample[:, top].mean())
        torch.testing.assert_close(term.detach(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-7)
        loss = F.cross_entropy(logits_adv, y) + term
        opt.zero_grad()
        loss.backward()
        assert vit.encoder.layers.encoder_layer_0.mlp[0].weight.grad.abs().sum() > 0
        opt.step()
    assert all(idx.max() < 64 for idx in reg.selections.values())


def test_sns_takes_a_per_layer_channel_dim_as_measure_does():
    vit = tiny_vit()
    x, x_adv, _ = pairs(4)
    layer = MLP_IN.format(0)
    reg = ns.SNSRegularizer(vit, layers=layer, k=3, channel_dim={layer: 1})
    with reg.capture():
        vit(torch.cat([x, x_adv]))
    reg.loss()
    assert reg.selections[layer].max() < 17
    with pytest.raises(ValueError, match=r"SNS: channel_dim names layers that are not selected: heads.head"):
        ns.SNSRegularizer(vit, layers=layer, channel_dim={"heads.head": -1})
    with pytest.raises(TypeError, match=r"SNS: channel_dim=.* must be None, an int or a dict"):
        ns.SNSRegularizer(vit, layers=layer, channel_dim="last")


def test_interventions_edit_features_along_the_inferred_dim():
    from neurosens.interventions import intervene

    vit = tiny_vit().eval()
    x, x_adv, _ = pairs(3)
    layer = MLP_IN.format(0)
    with torch.no_grad(), intervene(vit, layer, [40, 63], mode="repair"), ActivationCapture(vit, layer) as cap:
        vit(torch.cat([x, x_adv]))
    with torch.no_grad(), ActivationCapture(vit, layer) as plain:
        vit(torch.cat([x, x_adv]))
    edited, original = cap.activations[layer], plain.activations[layer]
    # Features 40 and 63 of every adversarial token now carry the benign values; the rest is untouched.
    torch.testing.assert_close(edited[3:, :, [40, 63]], original[:3, :, [40, 63]], rtol=0, atol=0)
    keep = [c for c in range(64) if c not in (40, 63)]
    torch.testing.assert_close(edited[:, :, keep], original[:, :, keep], rtol=0, atol=0)
    assert not torch.equal(original[3:, :, 40], original[:3, :, 40])


class SequenceFirst(nn.Module):
    """Batch-first [N, T, C] inputs through a layer applied sequence-first: its outputs are [T, N, C]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x.transpose(0, 1))).mean(0))


def test_a_layer_that_puts_the_batch_off_dim_0_is_refused_not_mispaired():
    from neurosens.interventions import adversarial_batches, intervene, mean_benign_output

    model, layer = SequenceFirst(), "mix"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 6, 8, generator=g)  # 4 sequences of 6 tokens: outputs of [6, 8, 16] on [x; x_adv]
    refusal = rf"layer '{layer}': output of shape \[6, {{}}, 16\] has 6 rows, expected {{}} \({{}}\); the batch must be dim 0"
    with pytest.raises(RuntimeError, match=refusal.format(8, 8, "benign and adversarial batches of 4")):
        ns.measure(model, [(x, x)], layers=layer, channel_dim=-1, progress=False)
    for forward in ("joint", "separate"):
        reg = ns.SNSRegularizer(model, layers=layer, k=2, channel_dim=-1)
        with reg.capture():
            if forward == "joint":
                model(torch.cat([x, x]))
            else:
                model(x), model(x)
        rows, what = (8, "the batch of one forward of \\[x; x_adv\\]") if forward == "joint" else (4, "the batch of its forward")
        with pytest.raises(RuntimeError, match=refusal.format(rows, rows, what)):
            reg.loss()
    with pytest.raises(RuntimeError, match=refusal.format(8, 8, "the batch of the model's forward")):
        with torch.no_grad(), intervene(model, layer, [0], mode="repair", channel_dim=-1):
            model(torch.cat([x, x]))
    batches = adversarial_batches(model, [(x, torch.zeros(4, dtype=torch.long))], lambda x, y: x, progress=False)
    with pytest.raises(RuntimeError, match=refusal.format(4, 4, "the benign batch")):
        mean_benign_output(model, batches, layer)


def test_a_layer_norm_that_permutes_keeps_its_channels_on_dim_1_and_a_plain_one_on_the_last():
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    # 6 channels of 8x8 maps, then 48 rows of 8 features for the plain LayerNorm.
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), LayerNorm2d(6), nn.Flatten(1, 2), nn.LayerNorm(8),
                          nn.Flatten(), nn.Linear(384, 3)).eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    report = ns.measure(model, [(x, x_adv)], layers=["1", "3"], progress=False)
    assert report.meta["layers"]["1"]["channel_dim"] == 1 and report.meta["layers"]["3"]["channel_dim"] == 2
    with torch.no_grad():
        maps = model[1](model[0](torch.cat([x, x_adv])))
        tokens = model[3](model[2](maps))
    a, b = maps.chunk(2)
    torch.testing.assert_close(report["1"], (a - b).abs().mean((2, 3)).mean(0).double(), rtol=1e-5, atol=1e-7)
    a, b = tokens.chunk(2)  # [N, 48 rows, 8 features]: the plain LayerNorm's neurons are its 8 features
    torch.testing.assert_close(report["3"], (a - b).abs().mean(1).mean(0).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", ["encoder", "encoder.layers.0", "encoder.layers.0.linear1", "encoder.layers.0.self_attn"])
def test_a_sequence_first_transformer_is_refused_before_it_runs(layer):
    from neurosens.interventions import intervene

    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 1,
                                                enable_nested_tensor=False), nn.Linear(8, 3))
    model = nn.ModuleDict({"encoder": model[0], "head": model[1]})
    refusal = (rf"layer '{layer}' runs inside '(encoder|encoder.layers.0|encoder.layers.0.self_attn)', a "
               r"(TransformerEncoder|TransformerEncoderLayer|MultiheadAttention) with batch_first=False: its outputs are \[T, N, C\]")
    with pytest.raises(ValueError, match=refusal):
        ns.NeuronSensitivity(model, layers=layer, channel_dim=-1)
    with pytest.raises(ValueError, match=refusal):
        ns.SNSRegularizer(model, layers=layer, k=1, channel_dim=-1)
    with pytest.raises(ValueError, match=refusal):
        with intervene(model, layer, [0], channel_dim=-1):
            pass
    # Layers outside it, and the same model built batch-first, are measured.
    ns.NeuronSensitivity(model, layers="head")
    batch_first = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False)
    ns.NeuronSensitivity(batch_first, layers=layer.replace("encoder.", "").replace("encoder", "layers.0"), channel_dim=-1)


def test_a_layer_norm_with_its_own_forward_finds_its_features_on_dim_1_or_the_last_dim():
    from torchvision.models.convnext import LayerNorm2d

    class CastingLayerNorm(nn.LayerNorm):  # as in CLIP: computes in float32, keeps the last dim's features
        def forward(self, x):
            return super().forward(x.float()).to(x.dtype)

    class ChannelsLast(nn.Module):
        def forward(self, t):
            return t.permute(0, 2, 3, 1)

    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), ChannelsLast(), CastingLayerNorm(6), nn.Flatten(), nn.Linear(96, 3)).eval()
    report = ns.measure(model, [(x, x + 0.1)], layers="2", progress=False)
    assert report.meta["layers"]["2"]["channel_dim"] == 3 and report["2"].shape == (6,)
    square = nn.Sequential(nn.Conv2d(3, 4, 1), LayerNorm2d(4), nn.Flatten(), nn.Linear(64, 3)).eval()
    with pytest.raises(ValueError, match=r"layer '1': LayerNorm2d\(4\), a LayerNorm with its own forward, has 4 neurons, and "
                                         r"its output \[4, 4, 4, 4\] has that many on both dim 1 and the last dim"):
        ns.measure(square, [(x, x + 0.1)], layers="1", progress=False)
    report = ns.measure(square, [(x, x + 0.1)], layers="1", channel_dim={"1": 1}, progress=False)
    assert report["1"].shape == (4,)


def test_a_sequence_first_rnn_is_refused_and_a_block_that_transposes_around_its_attention_is_not():
    class Block(nn.Module):  # DETR-style: sequence-first attention inside a batch-first block
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.mlp = nn.Linear(8, 8)

        def forward(self, x):
            t = x.transpose(0, 1)
            return self.mlp(x + self.attn(t, t, t)[0].transpose(0, 1))

    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.LSTM(8, 8), "block": Block()})
    with pytest.raises(ValueError, match=r"layer 'rnn' runs inside 'rnn', a LSTM with batch_first=False"):
        ns.NeuronSensitivity(model, layers="rnn", channel_dim=-1, output_index=0)
    with pytest.raises(ValueError, match=r"layer 'block.attn' runs inside 'block.attn', a MultiheadAttention"):
        ns.NeuronSensitivity(model, layers="block.attn", output_index=0)
    block = model["block"].eval()
    x = torch.rand(3, 5, 8)
    report = ns.measure(block, [(x, x + 0.1)], layers="mlp", progress=False)
    with torch.no_grad():
        outs = []
        hook = block.mlp.register_forward_hook(lambda m, i, o: outs.append(o))
        block(torch.cat([x, x + 0.1]))
        hook.remove()
    a, b = outs[0].chunk(2)
    torch.testing.assert_close(report["mlp"], (a - b).abs().mean(1).mean(0).double(), rtol=1e-5, atol=1e-7)
