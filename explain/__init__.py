"""Interpretability for the captioner: what the encoder sees, which pixels a word came from,
whether those explanations are faithful, the word-embedding space and the beam-search tree.

Modules (pure functions, no UI code):

* ``explain.encoder`` -- layer activations, top channels, ImageNet top-5, feature visualisation.
* ``explain.attribution`` -- ``attribute(captioner, image, tokens, t, method)`` (Captum).
* ``explain.faithfulness`` -- deletion / insertion curves and the model-randomisation check.
* ``explain.embeddings`` -- t-SNE / PCA projections of the decoder's word embeddings, neighbours.
* ``explain.beam`` -- the beam-search lattice as a drawable tree.
* ``explain.maps`` -- map display: scaling, colouring, resizing and overlays on the photo.

The toy captioner with known evidence that the tests check these methods on is ``tests/toy.py``.

Submodules are imported on use, so ``import explain`` stays cheap.
"""
__all__ = ["attribution", "beam", "embeddings", "encoder", "faithfulness", "maps"]
