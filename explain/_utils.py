"""Small helpers shared by the explain modules (no public API here)."""
from __future__ import annotations

import copy
import weakref
from typing import Optional, Union

import torch
from torch import nn

from captioning.images import ImageInput, Preprocessing, load_image, preprocess

PixelsLike = Union[ImageInput, torch.Tensor]


def as_pixels(image: PixelsLike, prep: Preprocessing = Preprocessing()) -> torch.Tensor:
    """An image (path, bytes, PIL) or a normalised tensor -> normalised batch (1, 3, S, S).

    A tensor is taken as already preprocessed: (3, S, S) or (1, 3, S, S). It is detached
    and copied, so nothing done here touches the caller's tensor.
    """
    if isinstance(image, torch.Tensor):
        x = image.detach().float().clone()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.size(0) != 1 or x.size(1) != 3:
            raise ValueError(f"expected pixels of shape (3, S, S) or (1, 3, S, S), got {tuple(image.shape)}")
        return x
    return preprocess(load_image(image), prep).unsqueeze(0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The gradient coming back through ``flatten(2).transpose(1, 2)`` has channels-last strides.
    With batch size 1 such a tensor is ambiguous, and PyTorch 2.14's CPU eval-mode
    BatchNorm2d backward then returns wrong input gradients (checked against float64 finite
    differences); a contiguous gradient avoids it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """x, with its gradient made contiguous on the way back (see ``_ContiguousGrad``)."""
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def fmap_to_grid(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) -> grid (B, h*w, C), pooled (B, C), exactly as ``Encoder.forward``."""
    grid = fmap.flatten(2).transpose(1, 2)
    return grid, grid.mean(1)


# (conv, batch-norm) attribute pairs where the forward pass runs bn(conv(x)): the
# efficientnet-lite-pytorch blocks and stem/head, torchvision's ResNet, and Sequential(conv, bn).
_CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"),
                  ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"),
                  ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
_FUSED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]]" = weakref.WeakKeyDictionary()


_MALLOC_TUNED: Optional[bool] = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Stop glibc from handing the attribution methods' activation buffers back to the OS.

    A gradient method allocates and frees the same tens-of-MB activations on every
    forward/backward pass. By default glibc serves blocks over 32 MB with a fresh ``mmap`` and
    trims freed memory at the top of the heap, so every pass page-faults its buffers in again:
    on 2 cores that system time was a quarter of Integrated Gradients' wall time
    (bench/bench_explain.py, README "Speed"). Raising both thresholds keeps the memory in the
    process for reuse. Process-wide, once; a no-op (returns False) where the C library is not
    glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        _MALLOC_TUNED = False
    return _MALLOC_TUNED


def inference_encoder(encoder: nn.Module) -> nn.Module:
    """The encoder with its eval-mode BatchNorms folded into the convolutions before them (and
    symmetric TensorFlow-style static padding moved into the convolutions).

    Same function (checked on a probe input; otherwise the encoder itself is returned), with
    channels-last weights: about half the CPU time per forward+backward pass, which is what
    gradient attribution methods spend their time on. A trainable encoder (in training mode or with parameters that
    require gradients) is returned as is. The fused copy is cached per encoder and rebuilt
    if the encoder's parameters are modified in place.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    keep_freed_memory()
    params = list(encoder.parameters())
    if encoder.training or any(p.requires_grad for p in params):
        return encoder
    version = tuple(p._version for p in params)
    hit = _FUSED.get(encoder)
    if hit is not None and hit[0] == version:
        return hit[1]
    fused = copy.deepcopy(encoder)
    n = 0
    for m in fused.modules():
        pairs = _CONV_BN_PAIRS + ((("0", "1"),) if isinstance(m, nn.Sequential) else ())
        for a, b in pairs:
            conv, bn = getattr(m, a, None), getattr(m, b, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                setattr(m, a, fuse_conv_bn_eval(conv, bn))
                setattr(m, b, nn.Identity())
                n += 1
    # TensorFlow-style "same" convolutions pad with a separate ZeroPad2d; when the padding is
    # symmetric the convolution can pad itself (one op less forward and backward).
    for m in fused.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and m.padding in ((0, 0), [0, 0]):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                m.padding = (top, left)
                m.static_padding = nn.Identity()
                n += 1
    result = encoder
    if n:
        # Channels-last weights make oneDNN run the convolutions (forward and backward) in
        # NHWC: about 2x faster on CPU for this backbone (bench/bench_explain.py). Safe only
        # here, with the BatchNorms folded away: eval-mode BatchNorm mishandles channels-last
        # gradients at batch size 1 (see _ContiguousGrad).
        fused = fused.to(memory_format=torch.channels_last)
        fused.eval()
        for p in fused.parameters():
            p.requires_grad_(False)
        probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, got = encoder.feature_map(probe), fused.feature_map(probe)
        if ref.shape == got.shape and torch.allclose(ref, got, rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-5):
            result = fused
    _FUSED[encoder] = (version, result)
    return result
