"""Which pixels made the captioner say a word: pixel attribution for one word of a caption.

Every method explains the same scalar, the log-probability of caption word ``t`` given the
image and the caption's own prefix (teacher forcing on the generated caption), so maps of
different methods and decoders are comparable. All methods are Captum's (Kokhlikyan et al.
2020, "Captum: A unified and generic model interpretability library for PyTorch",
arXiv:2009.07896); this module only wires the captioner into them:

* ``integrated_gradients`` -- Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep
  Networks" (arXiv:1703.01365). Completeness: the attributions sum to f(x) - f(baseline), up
  to the reported convergence delta.
* ``smoothgrad`` -- Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise"
  (arXiv:1706.03825): |gradient| (Simonyan et al. 2014) averaged over noisy copies.
* ``gradient_shap`` -- Lundberg & Lee 2017, "A Unified Approach to Interpreting Model
  Predictions" (arXiv:1705.07874), the expected-gradients approximation of SHAP values.
* ``occlusion`` -- Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional
  Networks" (arXiv:1311.2901): the drop in log-probability when a window is blanked.
* ``grad_cam`` -- class-activation maps of an encoder layer, upsampled to the image. By default
  HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations
  of convolutional neural networks", arXiv:2011.08891): the gradient times the activation,
  element-wise, summed over channels, at the last stride-16 stage (14x14). ``gradients="mean"``
  and ``layer="features"`` give the classic Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391)
  on the 7x7 grid the decoder reads. Why the default differs, as measured with deletion curves
  (Petsiuk et al. 2018; README, "Faithfulness of the explanations"): on the 7x7 grid no map,
  not even the decoder's own attention, clearly beats a random deletion order -- its 32-pixel
  cells are too coarse -- so the map is taken one stage earlier. There the gradient varies
  from position to position (through the later stages and the attention), and Grad-CAM's
  per-channel average over the grid discards that; element-wise gradients keep it (HiResCAM;
  LayerCAM, Jiang et al. 2021, IEEE TIP 30:5875, makes the same point for earlier layers).
* ``attention`` -- the Show, Attend and Tell decoder's own soft attention for that word
  (Xu et al. 2015, arXiv:1502.03044). Attention is not an explanation of the output
  (Jain & Wallace 2019, "Attention is not Explanation", arXiv:1902.10186); it is offered for
  comparison with the gradient methods.

Baselines. "Black" means black in pixel space, i.e. the *normalised* black image
``(0 - mean) / std`` -- not the normalised zero tensor, which is the dataset-mean grey. Black
is the default baseline of Integrated Gradients and Occlusion; ``baseline="mean"`` (grey) and
``baseline="blur"`` (the image blurred) are the alternatives.

Dimensions: S image side (224), C feature channels, h x w feature grid (7x7), h' x w' the
grad_cam layer's grid (14x14 by default), T caption length including <end>, V vocabulary.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from captioning.images import Preprocessing

from ._utils import PixelsLike, as_pixels, contiguous_grad, fmap_to_grid, inference_encoder
from .encoder import _run_to, layer_info, list_layers
from .maps import heatmap, normalize_map, overlay  # noqa: F401 (overlays were defined here; callers import them)

METHODS: tuple[str, ...] = ("integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "grad_cam",
                            "attention")

#: Per-method options and their defaults (anything else passed to ``attribute`` is an error).
DEFAULTS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 32, "internal_batch_size": 16, "baseline": "black",
                             "integration": "gausslegendre"},
    "smoothgrad": {"nt_samples": 16, "noise_level": 0.15, "batch_size": 8, "seed": 0},
    # baselines: names (drawn uniformly) or a tensor (k, 3, S, S) of reference images.
    "gradient_shap": {"n_samples": 16, "noise_level": 0.05, "baselines": ("black", "mean", "blur"), "seed": 0},
    "occlusion": {"window": 32, "stride": 16, "baseline": "black", "perturbations_per_eval": 16},
    # layer: "auto" (see cam_layer), "features" (the decoder's 7x7 input) or a name from
    # explain.encoder.list_layers; gradients: "elementwise" (HiResCAM) or "mean" (Grad-CAM).
    "grad_cam": {"layer": "auto", "gradients": "elementwise", "relu": True, "interpolate_mode": "bilinear"},
    "attention": {"interpolate_mode": "bilinear"},
}

BASELINES = ("black", "mean", "blur")
CAM_GRADIENTS = ("elementwise", "mean")
FEATURES = "features"  # grad_cam's name for the encoder's output, the grid the decoder reads


@dataclass
class Attribution:
    """One word's attribution map.

    Attributes:
        map: (S, S) float32 map at the model's input size (use ``overlay`` to show it on an
            image of any size). Positive = evidence for the word. Reductions of ``raw``:
            integrated_gradients / gradient_shap: sum over colour channels (so ``map.sum()``
            keeps completeness); smoothgrad: sum over channels of mean |gradient|; occlusion:
            mean over channels (drop in log-probability); grad_cam: the (h', w') map
            upsampled; attention: the (h, w) map upsampled.
        raw: Captum's output as an array: (3, S, S) for pixel methods, (h', w') for grad_cam
            (14x14 by default), (h, w) for attention.
        method: one of METHODS.
        word: the explained word ("<end>" for the end token). word_index: its position t.
        token: its vocabulary id.
        logprob: log p(word | image, prefix) under the model (the explained quantity).
        metadata: the options used, "seconds", and method extras: "convergence_delta" for
            integrated_gradients and gradient_shap, "baseline_logprob" for integrated_gradients,
            "layer" (the resolved layer name) for grad_cam.
    """

    map: np.ndarray
    raw: np.ndarray
    method: str
    word: str
    word_index: int
    token: int
    logprob: float
    metadata: dict[str, Any] = field(default_factory=dict)


class WordLogProb(nn.Module):
    """pixels (N, 3, S, S) -> (N,) log p(caption word t | image, caption prefix).

    Runs the (frozen, eval-mode) encoder and the decoder teacher-forced on
    ``[<start>] + tokens + [<end>]``; ``logprobs[:, t, targets[t]]`` with
    ``targets = tokens + [<end>]``, so ``t == len(tokens)`` explains the <end> token.
    Gradients flow to the pixels even though no parameter requires them.

    ``self.feature`` is an identity on the encoder's feature map (N, C, h, w): the layer
    grad_cam hooks for ``layer="features"`` (a module of its own, because backbones reuse
    activation modules).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, tokens: Sequence[int], word_index: int,
                 start_id: int = 1, end_id: int = 2):
        super().__init__()
        tokens = [int(t) for t in tokens]
        T = len(tokens) + 1
        if not -T <= word_index < T:
            raise ValueError(f"word_index {word_index} is out of range for a caption of {len(tokens)} words "
                             f"(valid: 0..{len(tokens)}, the last being <end>)")
        self.encoder = encoder.eval()
        self.decoder = decoder.eval()
        self.feature = nn.Identity()
        self.word_index = word_index % T
        self.register_buffer("captions", torch.tensor([[start_id, *tokens, end_id]]), persistent=False)
        self.register_buffer("targets", torch.tensor(tokens + [end_id]), persistent=False)

    def all_logprobs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, T) log-probabilities of every caption word (and <end>)."""
        return self.words_from_features(contiguous_grad(self.encoder.feature_map(pixels)))

    def words_from_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Encoder feature map (N, C, h, w) -> (N, T) log-probabilities of the caption's words."""
        fmap = self.feature(fmap)
        grid, pooled = fmap_to_grid(fmap)
        N = fmap.size(0)
        logp, _ = self.decoder.teacher_forced(grid, pooled, self.captions.expand(N, -1))  # (N, T, V)
        return logp.gather(2, self.targets.view(1, -1, 1).expand(N, -1, 1)).squeeze(2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Word t depends only on the prefix, so the decoder runs t + 1 steps, not the whole caption.
        t = self.word_index
        fmap = self.feature(contiguous_grad(self.encoder.feature_map(pixels)))
        grid, pooled = fmap_to_grid(fmap)
        N = fmap.size(0)
        logp, _ = self.decoder.teacher_forced(grid, pooled, self.captions[:, : t + 2].expand(N, -1))  # (N, t+1, V)
        return logp[:, t, self.targets[t]]


class _LayerWords(nn.Module):
    """One image's activation at an encoder layer, N copies (N, C, h', w') -> (N, T) log-probabilities
    of every caption word: the CAM of every word at once, one row per word.

    With ``layer=None`` the activation is the encoder's output and only the decoder runs.
    Otherwise the encoder runs on the one image (batch 1, no gradient needed: nothing before
    ``layer`` requires it) and a forward hook puts the N copies in place of ``layer``'s output,
    so only the stages after ``layer`` run N times. ``self.feature`` is the identity Captum hooks.
    """

    def __init__(self, scorer: WordLogProb, pixels: torch.Tensor, layer: Optional[nn.Module]):
        super().__init__()
        self.scorer = scorer
        self.pixels = pixels
        self.layer = layer
        self.feature = nn.Identity()

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.scorer.words_from_features(self.feature(act))
        handle = self.layer.register_forward_hook(lambda _m, _i, _out: self.feature(act))
        try:
            return self.scorer.all_logprobs(self.pixels)
        finally:
            handle.remove()


def word_scorer(captioner, caption_tokens: Sequence[int], word_index: int) -> WordLogProb:
    """The module that maps pixels to the word's log-probability, for a Captioner.

    Args:
        captioner: a ``captioning.api.Captioner``.
        caption_tokens: the caption's word ids, without <start>/<end> (``CaptionResult.tokens``).
        word_index: t in 0..len(caption_tokens); len(caption_tokens) is <end>.
    Returns:
        A ``WordLogProb``: (N, 3, S, S) -> (N,).
    """
    v = captioner.vocab
    return WordLogProb(inference_encoder(captioner.encoder), captioner.decoder, caption_tokens, word_index,
                       v.start, v.end)


_CAM_LAYERS: "weakref.WeakKeyDictionary[nn.Module, dict[int, str]]" = weakref.WeakKeyDictionary()


def cam_layer(encoder: nn.Module, layer: str = "auto", size: int = 224) -> str:
    """Resolve grad_cam's ``layer`` option to a layer name.

    Args:
        encoder: the captioner's encoder (a ``captioning.encoders.Encoder``).
        layer: "auto", "features" (the encoder's output, the grid the decoder reads) or a name
            from ``explain.encoder.list_layers``.
        size: the input side S (the layers' grid sizes depend on it).
    Returns:
        ``layer`` itself unless it is "auto". "auto" is the last stage whose grid is twice the
        feature grid (stride 16: 14x14 for S = 224, e.g. "stage5.block10" of EfficientNet-Lite0,
        "layer3" of a ResNet), or "features" if the encoder has no such stage. The next finer
        stage and no earlier one: the later the layer, the more of the model's computation its
        gradient reflects, and the fewer stages run once per word in ``grad_cam_all_words``.
    Raises:
        ValueError: an unknown layer name.
    """
    if layer == "auto":
        cached = _CAM_LAYERS.setdefault(encoder, {})
        if size not in cached:
            with torch.no_grad():
                h = encoder.feature_map(torch.zeros(1, 3, size, size)).shape[-2]
            finer = [info.name for info in layer_info(encoder, size) if info.height == 2 * h]
            cached[size] = finer[-1] if finer else FEATURES
        return cached[size]
    valid = [FEATURES, *list_layers(encoder)]
    if layer not in valid:
        raise ValueError(f"unknown grad_cam layer {layer!r}; valid: auto, {', '.join(valid)}")
    return layer


def _cam(net: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: Optional[list[int]], gradients: str,
         relu: bool) -> torch.Tensor:
    """Captum's class-activation map of ``net``'s output at ``layer``, detached: (N, 1, h', w').

    gradients="mean": Grad-CAM (``LayerGradCam``), channel weights = gradients averaged over
    the grid. "elementwise": HiResCAM, ``LayerGradientXActivation`` (gradient times activation
    at every position) summed over channels; it equals Grad-CAM wherever the gradient is the
    same at every position, e.g. for a decoder that only sees the pooled grid.
    ``relu`` keeps positive evidence only (Selvaraju et al.), for both.
    """
    from captum.attr import LayerGradCam, LayerGradientXActivation

    if gradients not in CAM_GRADIENTS:
        raise ValueError(f"unknown grad_cam gradients {gradients!r}; valid: {', '.join(CAM_GRADIENTS)}")
    if gradients == "mean":
        return LayerGradCam(net, layer).attribute(inputs, target=target, relu_attributions=relu).detach()
    cam = LayerGradientXActivation(net, layer).attribute(inputs, target=target).detach().sum(1, keepdim=True)
    return cam.clamp(min=0) if relu else cam


def make_baseline(pixels: torch.Tensor, kind: Union[str, torch.Tensor], prep: Preprocessing = Preprocessing()
                  ) -> torch.Tensor:
    """A reference image in normalised space, shaped like ``pixels`` (N, 3, S, S).

    Args:
        kind: "black" (pixel value 0, i.e. (0 - mean) / std), "mean" (normalised zeros: the
            dataset-mean colour), "blur" (the image under a strong Gaussian blur), or a tensor
            broadcastable to ``pixels``.
    Returns:
        A new tensor (N, 3, S, S).
    """
    if isinstance(kind, torch.Tensor):
        return kind.detach().to(pixels).expand_as(pixels).clone()
    if kind == "black":
        mean = torch.tensor(prep.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(prep.std, dtype=pixels.dtype).view(1, 3, 1, 1)
        return ((0.0 - mean) / std).expand_as(pixels).clone()
    if kind == "mean":
        return torch.zeros_like(pixels)
    if kind == "blur":
        return blur(pixels)
    raise ValueError(f"unknown baseline {kind!r}; valid: {', '.join(BASELINES)} or a tensor")


def blur(pixels: torch.Tensor, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian blur of a batch (N, 3, S, S) (torchvision); sigma defaults to S / 20."""
    from torchvision.transforms.functional import gaussian_blur

    S = pixels.shape[-1]
    sigma = float(sigma if sigma is not None else S / 20)
    k = int(2 * round(3 * sigma) + 1)
    k = min(k, 2 * ((S - 1) // 2) + 1)
    return gaussian_blur(pixels, [k, k], [sigma, sigma])


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    if seed is None:
        yield
        return
    # Captum draws GradientSHAP's points on the baseline-to-image line from numpy's global
    # generator and the noise from torch's: seed both, and leave both as they were.
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            np.random.seed(int(seed) % 2 ** 32)
            yield
    finally:
        np.random.set_state(np_state)


def _options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    if method not in DEFAULTS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    unknown = set(options) - set(DEFAULTS[method])
    if unknown:
        valid = ", ".join(DEFAULTS[method]) or "none"
        raise ValueError(f"unknown option(s) for {method}: {', '.join(sorted(unknown))}; valid: {valid}")
    return {**DEFAULTS[method], **options}


def attribute(captioner, image: PixelsLike, caption_tokens: Sequence[int], word_index: int,
              method: str = "grad_cam", **options: Any) -> Attribution:
    """Attribute caption word ``word_index`` to the image's pixels.

    Args:
        captioner: a ``captioning.api.Captioner`` (any decoder; "attention" needs show_attend_tell).
        image: path / bytes / PIL image, or the preprocessed tensor (3, S, S) or (1, 3, S, S).
        caption_tokens: the caption's word ids without <start>/<end>, e.g. ``result.tokens``.
        word_index: t in 0..len(caption_tokens) (negative counts from the end; the last is <end>).
        method: one of METHODS.
        **options: method options, see ``DEFAULTS`` (e.g. ``n_steps=64`` for integrated_gradients).
    Returns:
        An ``Attribution`` with ``map`` of shape (S, S).
    Raises:
        ValueError: unknown method or option, bad word index, or attention on a decoder without it.
    """
    opts = _options(method, options)
    pixels = as_pixels(image, captioner.prep)
    scorer = word_scorer(captioner, caption_tokens, word_index)
    t = scorer.word_index
    token = int(scorer.targets[t])
    word = captioner.vocab.itos[token]
    S = pixels.shape[-1]
    t0 = time.perf_counter()
    with torch.no_grad():
        logprob = float(scorer(pixels)[0])
    meta: dict[str, Any] = {"options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}}

    if method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        base = make_baseline(pixels, opts["baseline"], captioner.prep)
        attr = IntegratedGradients(scorer).attribute(
            pixels, baselines=base, n_steps=int(opts["n_steps"]), method=opts["integration"],
            internal_batch_size=opts["internal_batch_size"])
        raw = attr[0].detach()
        heat = raw.sum(0)
        with torch.no_grad():
            meta["baseline_logprob"] = float(scorer(base)[0])
        # Captum's return_convergence_delta would run f(x) and f(baseline) again; both are known.
        meta["convergence_delta"] = abs(float(raw.double().sum()) - (logprob - meta["baseline_logprob"]))
    elif method == "smoothgrad":
        from captum.attr import NoiseTunnel, Saliency

        sd = float(opts["noise_level"]) * float(pixels.max() - pixels.min())
        with _seeded(opts["seed"]):
            attr = NoiseTunnel(Saliency(scorer)).attribute(
                pixels, nt_type="smoothgrad", nt_samples=int(opts["nt_samples"]), stdevs=sd,
                nt_samples_batch_size=opts["batch_size"])
        raw = attr[0].detach()
        heat = raw.sum(0)
        meta["stdev"] = sd
    elif method == "gradient_shap":
        from captum.attr import GradientShap

        bl = opts["baselines"]
        if isinstance(bl, torch.Tensor):  # a ready baseline distribution (k, 3, S, S)
            base = bl.detach().to(pixels).reshape(-1, *pixels.shape[1:])
        else:
            kinds = [bl] if isinstance(bl, str) else list(bl)
            base = torch.cat([make_baseline(pixels, k, captioner.prep) for k in kinds])
        sd = float(opts["noise_level"]) * float(pixels.max() - pixels.min())
        with _seeded(opts["seed"]):
            attr, delta = GradientShap(scorer).attribute(
                pixels, baselines=base, n_samples=int(opts["n_samples"]), stdevs=sd, return_convergence_delta=True)
        raw = attr[0].detach()
        heat = raw.sum(0)
        meta["convergence_delta"] = float(delta.abs().mean())
    elif method == "occlusion":
        from captum.attr import Occlusion

        w, s = int(opts["window"]), int(opts["stride"])
        base = make_baseline(pixels, opts["baseline"], captioner.prep)
        with torch.no_grad():
            attr = Occlusion(scorer).attribute(
                pixels, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=base,
                perturbations_per_eval=int(opts["perturbations_per_eval"]))
        raw = attr[0].detach()
        heat = raw.mean(0)
    elif method == "grad_cam":
        from captum.attr import LayerAttribution

        name = cam_layer(captioner.encoder, opts["layer"], S)
        layer = scorer.feature if name == FEATURES else scorer.encoder.stages()[name]
        cam = _cam(scorer, layer, pixels, None, opts["gradients"], bool(opts["relu"]))  # (1, 1, h', w')
        raw = cam[0, 0]
        heat = LayerAttribution.interpolate(cam, (S, S), opts["interpolate_mode"])[0, 0]
        meta["layer"] = name
    elif method == "attention":
        raw, heat = _attention(captioner, scorer, pixels, opts["interpolate_mode"])
    else:  # pragma: no cover - _options rejects it
        raise AssertionError(method)

    meta["seconds"] = time.perf_counter() - t0
    return Attribution(map=heat.detach().float().numpy().astype(np.float32), raw=raw.float().numpy(), method=method,
                       word=word, word_index=t, token=token, logprob=logprob, metadata=meta)


def _attention(captioner, scorer: WordLogProb, pixels: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr import LayerAttribution

    if not getattr(captioner.decoder, "has_attention", False):
        raise ValueError("the attention method needs a decoder with attention (show_attend_tell)")
    with torch.no_grad():
        fmap = scorer.encoder.feature_map(pixels)  # (1, C, h, w)
        grid, pooled = fmap_to_grid(fmap)
        _, alphas = captioner.decoder.teacher_forced(grid, pooled, scorer.captions)
    h, w = fmap.shape[-2:]
    a = alphas[0, scorer.word_index].view(1, 1, h, w)
    S = pixels.shape[-1]
    return a[0, 0], LayerAttribution.interpolate(a, (S, S), mode)[0, 0]


def grad_cam_all_words(captioner, image: PixelsLike, caption_tokens: Sequence[int], include_end: bool = True,
                       relu: bool = True, interpolate_mode: str = "bilinear", layer: str = "auto",
                       gradients: str = "elementwise") -> list[Attribution]:
    """grad_cam for every word of a caption in one encoder pass and one batched backward pass.

    The encoder runs once without gradients up to the CAM layer; that activation is repeated
    once per word, only what comes after it (the later stages and the decoder, ``_LayerWords``)
    runs on the copies, and Captum takes each row's gradient for its own word
    (``target=[0, 1, ...]``), so the result equals ``attribute(..., method="grad_cam")`` word by word.

    Args:
        captioner: a ``captioning.api.Captioner``.
        image: path / bytes / PIL image or preprocessed (3, S, S) / (1, 3, S, S) tensor.
        caption_tokens: the caption's word ids without <start>/<end>.
        include_end: also explain the <end> token.
        relu, interpolate_mode, layer, gradients: the grad_cam options (``DEFAULTS``).
    Returns:
        One ``Attribution`` per word (len(caption_tokens) [+1]), each ``map`` (S, S).
    """
    from captum.attr import LayerAttribution

    t0 = time.perf_counter()
    pixels = as_pixels(image, captioner.prep)
    scorer = word_scorer(captioner, caption_tokens, 0)
    T = len(caption_tokens) + (1 if include_end else 0)
    if T == 0:
        return []
    S = pixels.shape[-1]
    name = cam_layer(captioner.encoder, layer, S)
    with torch.no_grad():
        act = scorer.encoder.feature_map(pixels) if name == FEATURES else _run_to(scorer.encoder, pixels, name)
    net = _LayerWords(scorer, pixels, None if name == FEATURES else scorer.encoder.stages()[name])
    inputs = act.expand(T, *act.shape[1:]).clone()  # (T, C, h', w')
    with torch.no_grad():
        logps = net(inputs[:1])[0]  # (T,)
    cams = _cam(net, net.feature, inputs, list(range(T)), gradients, relu)  # (T, 1, h', w')
    up = LayerAttribution.interpolate(cams, (S, S), interpolate_mode)  # (T, 1, S, S)
    secs = (time.perf_counter() - t0) / T
    options = {"layer": layer, "gradients": gradients, "relu": relu, "interpolate_mode": interpolate_mode}
    out = []
    for t in range(T):
        token = int(scorer.targets[t])
        out.append(Attribution(map=up[t, 0].numpy().astype(np.float32), raw=cams[t, 0].numpy(),
                               method="grad_cam", word=captioner.vocab.itos[token], word_index=t, token=token,
                               logprob=float(logps[t]),
                               metadata={"options": dict(options), "layer": name, "seconds": secs, "batched": True}))
    return out


def attention_all_words(captioner, image: PixelsLike, caption_tokens: Sequence[int], include_end: bool = True,
                        interpolate_mode: str = "bilinear") -> list[Attribution]:
    """The attention map of every word from one teacher-forced decoder pass (show_attend_tell).

    Returns:
        One ``Attribution`` (method "attention") per word (len(caption_tokens) [+1]); same maps
        as ``attribute(..., method="attention")`` word by word.
    """
    from captum.attr import LayerAttribution

    if not getattr(captioner.decoder, "has_attention", False):
        raise ValueError("the attention method needs a decoder with attention (show_attend_tell)")
    t0 = time.perf_counter()
    pixels = as_pixels(image, captioner.prep)
    scorer = word_scorer(captioner, caption_tokens, 0)
    T = len(caption_tokens) + (1 if include_end else 0)
    with torch.no_grad():
        fmap = scorer.encoder.feature_map(pixels)
        grid, pooled = fmap_to_grid(fmap)
        logp, alphas = captioner.decoder.teacher_forced(grid, pooled, scorer.captions)  # (1, T', V), (1, T', P)
    h, w = fmap.shape[-2:]
    S = pixels.shape[-1]
    a = alphas[0, :T].view(T, 1, h, w)
    up = LayerAttribution.interpolate(a, (S, S), interpolate_mode)
    secs = (time.perf_counter() - t0) / max(T, 1)
    out = []
    for t in range(T):
        token = int(scorer.targets[t])
        out.append(Attribution(map=up[t, 0].numpy().astype(np.float32), raw=a[t, 0].numpy().copy(), method="attention",
                               word=captioner.vocab.itos[token], word_index=t, token=token,
                               logprob=float(logp[0, t, token]),
                               metadata={"options": {"interpolate_mode": interpolate_mode}, "seconds": secs,
                                         "batched": True}))
    return out


def attribute_caption(captioner, image: PixelsLike, caption_tokens: Sequence[int], method: str = "grad_cam",
                      include_end: bool = True, **options: Any) -> list[Attribution]:
    """Attribute every word of a caption: batched for grad_cam and attention, word by word otherwise.

    Args:
        as for ``attribute``; include_end: also explain <end>.
    Returns:
        One ``Attribution`` per word, in caption order.
    """
    if method == "grad_cam":
        o = _options(method, options)
        return grad_cam_all_words(captioner, image, caption_tokens, include_end, **o)
    if method == "attention":
        o = _options(method, options)
        return attention_all_words(captioner, image, caption_tokens, include_end, o["interpolate_mode"])
    pixels = as_pixels(image, captioner.prep)
    T = len(caption_tokens) + (1 if include_end else 0)
    return [attribute(captioner, pixels, caption_tokens, t, method, **options) for t in range(T)]


def available_methods(captioner) -> list[str]:
    """The methods that apply to this captioner (``attention`` only with an attention decoder)."""
    has_att = getattr(captioner.decoder, "has_attention", False)
    return [m for m in METHODS if m != "attention" or has_att]
