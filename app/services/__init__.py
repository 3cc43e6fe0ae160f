"""Everything the app computes, with no Streamlit in it: the pages (app/views) only lay out
widgets, and app/ui.py caches what these functions return.

One concern per module:
  registry      the model bundles found on disk, loading them, and their files (card, metrics, curves)
  photos        uploads (checks, decoding, display copies), the package samples and Flickr8k
  captions      captioning a photo, its words, and per-photo scores against references
  explanations  attribution maps, faithfulness checks and the encoder's views (adapters to ``explain``)
  embeddings    word-embedding spaces and their projections (adapters to ``explain.embeddings``)
  figures       every Plotly figure, heat-map overlay and colour scale

Functions take plain values (paths, bytes, PIL images, a Captioner) and return the library's own
result objects, numpy arrays or figures, so they can be tested without a browser.

All model work runs under ``COMPUTE_LOCK``: a Streamlit server serves every browser session from
threads of one process, and attribution methods hook into the shared encoder.
"""
from __future__ import annotations

import threading

COMPUTE_LOCK = threading.RLock()


class NotAvailable(RuntimeError):
    """A view whose data is missing (no beam lattice, no Flickr8k folder...); one line, for the user."""
