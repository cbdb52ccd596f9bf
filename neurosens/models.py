"""Models for MNIST-sized and CIFAR-sized inputs, with stable layer names.

Every model starts with ``normalize`` (a :class:`Normalize`, or identity), so it takes pixels in
[0, 1] and attack budgets stay in pixel units. Each activation is its own module (never one ReLU
reused), so a forward hook on it sees exactly one output per forward.

Layer names (what ``model.named_modules()`` gives, and what sensitivity and SNS select):

- ``small-cnn``: ``conv1 relu1 pool1 conv2 relu2 pool2 flatten fc1 relu3 fc2``
- ``lenet5``: ``conv1 relu1 pool1 conv2 relu2 pool2 flatten fc1 relu3 fc2 relu4 fc3``
- ``resnet18``: ``conv1 bn1 relu``, ``layer{1..4}.{0,1}.{conv1,bn1,relu1,conv2,bn2,shortcut,relu2}``,
  ``pool fc``
- ``preact-resnet18``: ``conv1``, ``layer{1..4}.{0,1}.{bn1,relu1,conv1,bn2,relu2,conv2,shortcut}``,
  ``bn relu pool fc``
- ``vgg16``: ``block{1..5}.{conv,bn,relu}{i}`` and ``block{1..5}.pool``, ``flatten fc``
- ``wrn-34-10``: ``conv1``, ``layer{1..3}.{0..4}.{bn1,relu1,conv1,bn2,relu2,conv2,shortcut}``,
  ``bn relu pool fc``

``shortcut`` is an empty ``nn.Sequential`` (identity) unless the block changes shape.
"""
import inspect

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std kept as buffers (saved with the model)."""

    def __init__(self, mean, std):
        super().__init__()
        # Made on the CPU also under a meta default device, so that the check below can read them.
        mean = torch.as_tensor(mean, dtype=torch.float32, device="cpu")
        std = torch.as_tensor(std, dtype=torch.float32, device="cpu")
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be 1-D and of one length, got {tuple(mean.shape)} and {tuple(std.shape)}")
        if (std <= 0).any():
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Normalize has {self.mean.shape[1]} channels, input has {x.shape[1]} (shape {tuple(x.shape)})")
        return (x - self.mean) / self.std

    def extra_repr(self):
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _normalize(mean, std):
    return nn.Identity() if mean is None else Normalize(mean, std)


def _check_size(name, input_size, multiple):
    if input_size % multiple:
        raise ValueError(f"{name}: input_size={input_size} must be a multiple of {multiple}")


class SmallCNN(nn.Module):
    """Two 5x5 conv layers with max pooling and two linear layers: a cheap MNIST model."""

    def __init__(self, num_classes=10, in_channels=1, input_size=28, width=16, hidden=128, mean=None, std=None):
        super().__init__()
        _check_size("small-cnn", input_size, 4)
        self.normalize = _normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * (input_size // 4) ** 2, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(self.normalize(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class TradesCNN(nn.Module):
    """The small CNN of the TRADES MNIST experiments: four unpadded 3x3 convolutions of 32, 32, 64
    and 64 channels with a 2x2 max-pool after the second and the fourth, then fully connected
    layers of 200 and 200 units (dropout 0.5 after the first) and the classes: 1024-200-200-10 on
    28x28 inputs. The ReLUs are out of place: the same function as the published in-place ones,
    but they leave the conv outputs that SNS keeps intact."""

    def __init__(self, num_classes=10, in_channels=1, input_size=28, mean=None, std=None):
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"trades-cnn: input_size={input_size} is too small (need at least 14)")
        self.normalize = _normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, 3)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(64, 64, 3)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * side * side, 200)
        self.relu5 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(200, 200)
        self.relu6 = nn.ReLU()
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(self.normalize(x)))))
        x = self.pool1(x)
        x = self.pool2(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        x = self.drop(self.relu5(self.fc1(self.flatten(x))))
        return self.fc3(self.relu6(self.fc2(x)))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; 28x28 inputs are padded so conv1 sees 32x32."""

    def __init__(self, num_classes=10, in_channels=1, input_size=28, mean=None, std=None):
        super().__init__()
        padding = 2 if input_size == 28 else 0
        side = ((input_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5: input_size={input_size} is too small (need at least 28)")
        self.normalize = _normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(self.normalize(x))))
        x = self.flatten(self.pool2(self.relu2(self.conv2(x))))
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(x)))))


def _shortcut(cin, cout, stride, bn=True):
    if stride == 1 and cin == cout:
        return nn.Sequential()
    layers = [nn.Conv2d(cin, cout, 1, stride, bias=False)]
    return nn.Sequential(*layers, nn.BatchNorm2d(cout)) if bn else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block; ``drop`` > 0 adds dropout between the convs (as WideResNet allows)."""

    def __init__(self, cin, cout, stride=1, drop=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = _shortcut(cin, cout, stride, bn=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        # A reshaping shortcut reads the activated input, as in the pre-activation ResNet paper.
        skip = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv2(self.drop(self.relu2(self.bn2(self.conv1(out)))))
        return out + skip


def _stage(block, cin, cout, blocks, stride, **kw):
    return nn.Sequential(*(block(cin if i == 0 else cout, cout, stride if i == 0 else 1, **kw) for i in range(blocks)))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stem without max pooling."""

    def __init__(self, num_classes=10, in_channels=3, input_size=32, mean=None, std=None):
        super().__init__()
        self.normalize = _normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = _stage(BasicBlock, 64, 64, 2, 1)
        self.layer2 = _stage(BasicBlock, 64, 128, 2, 2)
        self.layer3 = _stage(BasicBlock, 128, 256, 2, 2)
        self.layer4 = _stage(BasicBlock, 256, 512, 2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


class PreActResNet18(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, input_size=32, mean=None, std=None):
        super().__init__()
        self.normalize = _normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1 = _stage(PreActBlock, 64, 64, 2, 1)
        self.layer2 = _stage(PreActBlock, 64, 128, 2, 2)
        self.layer3 = _stage(PreActBlock, 128, 256, 2, 2)
        self.layer4 = _stage(PreActBlock, 256, 512, 2, 2)
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x))))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


class WideResNet(nn.Module):
    """WideResNet-depth-widen for 32x32 inputs (pre-activation blocks); 34-10 by default."""

    def __init__(self, num_classes=10, in_channels=3, input_size=32, depth=34, widen=10, drop=0.0, mean=None, std=None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wide-resnet: depth={depth} must be 6n+4")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = _normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.layer1 = _stage(PreActBlock, widths[0], widths[1], n, 1, drop=drop)
        self.layer2 = _stage(PreActBlock, widths[1], widths[2], n, 2, drop=drop)
        self.layer3 = _stage(PreActBlock, widths[2], widths[3], n, 2, drop=drop)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x)))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


class VGG16(nn.Module):
    """VGG-16 with batch norm for 32x32 inputs: five conv blocks, each ending in max pooling."""

    PLAN = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]

    def __init__(self, num_classes=10, in_channels=3, input_size=32, mean=None, std=None):
        super().__init__()
        _check_size("vgg16", input_size, 32)
        self.normalize = _normalize(mean, std)
        cin = in_channels
        for b, widths in enumerate(self.PLAN, 1):
            block = nn.Sequential()
            for i, cout in enumerate(widths, 1):
                block.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
                block.add_module(f"bn{i}", nn.BatchNorm2d(cout))
                block.add_module(f"relu{i}", nn.ReLU())
                cin = cout
            block.add_module("pool", nn.MaxPool2d(2))
            self.add_module(f"block{b}", block)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512 * (input_size // 32) ** 2, num_classes)

    def forward(self, x):
        x = self.normalize(x)
        for b in range(1, len(self.PLAN) + 1):
            x = getattr(self, f"block{b}")(x)
        return self.fc(self.flatten(x))


#: Architecture name -> constructor(num_classes, in_channels, input_size, mean, std, **options).
MODELS = {
    "small-cnn": SmallCNN,
    "trades-cnn": TradesCNN,
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "preact-resnet18": PreActResNet18,
    "vgg16": VGG16,
    "wrn-34-10": WideResNet,
}


def build_model(name, num_classes=10, in_channels=3, input_size=32, mean=None, std=None, **options):
    """Build a model by name (see :data:`MODELS`). ``mean``/``std`` (per channel) add a Normalize
    layer; ``options`` go to the constructor (e.g. ``width`` for small-cnn, ``depth``/``widen`` for
    wrn-34-10)."""
    if name not in MODELS:
        raise ValueError(f"architecture {name!r} is unknown; expected one of {', '.join(MODELS)}")
    if mean is not None and len(mean) != in_channels:
        raise ValueError(f"mean has {len(mean)} values but in_channels={in_channels}")
    known = [p for p in inspect.signature(MODELS[name]).parameters
             if p not in ("self", "num_classes", "in_channels", "input_size", "mean", "std")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"architecture {name!r} takes no option {', '.join(unknown)}; "
                         f"its options: {', '.join(known) or 'none'}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                        mean=mean, std=std, **options)
