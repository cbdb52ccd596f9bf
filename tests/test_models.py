import pytest
import torch
from torch import nn

from neurosens.models import MODELS, Normalize, WideResNet, build_model


pytestmark = pytest.mark.usefixtures("one_thread")


MNIST_ARCHS = {"small-cnn", "trades-cnn", "lenet5"}


@pytest.mark.parametrize("name,channels,size", [("small-cnn", 1, 28), ("small-cnn", 3, 32), ("trades-cnn", 1, 28),
                                                ("trades-cnn", 3, 32), ("lenet5", 1, 28),
                                                ("lenet5", 3, 32), ("resnet18", 3, 32), ("preact-resnet18", 3, 32),
                                                ("vgg16", 3, 32)])
def test_output_shape(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_small_wide_resnet_output_shape():
    model = WideResNet(num_classes=10, depth=10, widen=2).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth=12 must be 6n\\+4"):
        WideResNet(depth=12)


# Parameter counts of the standard CIFAR variants: a changed architecture changes these.
@pytest.mark.parametrize("name,count", [("resnet18", 11_173_962), ("preact-resnet18", 11_172_170),
                                        ("vgg16", 14_724_042), ("wrn-34-10", 46_160_474), ("lenet5", 61_706),
                                        # TRADES' MNIST CNN: convs 1-32-32-64-64 (3x3), then 1024-200-200-10.
                                        ("trades-cnn", (9 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64)
                                         + (9 * 64 * 64 + 64) + (1024 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10))])
def test_parameter_counts(name, count):
    channels, size = (1, 28) if name in MNIST_ARCHS else (3, 32)
    model = build_model(name, 10, channels, size)
    assert sum(p.numel() for p in model.parameters()) == count


EXPECTED_NAMES = {
    "small-cnn": ["normalize", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2"],
    "lenet5": ["normalize", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2",
               "relu4", "fc3"],
    "trades-cnn": ["normalize", "conv1", "conv2", "pool1", "conv3", "conv4", "pool2", "flatten", "fc1", "drop", "fc2",
                   "fc3"],
    "resnet18": ["conv1", "bn1", "relu", "layer1.0.conv1", "layer1.0.relu1", "layer1.1.bn2", "layer2.0.shortcut.0",
                 "layer4.1.conv2", "layer4.1.relu2", "pool", "fc"],
    "preact-resnet18": ["conv1", "layer1.0.bn1", "layer1.0.relu1", "layer1.0.conv1", "layer3.0.shortcut.0",
                        "layer4.1.conv2", "bn", "relu", "fc"],
    "vgg16": ["block1.conv1", "block1.bn1", "block1.relu1", "block1.conv2", "block1.pool", "block5.conv3", "flatten", "fc"],
    "wrn-34-10": ["conv1", "layer1.0.conv1", "layer1.4.conv2", "layer2.0.shortcut.0", "layer3.4.relu2", "bn", "relu", "fc"],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_names_are_stable(name):
    channels, size = (1, 28) if name in MNIST_ARCHS else (3, 32)
    names = dict(build_model(name, 10, channels, size).named_modules())
    missing = [n for n in EXPECTED_NAMES[name] if n not in names]
    assert not missing, f"{name} lacks {missing}"
    # Every activation is its own module, so a hook on it fires once per forward.
    relus = [m for m in names.values() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus})


def test_each_relu_fires_once_per_forward():
    model = build_model("resnet18", 10, 3, 32).eval()
    calls = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert len(calls) == 17 and set(calls.values()) == {1}


def test_normalize_is_inside_the_model():
    norm = Normalize([0.5, 0.25], [0.5, 0.25])
    x = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    torch.testing.assert_close(norm(x), torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match="Normalize has 2 channels, input has 3"):
        norm(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])
    model = build_model("small-cnn", 10, 1, 28, mean=[0.1307], std=[0.3081])
    assert isinstance(model.normalize, Normalize) and "normalize.mean" in model.state_dict()
    assert isinstance(build_model("small-cnn", 10, 1, 28).normalize, nn.Identity)


def test_build_model_errors_name_the_option():
    with pytest.raises(ValueError, match="architecture 'resnet50' is unknown"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="mean has 1 values but in_channels=3"):
        build_model("resnet18", mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="input_size=30 must be a multiple of 4"):
        build_model("small-cnn", in_channels=1, input_size=30)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
