"""Decoding settings as one value: what ``Captioner.caption``, the CLI, evaluation and the app
pass around, and what a bundle's ``config.json`` records under ``decoding`` (chosen on the dev
split). The ``decoding`` section is parsed and checked here and nowhere else."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional, Union

from .guidance import GuideSettings

GuideRequest = Union[None, bool, dict, GuideSettings]
METHODS = ("beam", "greedy", "sample")
# The keys of config.json's "decoding" section (beam_size is what `ship` evaluated with).
SECTION_KEYS = ("beam_size", "length_penalty", "rerank", "rerank_pool", "guide")


@dataclass(frozen=True)
class DecodeConfig:
    """How to turn a photo's features into captions.

    A field left None means "the bundle's choice" (its ``decoding`` section): ``length_penalty``,
    ``rerank`` (the matcher's weight when re-ranking the finished beams; 0: off), ``rerank_pool``
    (how many finished captions re-ranking considers; 0: ``beam_size``) and ``guide`` (guided
    decoding: True/False, a dict of settings or GuideSettings; see guidance.py).
    ``guide_settings`` is what ``guide=True`` means: the bundle's settings."""

    method: str = "beam"
    beam_size: int = 3
    nbest: int = 1
    max_len: int = 20
    min_len: int = 1
    length_penalty: Optional[float] = None
    no_repeat_ngram: int = 0
    temperature: float = 1.0
    top_k: int = 0
    allow_unk: bool = False
    rerank: Optional[float] = None
    rerank_pool: Optional[int] = None
    guide: GuideRequest = None
    guide_settings: GuideSettings = GuideSettings()

    def replace(self, **changes: Any) -> "DecodeConfig":
        """A copy with ``changes``; an unknown name is a TypeError that names it."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown decoding setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    # --- a bundle's config.json ------------------------------------------------------------

    @classmethod
    def from_bundle(cls, config: Optional[dict]) -> "DecodeConfig":
        """The settings a bundle recommends (config.json ``decoding``; defaults where it names
        none), with every None resolved. Raises ValueError, in one line, for a section of the
        wrong shape, wrong types or unknown guide settings."""
        sec = (config or {}).get("decoding")
        if sec is None:
            sec = {}
        if not isinstance(sec, dict):
            raise ValueError(f"decoding must be an object, got {sec!r:.60}")
        nums = {}
        for k, default in (("length_penalty", 0.0), ("rerank", 0.0), ("rerank_pool", 0), ("beam_size", 3)):
            v = sec.get(k, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"decoding must be an object of finite numbers "
                                 f"(length_penalty, rerank, rerank_pool >= 0), got {sec!r:.60}")
            nums[k] = v
        for k in ("rerank_pool", "beam_size"):
            if int(nums[k]) != nums[k] or nums[k] < (0 if k == "rerank_pool" else 1):
                raise ValueError(f"decoding.{k} must be an integer >= {0 if k == 'rerank_pool' else 1}, "
                                 f"got {sec.get(k)!r:.30}")
        g = sec.get("guide") or {}
        if not isinstance(g, dict):
            raise ValueError(f"guide settings must be an object, got {g!r:.60}")
        unknown = set(g) - {"on"} - {f.name for f in fields(GuideSettings)}
        if unknown:
            raise ValueError(f"decoding.guide: unknown setting(s) {', '.join(sorted(unknown))} "
                             f"(known: on, {', '.join(f.name for f in fields(GuideSettings))})")
        settings = GuideSettings.from_dict(g)
        return cls(beam_size=int(nums["beam_size"]), length_penalty=float(nums["length_penalty"]),
                   rerank=float(nums["rerank"]), rerank_pool=int(nums["rerank_pool"]),
                   guide=bool(g.get("on", False)), guide_settings=settings)

    def to_bundle(self) -> dict:
        """This as config.json's ``decoding`` section: re-ranking keys only when it is on, the
        guide only when it was set."""
        out: dict[str, Any] = {"beam_size": int(self.beam_size), "length_penalty": float(self.length_penalty or 0.0)}
        if self.rerank:
            out["rerank"] = float(self.rerank)
            if self.rerank_pool:
                out["rerank_pool"] = int(self.rerank_pool)
        if self.guide is not None:
            g = self.guide if isinstance(self.guide, GuideSettings) else self.guide_settings
            out["guide"] = {"on": self.guide is not False, **asdict(g)}
        return out

    # --- a request against a bundle ----------------------------------------------------------

    def resolve(self, bundle: "DecodeConfig") -> "DecodeConfig":
        """This request with the bundle's choices where it leaves them open: ``length_penalty``,
        ``rerank``, ``rerank_pool`` become numbers and ``guide`` None (off) or GuideSettings."""
        return replace(self,
                       length_penalty=bundle.length_penalty if self.length_penalty is None else self.length_penalty,
                       rerank=bundle.rerank if self.rerank is None else self.rerank,
                       rerank_pool=bundle.rerank_pool if self.rerank_pool is None else self.rerank_pool,
                       guide=self.guide_for(bundle), guide_settings=bundle.guide_settings)

    def guide_for(self, bundle: "DecodeConfig") -> Optional[GuideSettings]:
        """None -> the bundle's choice, False -> off, True -> on with the bundle's settings, a
        dict -> the bundle's settings updated by it, GuideSettings -> those."""
        guide = bundle.guide if self.guide is None else self.guide
        if guide is None or guide is False:
            return None
        if guide is True:
            return bundle.guide_settings
        if isinstance(guide, GuideSettings):
            return guide
        if isinstance(guide, dict):
            return GuideSettings.from_dict({**asdict(bundle.guide_settings), **guide})
        raise ValueError(f"guide must be None, a bool, a dict or GuideSettings, got {type(guide).__name__}")

    def check(self) -> None:
        """Raise ValueError for settings out of range, before any image is read."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.method == "beam" and self.nbest > self.beam_size:
            raise ValueError(f"nbest ({self.nbest}) cannot exceed beam_size ({self.beam_size})")
        if self.rerank_pool is not None and self.rerank_pool < 0:
            raise ValueError(f"rerank_pool must be >= 0, got {self.rerank_pool}")
