import pytest
import torch
from torch import nn

import neurosens as ns
from neurosens.capture import ActivationCapture, LayerHooks, capture_activations, output_tensor
from neurosens.layers import NeuronDims, select_layers


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.relu = nn.ReLU()  # called twice per forward, as in common ResNet code

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = nn.Sequential(Block(4, 4), Block(4, 4))
        self.layer2 = nn.Sequential(Block(4, 8, 2))
        self.act = nn.LeakyReLU()
        self.fc = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Pair(nn.Module):
    def forward(self, x):
        return x, x.sum(1)


def hook_counts(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_select_by_name_glob_type_and_auto():
    net = Net()
    assert list(select_layers(net, "layer1.0.conv2")) == ["layer1.0.conv2"]
    assert list(select_layers(net, "layer*.*.conv2")) == ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"]
    assert list(select_layers(net, nn.Linear)) == ["fc", "unused"]
    assert list(select_layers(net, (nn.BatchNorm2d, nn.LeakyReLU))) == ["layer1.0.bn1", "layer1.1.bn1", "layer2.0.bn1", "act"]
    convs = [f"layer{i}.{j}.conv{k}" for i, j in [(1, 0), (1, 1), (2, 0)] for k in (1, 2)]
    assert list(select_layers(net, "auto")) == ["conv1"] + convs + ["fc", "unused"]
    assert list(select_layers(net, "auto", auto="relu")) == ["layer1.0.relu", "layer1.1.relu", "layer2.0.relu", "act"]


def test_select_list_is_deduplicated_in_model_order():
    net = Net()
    chosen = select_layers(net, ["fc", "conv1", "layer1.0.*", "conv1", nn.Linear])
    assert list(chosen) == ["conv1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.relu", "fc", "unused"]
    assert chosen["fc"] is net.fc


def test_select_sees_through_data_parallel():
    net = Net()
    assert list(select_layers(nn.DataParallel(net), "layer2.*.conv?")) == ["layer2.0.conv1", "layer2.0.conv2"]


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"no layer named 'layer1.0.conv3'.*close matches: .*layer1.0.conv1"):
        select_layers(Net(), "layer1.0.conv3")


@pytest.mark.parametrize(
    "layers, message",
    [
        ("layer9.*", r"pattern 'layer9.\*' matches no layer of Net"),
        (nn.Conv1d, r"Net has no module of that type"),
        (3, r"each entry must be a layer name"),
        ([], r"list of layers is empty"),
    ],
)
def test_selection_errors(layers, message):
    with pytest.raises((ValueError, TypeError), match=message):
        select_layers(Net(), layers)


def test_unknown_auto_kind():
    with pytest.raises(ValueError, match=r"auto='gelu' is unknown"):
        select_layers(Net(), "auto", auto="gelu")


def test_capture_matches_manual_forward():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(5, 1, 8, 8)
    acts = capture_activations(net, x, ["conv1", "layer1.0.conv1", "fc"])
    conv1 = net.conv1(x)
    torch.testing.assert_close(acts["conv1"], conv1, rtol=0, atol=0)
    torch.testing.assert_close(acts["layer1.0.conv1"], net.layer1[0].conv1(net.act(conv1)), rtol=0, atol=0)
    torch.testing.assert_close(acts["fc"], net(x), rtol=0, atol=0)
    assert hook_counts(net) == 0


def test_capture_keeps_every_call_of_a_shared_module():
    net = Net().eval()
    with torch.no_grad(), ActivationCapture(net, "layer1.0.relu") as cap:
        net(torch.randn(2, 1, 8, 8))
    assert cap.calls["layer1.0.relu"] == 2
    first, second = cap.outputs["layer1.0.relu"]
    assert cap.activations["layer1.0.relu"] is second and first.shape == second.shape


def test_capture_detach_false_keeps_the_graph():
    net = Net()
    with ActivationCapture(net, "fc", detach=False) as cap:
        net(torch.randn(2, 1, 8, 8))
    cap.activations["fc"].sum().backward()
    assert net.fc.weight.grad is not None


def test_hooks_removed_after_an_exception():
    net = Net()
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(net, "auto"):
            assert hook_counts(net) == 9
            raise RuntimeError("boom")
    assert hook_counts(net) == 0
    with pytest.raises(RuntimeError):
        with ActivationCapture(net, "auto"):
            net(torch.randn(2, 3, 8, 8))  # wrong number of input channels
    assert hook_counts(net) == 0


def test_module_that_never_ran():
    net = Net()
    with ActivationCapture(net, ["fc", "unused"]) as cap:
        net(torch.randn(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match=r"'unused' never ran in the forward pass"):
        cap.activations


def test_tuple_outputs_need_an_index():
    model = nn.Sequential(Pair())
    with pytest.raises(TypeError, match=r"layer '0' returned a tuple \(Tensor, Tensor\), not a tensor; .*output_index"):
        capture_activations(model, torch.randn(2, 3), "0")
    assert hook_counts(model) == 0
    x = torch.randn(2, 3)
    torch.testing.assert_close(capture_activations(model, x, "0", output_index=1)["0"], x.sum(1))
    with pytest.raises(IndexError, match=r"output_index=5 is not in its output \(2 items\)"):
        capture_activations(model, x, "0", output_index=5)


def test_output_tensor_errors():
    with pytest.raises(TypeError, match=r"layer 'a' returned a NoneType, not a tensor"):
        output_tensor("a", None)
    with pytest.raises(TypeError, match=r"output_index=0 was given but the layer returned a Tensor"):
        output_tensor("a", torch.zeros(2), output_index=0)
    assert output_tensor("a", {"h": torch.ones(1)}, output_index="h").item() == 1


def test_channel_dim_checks():
    net = nn.Sequential(Pair())
    modules = select_layers(net, "0")
    assert NeuronDims(net, modules, -1)("0", torch.zeros(2, 3, 4)) == 2
    with pytest.raises(ValueError, match=r"layer '0': output of shape \[5\] has no channel dim"):
        NeuronDims(net, modules, 1)("0", torch.zeros(5))
    with pytest.raises(ValueError, match=r"channel_dim=3 is out of range for its output of shape \[2, 3\]"):
        NeuronDims(net, modules, 3)("0", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"channel_dim=-2 points at the batch dim"):
        NeuronDims(net, modules, -2)("0", torch.zeros(2, 3))


def test_layer_hooks_pass_each_output():
    net = Net().eval()
    seen = []
    with LayerHooks(select_layers(net, nn.Linear), lambda name, t: seen.append((name, tuple(t.shape)))) as hooks:
        net(torch.randn(3, 1, 8, 8))
    assert seen == [("fc", (3, 3))]
    assert hooks.calls == {"fc": 1, "unused": 0}
    assert hook_counts(net) == 0


def test_a_compiled_model_is_measured_through_its_original_module():
    from neurosens.attacks import NeuronPGD
    from neurosens.capture import capture_activations
    from neurosens.interventions import accuracies, intervene

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x_adv, y = (x + 0.1).clamp(0, 1), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        compiled(torch.cat([x, x_adv]))  # traced before any hook exists, as in a user's loop
    report, plain = ns.measure(compiled, [(x, x_adv, y)], progress=False), ns.measure(model, [(x, x_adv, y)], progress=False)
    assert report.layers == ["0", "3"]
    for name in report.layers:
        assert torch.equal(report[name], plain[name])
    assert torch.equal(capture_activations(compiled, x, layers="0")["0"], model[0](x))
    attack = NeuronPGD(compiled, 0.1, layers="0", k=2, feature_only=True)
    assert torch.equal(attack.objective(x, x_adv, y), NeuronPGD(model, 0.1, layers="0", k=2, feature_only=True).objective(x, x_adv, y))
    batches = [(x, x_adv, y)]
    assert accuracies(compiled, batches, "0", [0, 1]) == accuracies(model, batches, "0", [0, 1])
    refusal = r"the model is torch.compile'd, and compiled code skips the hooks that see its layers; pass the original module"
    for make in (lambda: ns.SNSRegularizer(compiled, k=1), lambda: ActivationCapture(compiled, "0"),
                 lambda: intervene(compiled, "0", [0]).__enter__(), lambda: ns.SNSRegularizer(nn.DataParallel(compiled), k=1)):
        with pytest.raises(ValueError, match=refusal):
            make()
    # A compiled part is refused by name: its hooks would not fire, and no original can stand in for it.
    partly = nn.Sequential(torch.compile(nn.Sequential(nn.Conv2d(1, 4, 3)), backend="eager"), nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(ValueError, match=r"layer '0._orig_mod.0' runs inside a torch.compile'd submodule"):
        ns.measure(partly, [(x, x_adv)], progress=False)


class AppliesItsWeights(nn.Module):
    """Uses ``qkv`` only through its weights, as torchvision's Swin attention does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.fc = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(nn.functional.linear(x, self.qkv.weight, self.qkv.bias)))


def test_auto_leaves_out_layers_whose_weights_their_parent_applies_and_says_so():
    model = AppliesItsWeights()
    x = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    x_adv = x + 0.1
    with pytest.warns(UserWarning, match=r"NeuronSensitivity: 1 of the layers chosen by the rule never ran as modules .* left out: qkv"):
        report = ns.measure(model, [(x, x_adv), (x, x_adv)], progress=False)
    assert report.layers == ["fc"]
    torch.testing.assert_close(report["fc"], (model(x) - model(x_adv)).abs().mean(0).double().detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"layer\(s\) 'qkv' never ran .*applies their weights directly"):
        ns.measure(model, [(x, x_adv)], layers=["qkv", "fc"], progress=False)
    reg = ns.SNSRegularizer(model, k=1.0)
    with reg.capture():
        a, b = model(torch.cat([x, x_adv])).chunk(2)
    with pytest.warns(UserWarning, match=r"SNS: 1 of the layers .* left out: qkv"):
        term = reg.loss()
    torch.testing.assert_close(term, (a - b).abs().mean(), rtol=1e-6, atol=1e-7)
    assert list(reg.modules) == ["fc"]
    # A resumed regularizer leaves the layer out again.
    resumed = ns.SNSRegularizer(model, k=1.0)
    resumed.load_state_dict(reg.state_dict())
    with resumed.capture():
        model(torch.cat([x, x_adv]))
    with pytest.warns(UserWarning, match=r"left out: qkv"):
        torch.testing.assert_close(resumed.loss(), term)
    # The neuron-targeted attack, with its default layers, too.
    from neurosens.attacks import NeuronPGD

    with pytest.warns(UserWarning, match=r"NeuronPGD: 1 of the layers .* left out: qkv"):
        attack = NeuronPGD(model, 0.1, k=1.0, feature_only=True)
        attack.objective(x, x_adv, torch.zeros(4, dtype=torch.long))
    assert attack.layers == ["fc"]


def test_a_model_none_of_whose_chosen_layers_runs_as_a_module_is_refused():
    class OnlyWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return nn.functional.linear(x, self.fc.weight, self.fc.bias)

    model, x = OnlyWeights(), torch.rand(2, 4)
    reg = ns.SNSRegularizer(model, k=1)
    with reg.capture():
        model(torch.cat([x, x]))
    with pytest.raises(RuntimeError, match=r"SNS: none of the layers chosen by the rule ran as a module"):
        reg.loss()
    with pytest.raises(RuntimeError, match=r"NeuronSensitivity: none of the layers chosen by the rule ran as a module"):
        ns.measure(model, [(x, x)], progress=False)
