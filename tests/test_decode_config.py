"""DecodeConfig: one value for the decoding settings, read from and written to a bundle's
config.json, taken by the API, the CLI and evaluation."""
from __future__ import annotations

import dataclasses

import pytest

from captioning import Captioner
from captioning.bundle import read_config
from captioning.decode_config import DecodeConfig
from captioning.guidance import GuideSettings
from captioning.lab.modelcard import set_decoding
from test_bundle_api_cli import bundle, bundle_copy, decoder, images, vocab  # noqa: F401 (fixtures)


def test_frozen_and_replace_names_unknown_settings():
    d = DecodeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.beam_size = 5
    assert d.replace(beam_size=5).beam_size == 5 and d.beam_size == 3
    with pytest.raises(TypeError, match="beam_width"):
        d.replace(beam_width=5)


def test_bundle_section_round_trip():
    sec = {"beam_size": 3, "length_penalty": 0.7, "rerank": 6.0, "rerank_pool": 5,
           "guide": {"on": True, "threshold": 0.4, "conflict": 3.0, "person": 0.0, "absent": 3.0, "absent_below": 0.05}}
    d = DecodeConfig.from_bundle({"decoding": sec})
    assert (d.length_penalty, d.rerank, d.rerank_pool, d.guide) == (0.7, 6.0, 5, True)
    assert d.guide_settings == GuideSettings(0.4, 3.0, 0.0, 3.0, 0.05)
    assert d.to_bundle() == sec
    # No section: the defaults, nothing re-ranked or guided.
    none = DecodeConfig.from_bundle({})
    assert (none.length_penalty, none.rerank, none.rerank_pool, none.guide) == (0.0, 0.0, 0, False)
    assert DecodeConfig(beam_size=3, length_penalty=2.0).to_bundle() == {"beam_size": 3, "length_penalty": 2.0}


def test_request_resolves_against_the_bundle():
    b = DecodeConfig.from_bundle({"decoding": {"length_penalty": 0.7, "rerank": 6.0,
                                               "guide": {"on": False, "threshold": 0.3}}})
    r = DecodeConfig(beam_size=5).resolve(b)
    assert (r.beam_size, r.length_penalty, r.rerank, r.rerank_pool, r.guide) == (5, 0.7, 6.0, 0, None)
    assert DecodeConfig(length_penalty=0.0, rerank=0.0).resolve(b).length_penalty == 0.0
    assert DecodeConfig(guide=True).resolve(b).guide == GuideSettings(0.3)
    assert DecodeConfig(guide={"conflict": 2}).resolve(b).guide == GuideSettings(0.3, 2.0)
    with pytest.raises(ValueError, match="nbest"):
        DecodeConfig(nbest=4, beam_size=2).check()


def test_api_takes_a_decode_config_or_its_fields(bundle, images):
    cap = Captioner.from_pretrained(bundle)
    d = DecodeConfig(beam_size=4, nbest=2, length_penalty=0.5)
    a = cap.caption(images[:2], d)
    b = cap.caption(images[:2], beam_size=4, nbest=2, length_penalty=0.5)
    assert [[c.text for c in r.captions] for r in a] == [[c.text for c in r.captions] for r in b]
    # Keywords override the config's fields.
    c = cap.caption(images[:1], d, nbest=1)
    assert len(c[0].captions) == 1 and c[0].text == a[0].text
    with pytest.raises(TypeError, match="beams"):
        cap.caption(images[:1], beams=2)


def test_set_decoding_writes_the_section_the_captioner_reads(bundle_copy):
    set_decoding(bundle_copy, 4, 1.5)
    assert read_config(bundle_copy)["decoding"] == {"beam_size": 4, "length_penalty": 1.5}
    cap = Captioner.from_pretrained(bundle_copy)
    assert cap.decoding.length_penalty == cap.default_length_penalty == 1.5 and cap.decoding.beam_size == 4
