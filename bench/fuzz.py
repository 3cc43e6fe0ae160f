"""Coverage-guided fuzzing (atheris + libFuzzer) of what the project reads from strangers:
image files and model folders.

    python bench/fuzz.py image  CORPUS_DIR [libFuzzer flags]   # load_image + preprocess
    python bench/fuzz.py bundle CORPUS_DIR [libFuzzer flags]   # config.json, vocab.json, model.safetensors

The contract under test: ``load_image`` raises nothing but ``ImageError`` and ``load_bundle``
nothing but ``BundleError``; any other exception is a crash, saved by libFuzzer as
``crash-<sha1>`` (see -artifact_prefix). An empty CORPUS_DIR is first filled with seeds: small
valid JPEG/PNG/GIF/BMP/TIFF/WebP/ICO files (plus the crashes in tests/data/crashes), and a
valid bundle's three files. Pillow, safetensors' Python side and ``captioning`` are instrumented
for coverage; torch is not.

A long run (the figures in docs/reliability.md):
    python bench/fuzz.py image  /tmp/corpus-image  -max_total_time=1800 -max_len=16384 -rss_limit_mb=3000
    python bench/fuzz.py bundle /tmp/corpus-bundle -max_total_time=1800 -max_len=65536 -rss_limit_mb=3000
The test suite runs both for a few thousand inputs with a fixed -seed (tests/test_fuzz.py).
Every crash found becomes a regression test with its input (tests/data/crashes/); to replay
inputs instead of fuzzing, give files instead of a folder:
    python bench/fuzz.py bundle tests/data/crashes/bundle_*.bin
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import atheris  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (imported before instrumentation: too big, and not ours)

torch.set_num_threads(1)

with atheris.instrument_imports(include=["PIL", "captioning", "safetensors"]):
    from PIL import Image

    Image.init()  # plugins are imported lazily; import them now, while instrumenting
    from captioning.bundle import CONFIG, VOCAB, WEIGHTS, BundleError, load_bundle, save_bundle
    from captioning.decoders import build_decoder
    from captioning.images import ImageError, Preprocessing, load_image, preprocess
    from captioning.vocab import Vocab

#: Fuzzed headers may claim up to this many pixels: a real limit, kept small so each input decodes fast.
FUZZ_MAX_PIXELS = 1_000_000
PREP = Preprocessing(size=32)
KINDS = (CONFIG, VOCAB, WEIGHTS)  # the bundle target's first byte picks the file it replaces
# ... or, from 3 up, a structured edit: one value of config.json / vocab.json / the safetensors
# header replaced by a value of any JSON type (bytes alone rarely make well-formed JSON of the wrong type).
STRUCTURED = 3


# --------------------------------------------------------------------------- seeds

def image_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    out = {}
    for fmt, kw, mode in [("JPEG", {"quality": 80}, "RGB"), ("JPEG", {"progressive": True}, "L"), ("PNG", {}, "RGBA"),
                          ("PNG", {}, "P"), ("PNG", {}, "I;16"), ("BMP", {}, "RGB"), ("TIFF", {}, "RGB"),
                          ("TIFF", {"compression": "tiff_lzw"}, "CMYK"), ("WEBP", {"quality": 50}, "RGB"),
                          ("ICO", {}, "RGBA"), ("PPM", {}, "RGB")]:
        buf = io.BytesIO()
        im.convert(mode).save(buf, fmt, **kw)
        out[f"seed_{fmt.lower()}_{mode.replace(';', '')}"] = buf.getvalue()
    buf = io.BytesIO()  # an animation: GIF's n_frames walks every frame
    frames = [Image.fromarray(np.roll(a, i, 1)).convert("P") for i in range(3)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0, transparency=0)
    out["seed_gif_anim"] = buf.getvalue()
    crashes = REPO / "tests" / "data" / "crashes"
    for p in sorted(crashes.glob("*")) if crashes.is_dir() else []:
        if p.suffix in (".gif", ".tif", ".png", ".jpg", ".bmp", ".webp"):
            out[f"crash_{p.name}"] = p.read_bytes()
    return out


def tiny_bundle(folder: Path) -> Path:
    torch.manual_seed(0)
    vocab = Vocab(["a", "dog", "runs", "on", "grass"])
    dec = build_decoder("show_attend_tell", dict(vocab_size=len(vocab), feature_dim=8, embed_dim=4, hidden_dim=4,
                                                 attention_dim=4, dropout=0.1))
    return save_bundle(folder, dec, vocab, "efficientnet-lite0", half=True)


def bundle_seeds(good: Path) -> dict[str, bytes]:
    seeds = {f"seed_{name}": bytes([i]) + (good / name).read_bytes() for i, name in enumerate(KINDS)}
    for i, name in enumerate(KINDS):
        seeds[f"seed_edit_{name}"] = bytes([STRUCTURED + i]) + bytes(range(i, 40 + i))
    return seeds


def _paths(x, prefix=()):
    """Every (path, value) in a JSON document, containers included."""
    yield prefix, x
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _value(fdp: "atheris.FuzzedDataProvider", depth: int = 0):
    pick = fdp.ConsumeIntInRange(0, 9 if depth < 2 else 6)
    if pick == 0:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))  # up to 2**72: far beyond any sane size
    if pick == 1:
        return fdp.ConsumeRegularFloat()
    if pick == 2:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if pick == 3:
        return fdp.ConsumeBool()
    if pick == 4:
        return None
    if pick == 5:
        return fdp.ConsumeIntInRange(-2, 1 << 20)
    if pick == 6:
        return [1 << 40, 1 << 40]
    if pick in (7, 8):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.ConsumeUnicodeNoSurrogates(6): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def structured_edit(doc, fdp: "atheris.FuzzedDataProvider"):
    """Replace (or delete) one value somewhere in ``doc``; returns the new document."""
    paths = list(_paths(doc))
    path, _ = paths[fdp.ConsumeIntInRange(0, len(paths) - 1)]
    if not path:
        return _value(fdp)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if fdp.ConsumeIntInRange(0, 7) == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = _value(fdp)
    return doc


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def fill_corpus(target: str, corpus: Path, good: Path) -> None:
    if corpus.is_file():  # libFuzzer then runs the given files once each: replaying crashes
        return
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    seeds = image_seeds() if target == "image" else bundle_seeds(good)
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)


# --------------------------------------------------------------------------- targets

@atheris.instrument_func
def fuzz_image(data: bytes) -> None:
    try:
        im = load_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except ImageError:
        return
    assert im.mode == "RGB" and im.width >= 1 and im.height >= 1, (im.mode, im.size)
    x = preprocess(im, PREP)
    assert x.shape == (3, 32, 32) and bool(torch.isfinite(x).all())


class BundleTarget:
    """Each input is one kind byte and the bytes of that file; the other two stay valid."""

    def __init__(self, good: Path, work: Path):
        self.good, self.work = good, work
        shutil.copytree(good, work, dirs_exist_ok=True)

    @atheris.instrument_func
    def __call__(self, data: bytes) -> None:
        if not data:
            return
        # A branch per kind, in instrumented code: the three seeds (all valid, so otherwise the
        # same coverage) count as different inputs and all stay in the corpus.
        kind = data[0] % (2 * len(KINDS))
        if kind == 0:
            name = CONFIG
        elif kind == 1:
            name = VOCAB
        elif kind == 2:
            name = WEIGHTS
        else:
            name = KINDS[kind - STRUCTURED]
        if kind < STRUCTURED:
            content = data[1:]
        else:
            fdp = atheris.FuzzedDataProvider(data[1:])
            good = (self.good / name).read_bytes()
            if name == WEIGHTS:
                n = struct.unpack("<Q", good[:8])[0]
                header = structured_edit(json.loads(good[8:8 + n]), fdp)
                content = safetensors_bytes(header, good[8 + n:])
            else:
                content = json.dumps(structured_edit(json.loads(good), fdp)).encode()
        (self.work / name).write_bytes(content)
        try:
            load_bundle(self.work)
        except BundleError as e:
            assert "\n" not in str(e) and str(self.work) in str(e), str(e)
        finally:
            shutil.copy2(self.good / name, self.work / name)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] not in ("image", "bundle") or argv[2].startswith("-"):
        sys.exit(__doc__)
    target, corpus = argv[1], Path(argv[2])
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-bundle-"))
    try:
        good = tiny_bundle(tmp / "good")
        fill_corpus(target, corpus, good)
        fn = fuzz_image if target == "image" else BundleTarget(good, tmp / "work")
        atheris.Setup([argv[0], *argv[2:]], fn)
        atheris.Fuzz()  # exits the process when the run is over
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)
