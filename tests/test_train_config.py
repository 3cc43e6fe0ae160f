"""TrainConfig holds the decoder's options as one DecoderOptions instead of copying its fields;
records stay flat, so old bundles' training configs still read."""
from __future__ import annotations

import dataclasses

import pytest

from captioning.decoders import DECODERS
from captioning.lab.train import DecoderOptions, TrainConfig, decoder_config


def test_decoder_options_are_held_not_copied():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert "model" in names and not names & {f.name for f in dataclasses.fields(DecoderOptions)}
    cfg = TrainConfig(decoder="merge", embed_dim=32, bidirectional=True, epochs=2)
    assert cfg.model == DecoderOptions(embed_dim=32, bidirectional=True) and cfg.epochs == 2
    assert TrainConfig(model=DecoderOptions(embed_dim=32)) == TrainConfig(embed_dim=32)
    with pytest.raises(TypeError, match="bogus"):
        TrainConfig(bogus=1)


@pytest.mark.parametrize("kind", list(DECODERS))
def test_each_decoder_takes_the_fields_its_config_has(kind):
    d = decoder_config(TrainConfig(decoder=kind, deep_output=True, merge_dim=16), vocab_size=10, feature_dim=8)
    want = {f.name for f in dataclasses.fields(DECODERS[kind][1])}
    assert set(d) == want and d["vocab_size"] == 10 and d["feature_dim"] == 8
    DECODERS[kind][1](**d)  # a valid config of that decoder


def test_records_are_flat_and_old_records_read():
    cfg = TrainConfig(decoder="show_attend_tell", deep_output=True, tie_weights=True, lr=1e-3)
    rec = cfg.to_dict()
    assert "model" not in rec and rec["deep_output"] is True and rec["lr"] == 1e-3
    assert TrainConfig.from_dict(rec) == cfg
    old = {"decoder": "show_tell", "embed_dim": 256, "dropout": 0.3, "epochs": 5, "no_longer_a_field": 1}
    assert TrainConfig.from_dict(old).model == DecoderOptions(embed_dim=256, dropout=0.3)
