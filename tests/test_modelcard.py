"""Model cards: the published reference and the training recipe come from data, not hand-written text."""


def test_published_numbers_are_kept_once():
    """The model cards' published reference is written from the same rows as the app's table."""
    from captioning.lab.published import PUBLISHED, card_reference

    soft = next(r for r in PUBLISHED if r["model"].endswith("soft attention"))
    assert f"BLEU-4 {soft['BLEU-4']:.3f}" in card_reference("show_attend_tell")
    assert "BLEU-1/2/3 0.63/0.41/0.27" in card_reference("show_tell")
    assert card_reference("nothing") == "n/a"
