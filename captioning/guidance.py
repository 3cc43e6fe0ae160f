"""Guided decoding: what the encoder's ImageNet head recognises steers beam search.

Anderson et al. 2017, "Guided Open Vocabulary Image Captioning with Constrained Beam Search"
(EMNLP): when a tagger is confident about a concept, beam search is constrained to captions that
name it (decoding.guided_beam_search; one disjunctive constraint, two beam banks). Here the tagger
is the encoder's own ImageNet head, read through ``assets/imagenet_words.json`` (recognition.py):
a word's evidence is the summed probability of the classes that name it (Egyptian cat 0.79 +
tiger cat 0.08 + tabby 0.08 gives "cat" 0.95).

Per image, from the same forward pass:
  * constraint: every vocabulary word whose evidence reaches ``threshold`` ("cat" or "cats";
    "coffee" or "cup"); none below it, and then the image is decoded as without guidance.
  * penalties, the first two only for an image with a constraint (the head is confident about
    something):
      - ``conflict`` (log-prob) on animal words whose evidence is below 0.01: ImageNet's 398
        animal classes are mutually exclusive labels of the main subject, so a head confident
        that the photo shows a cat, or an espresso, all but rules out a dog as the subject.
        Words that also name things other than animals (kite, crane, boxer, seal) are left out.
      - ``person`` (log-prob) on person words ("man", "child", "people", ...). ImageNet has no
        person class, so the head can never rule a person out directly; the decoder's Flickr8k
        prior ("a child is playing in the snow") is what puts people into close-ups of objects,
        but Flickr8k's own photos of dogs and bikes have people in them too: its strength is
        chosen on dev data like the others (docs/ood.md).
      - ``absent`` (log-prob), on every image, on the word forms of each concept the concept
        tagger (tagger.py; trained on Flickr8k's captions, it scores each concept's presence,
        where the ImageNet head only names the main subject) gives a probability below
        ``absent_below``: snow and a ball in a close-up of a cat. Needs the bundle's tagger
        (config.json ``tagger``); the constraint's own words are never penalised. Measured on
        Flickr8k dev and the COCO set, it helps both on every image and not only on those with
        a constraint (docs/ood.md).
    The decoder's own distribution does the rest: the rest of the caption stays its sentence.

Settings live in a bundle's ``config.json`` under ``decoding.guide`` (``on``, ``threshold``,
``conflict``, ``person``, ``absent``, ``absent_below``), chosen on dev data (docs/ood.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Optional, Union

import torch

from .decoding import Guide
from .recognition import class_words, word_evidence

N_ANIMAL_CLASSES = 398  # ImageNet-1k's classes 0..397 are animals (fish to sea urchin ... to the last ape)
AMBIGUOUS = frozenset({"kite", "kites", "crane", "cranes", "boxer", "boxers", "seal", "seals"})
# Words the class table lacks but that name the same animals: they share their evidence.
ALIASES = {"puppy": "dog", "puppies": "dog", "kitten": "cat", "kittens": "cat"}
PERSON_WORDS = frozenset("""man men woman women boy boys girl girls child children kid kids person people
baby babies toddler lady ladies guy guys""".split())
EVIDENCE_FLOOR = 0.01  # below this a word's evidence counts as "ruled out" (word_evidence's own floor)


@dataclass(frozen=True)
class GuideSettings:
    """threshold: evidence a word needs to be forced; conflict, person, absent: log-prob
    penalties; absent_below: the tagger probability under which a concept counts as absent."""

    threshold: float = 0.5
    conflict: float = 0.0
    person: float = 0.0
    absent: float = 0.0
    absent_below: float = 0.05

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "GuideSettings":
        """Raises ValueError for anything but an object of finite numbers >= 0 (``on``: a bool)."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"guide settings must be an object, got {d!r:.60}")
        known = {f.name for f in fields(cls)}
        vals = {}
        for k, v in (d or {}).items():
            if k == "on" and not isinstance(v, bool):
                raise ValueError(f"guide.on must be true or false, got {v!r:.30}")
            if k in known:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"guide.{k} must be a finite number >= 0, got {v!r:.30}")
                if k == "absent_below" and v > 1:
                    raise ValueError(f"guide.absent_below is a probability (0 to 1), got {v!r:.30}")
                vals[k] = float(v)
        return cls(**vals)

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def animal_words() -> frozenset[str]:
    _, words = class_words()
    return frozenset(w for ws in words[:N_ANIMAL_CLASSES] for w in ws if w not in AMBIGUOUS) | frozenset(ALIASES)


def plan(logits: torch.Tensor, vocab_itos: list[str], settings: GuideSettings,
         concepts: Optional[tuple[torch.Tensor, dict[int, list[str]]]] = None) -> tuple[Guide, list[list[str]]]:
    """The Guide for beam search and, per image, its constraint words.

    Args:
        logits: (B, 1000) the ImageNet head's log-probabilities.
        vocab_itos: the caption vocabulary.
        settings: strengths (GuideSettings).
        concepts: for the ``absent`` penalty, the concept tagger's probabilities (B, K) and its
            concepts' word forms in the vocabulary ({k: [words]}, ConceptSpace.vocab_forms).
    Returns:
        (Guide with words (B, V) and penalty (B, V) or None, the constraint words per image).
    Raises:
        ValueError: ``settings.absent`` without ``concepts``.
    """
    if settings.absent and concepts is None:
        raise ValueError("the absent-concept penalty (guide 'absent') needs a concept tagger in the model bundle")
    stoi = {w: i for i, w in enumerate(vocab_itos)}
    B, V = logits.size(0), len(vocab_itos)
    words = torch.zeros(B, V, dtype=torch.bool)
    penalty = torch.zeros(B, V)
    chosen: list[list[str]] = []
    animals = [w for w in animal_words() if w in stoi]
    persons = [w for w in PERSON_WORDS if w in stoi]
    for b, ev in enumerate(word_evidence(logits, set(vocab_itos))):
        force = [w for w, q in ev.items() if q >= settings.threshold]
        chosen.append(force)
        if settings.absent:  # every photo: the tagger speaks of all its concepts, sure or not of the subject
            probs, forms = concepts
            gone = {stoi[w] for k, ws in forms.items() if float(probs[b, k]) < settings.absent_below for w in ws}
            penalty[b, sorted(gone - set(stoi[w] for w in force))] -= settings.absent  # never the constraint's own
        if not force:
            continue
        words[b, [stoi[w] for w in force]] = True
        if settings.conflict:
            for w in animals:
                if ev.get(ALIASES.get(w, w), 0.0) < EVIDENCE_FLOOR:
                    penalty[b, stoi[w]] -= settings.conflict
        if settings.person:
            for w in persons:
                penalty[b, stoi[w]] -= settings.person
    return Guide(words, penalty if (settings.conflict or settings.person or settings.absent) else None), chosen


def resolve(guide: Union[None, bool, dict, GuideSettings], config: dict) -> Optional[GuideSettings]:
    """What ``Captioner.caption(guide=...)`` means: None -> the bundle's choice (``decoding.guide.on``),
    False -> off, True -> on with the bundle's settings, a dict or GuideSettings -> on with those."""
    from .decode_config import DecodeConfig  # it builds on GuideSettings

    return DecodeConfig(guide=guide).guide_for(DecodeConfig.from_bundle(config))
