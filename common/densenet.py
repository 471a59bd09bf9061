"""DenseNet-121 (Huang et al. 2017, "Densely Connected Convolutional Networks"), module for
module and key for key torchvision's ``densenet121``, without importing torchvision.

Why our own: importing torchvision costs about 2 s and 160 MB of resident memory in every
process that builds a model (torch alone is about 1.8 s), because its package imports its
ops, datasets and transforms. A deployed node starts a ClientApp process per message and a
simulation starts one per actor, so that import is paid again and again for one class.

What is kept, so that everything written for torchvision's model still holds:
- the module tree and state-dict keys (``features.denseblock1.denselayer1.norm1.weight``,
  ...): torchvision weight files load unchanged;
- the construction and initialisation order: the same seed draws the same initial weights
  as ``torchvision.models.densenet121(weights=None)`` (``tests/test_model.py`` compares
  them), so seeded runs are unchanged;
- the arithmetic of the forward pass. Dropped: memory-efficient checkpointing and the
  TorchScript overloads (never used here), and in-place ReLU (see ``common.model``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

GROWTH = 32
BLOCKS = (6, 12, 24, 16)  # DenseNet-121
INIT_FEATURES = 64
BN_SIZE = 4
IMAGENET_CLASSES = 1000  # torchvision builds this head first; its draws are kept (see above)


class DenseLayer(nn.Module):
    def __init__(self, num_input_features: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(num_input_features, BN_SIZE * GROWTH, kernel_size=1, stride=1,
                               bias=False)
        self.norm2 = nn.BatchNorm2d(BN_SIZE * GROWTH)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(BN_SIZE * GROWTH, GROWTH, kernel_size=3, stride=1, padding=1,
                               bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    _version = 2  # as torchvision's: the state dict's metadata stays the same

    def __init__(self, num_layers: int, num_input_features: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * GROWTH))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1,
                              stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def densenet121_features() -> tuple[nn.Sequential, nn.Linear]:
    """torchvision's ``densenet121(weights=None)``: its ``features`` and its (ImageNet)
    ``classifier``, built and initialised in torchvision's order."""
    features = nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(3, INIT_FEATURES, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(INIT_FEATURES)),
        ("relu0", nn.ReLU()),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))
    num_features = INIT_FEATURES
    for i, num_layers in enumerate(BLOCKS):
        features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, num_features))
        num_features += num_layers * GROWTH
        if i != len(BLOCKS) - 1:
            features.add_module(f"transition{i + 1}",
                                Transition(num_features, num_features // 2))
            num_features //= 2
    features.add_module("norm5", nn.BatchNorm2d(num_features))
    classifier = nn.Linear(num_features, IMAGENET_CLASSES)
    for m in [*features.modules(), classifier]:  # torchvision's init, in its module order
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)
    return features, classifier
