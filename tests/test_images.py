"""images.load_image: every odd kind of file gives an upright RGB image or a one-line ImageError."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.images import ImageError, Preprocessing, load_image, preprocess, unnormalize, upright_size

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def assert_one_line_error(excinfo, *words: str) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "Traceback" not in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return msg


def close(px, rgb, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, rgb))


def two_halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return Image.fromarray(a, "RGB")


# --- modes that must become a correct RGB image ---------------------------------------------

def test_rgb_path_bytes_and_pil_agree(tmp_path):
    im = two_halves(40, 20)
    p = tmp_path / "x.png"
    im.save(p)
    a = load_image(p)
    b = load_image(p.read_bytes())
    c = load_image(str(p))
    d = load_image(im)
    for x in (a, b, c, d):
        assert x.mode == "RGB" and x.size == (40, 20)
        assert np.array_equal(np.asarray(x), np.asarray(im))


def test_grayscale(tmp_path):
    a = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # (8, 16)
    p = tmp_path / "g.png"
    Image.fromarray(a, "L").save(p)
    out = np.asarray(load_image(p))
    assert out.shape == (8, 16, 3)
    for ch in range(3):
        assert np.array_equal(out[..., ch], a)


def test_palette(tmp_path):
    im = two_halves(20, 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert im.mode == "P"
    p = tmp_path / "p.png"
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert close(out.getpixel((2, 5)), RED) and close(out.getpixel((17, 5)), BLUE)


def test_palette_with_transparency_composites_on_white(tmp_path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0] + [255, 0, 0] + [0] * (254 * 3))  # index 0 black, 1 red
    for x in range(5, 10):
        for y in range(10):
            im.putpixel((x, y), 1)
    p = tmp_path / "pt.png"
    im.save(p, transparency=0)  # the black index is transparent
    assert "transparency" in Image.open(p).info
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == WHITE  # transparent black -> white, not black
    assert out.getpixel((8, 1)) == RED


def test_palette_transparent_gif(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    im.paste(1, (0, 0, 4, 8))
    p = tmp_path / "t.gif"
    im.save(p, transparency=0)
    out = load_image(p)
    assert out.getpixel((1, 1)) == BLUE and out.getpixel((6, 1)) == WHITE


def test_rgba_alpha_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red everywhere ...
    a[:, :2, 3] = 255  # ... opaque on the left
    a[:, 2:, 3] = 0  # ... fully transparent on the right
    a[0, 0, 3] = 128  # one half-transparent pixel
    p = tmp_path / "a.png"
    Image.fromarray(a, "RGBA").save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((1, 2)) == RED
    assert out.getpixel((3, 2)) == WHITE
    assert close(out.getpixel((0, 0)), (255, 127, 127), tol=2)


def test_la_mode(tmp_path):
    im = Image.new("LA", (4, 4), (0, 0))  # black, transparent
    im.putpixel((0, 0), (0, 255))  # black, opaque
    out = load_image(im)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((3, 3)) == WHITE


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    two_halves(32, 16).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (32, 16)
    assert close(out.getpixel((4, 8)), RED, tol=40) and close(out.getpixel((28, 8)), BLUE, tol=40)


def test_16bit_png(tmp_path):
    a = np.zeros((4, 8), np.uint16)
    a[:, 4:] = 65535
    a[:, 2:4] = 32768
    p = tmp_path / "i16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode == "I;16"
    out = np.asarray(load_image(p))
    assert out.shape == (4, 8, 3)
    assert (out[:, :2] == 0).all()
    assert (np.abs(out[:, 2:4].astype(int) - 128) <= 1).all()  # scaled, not clipped to 255
    assert (out[:, 4:] == 255).all()


def test_32bit_int_and_float_modes():
    a = np.array([[0, 100000], [200000, 300000]], dtype=np.int32)
    out = load_image(Image.fromarray(a, "I"))
    assert out.mode == "RGB" and out.size == (2, 2)
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32), "F")
    g = np.asarray(load_image(f))[..., 0]
    assert g[0, 0] == 0 and g[1, 1] == 255 and 0 < g[0, 1] < g[1, 0] < 255


def test_exif_rotated_jpeg(tmp_path):
    im = two_halves(40, 20)  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    assert Image.open(p).size == (40, 20)
    out = load_image(p)
    assert out.size == (20, 40)  # width and height swapped
    # Rotating clockwise brings the left (red) half to the top.
    assert close(out.getpixel((10, 5)), RED, tol=40)
    assert close(out.getpixel((10, 34)), BLUE, tol=40)
    assert upright_size(p) == out.size  # read from the header alone, rotation included


def test_upright_size_of_a_plain_and_a_broken_file(tmp_path):
    p = tmp_path / "plain.png"
    two_halves(40, 20).save(p)
    assert upright_size(p) == (40, 20) == load_image(p).size
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError) as e:
        upright_size(bad)
    assert_one_line_error(e, "bad.jpg")


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(p).n_frames == 3
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (16, 16)
    assert out.getpixel((8, 8)) == RED
    # A PIL image positioned on a later frame is rewound too.
    im = Image.open(p)
    im.seek(2)
    assert load_image(im).getpixel((8, 8)) == RED


# --- files that must give a one-line ImageError ---------------------------------------------

def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_one_line_error(e, "empty", "empty.jpg")
    with pytest.raises(ImageError) as e:
        load_image(b"")
    assert_one_line_error(e, "empty")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.png")
    assert_one_line_error(e, "nope.png")


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\nsecond line\n")
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_one_line_error(e, "notes.jpg", "not an image")
    with pytest.raises(ImageError) as e:
        load_image(b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n")
    assert_one_line_error(e)


def test_truncated_jpeg(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_one_line_error(e, "cut.jpg")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[:300])
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_one_line_error(e, "cut.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)  # far too little data: never meant to be decoded
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(100_000, 100_000))
    assert p.stat().st_size < 2000
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        assert Image.open(p).size == (100_000, 100_000)
    with pytest.raises(ImageError) as e:
        load_image(p)
    msg = assert_one_line_error(e, "bomb.png", "10000000000 pixels", "limit")
    assert "50,000,000" in msg
    with pytest.raises(ImageError):
        load_image(p.read_bytes())


def test_max_pixels_is_honoured(tmp_path):
    p = tmp_path / "small.png"
    Image.new("RGB", (100, 100), RED).save(p)
    assert load_image(p, max_pixels=10_000).size == (100, 100)  # exactly at the limit: fine
    with pytest.raises(ImageError) as e:
        load_image(p, max_pixels=9_999)
    assert_one_line_error(e, "100x100")
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1), RED).save(tiny)
    assert load_image(tiny, max_pixels=1).getpixel((0, 0)) == RED
    with pytest.raises(ImageError):
        load_image(tiny, max_pixels=0)


# --- preprocessing ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(224, 224), (50, 300), (640, 80)])
def test_preprocess_shape_and_normalisation(size):
    im = Image.new("RGB", size, WHITE)
    x = preprocess(im)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    prep = Preprocessing()
    expect = (1.0 - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    assert torch.allclose(x[:, 100, 100], expect, atol=1e-5)
    assert np.allclose(unnormalize(x), 1.0, atol=1e-5)


def test_preprocess_stretches_not_crops():
    # A wide image: red left half, blue right half. A centre crop would lose neither colour but
    # shift the border; a plain stretch keeps the border exactly in the middle.
    x = unnormalize(preprocess(two_halves(400, 100)))
    assert x[112, 50, 0] > 0.9 and x[112, 50, 2] < 0.1
    assert x[112, 170, 2] > 0.9 and x[112, 170, 0] < 0.1
    assert x[112, 108, 0] > 0.9 and x[112, 116, 2] > 0.9


def test_preprocess_accepts_non_rgb():
    x = preprocess(Image.new("L", (30, 30), 255))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x, preprocess(Image.new("RGB", (30, 30), WHITE)))


# --- the decode boundary: whatever a plugin raises becomes ImageError ---------------------------

CRASHES = Path(__file__).resolve().parent / "data" / "crashes"


@pytest.mark.parametrize("name, raised", [
    ("gif_n_frames_indexerror.gif", "IndexError"),  # GifImagePlugin.n_frames reads past the end
    ("gif_struct_error.gif", "error"),  # struct.error from a cut frame header
    ("tiff_missing_dimensions.tif", "TypeError"),  # "Missing dimensions" from TiffImagePlugin._setup
])
def test_fuzzer_crashes_are_image_errors(tmp_path, name, raised):
    """Inputs the mutation fuzzer found escaping as plugin exceptions (issue 21)."""
    data = (CRASHES / name).read_bytes()
    # The input still makes Pillow itself raise that exception: the regression is real.
    with pytest.raises(Exception) as plain:
        im = Image.open(io.BytesIO(data))
        getattr(im, "n_frames", 1)
        im.load()
    assert type(plain.value).__name__ == raised
    p = tmp_path / name
    p.write_bytes(data)
    for src in (p, data):
        with pytest.raises(ImageError) as e:
            load_image(src)
        assert_one_line_error(e, "cannot decode", raised)
    assert name in str(pytest.raises(ImageError, load_image, p).value)


def test_gif_frame_far_larger_than_its_canvas(tmp_path):
    """Found by bench/fuzz.py (libFuzzer out-of-memory, 3.3 GB): a 16x16 GIF whose first frame
    claims 7.8 billion pixels. Pillow fills a buffer of the frame's size while *opening* the
    file, before any check on the canvas size can run; its own bomb check must stop it."""
    data = (CRASHES / "gif_frame_7800_megapixels.gif").read_bytes()
    assert len(data) < 1000 and data[6:10] == b"\x10\x00\x10\x00"  # a 16x16 canvas
    with pytest.raises(ImageError) as e:
        load_image(data, max_pixels=1_000_000)
    assert_one_line_error(e, "too many pixels", "7800254802 pixels")


@pytest.mark.parametrize("exc", [IndexError("index out of range"), TypeError("Missing dimensions"),
                                 ZeroDivisionError(), KeyError("tag"), MemoryError(), RecursionError("deep")])
def test_any_exception_while_decoding_is_an_image_error(tmp_path, monkeypatch, exc):
    """The boundary is generic, not a list of known exception types."""
    p = tmp_path / "fine.png"
    Image.new("RGB", (8, 8), RED).save(p)

    def broken_load(self):
        raise exc

    monkeypatch.setattr(Image.Image, "load", broken_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", broken_load)
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_one_line_error(e, "fine.png", type(exc).__name__)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_multi_line_plugin_messages_become_one_line(tmp_path, monkeypatch):
    p = tmp_path / "fine.png"
    Image.new("RGB", (8, 8), RED).save(p)

    def broken_load(self):
        raise OSError("first line\nsecond line\r\n" + "x" * 1000)

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", broken_load)
    with pytest.raises(ImageError) as e:
        load_image(p)
    msg = assert_one_line_error(e, "fine.png", "first line second line")
    assert len(msg) - len(str(p)) < 260  # the reason is cut short; the path is whatever tmp_path is


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    p = tmp_path / "fine.png"
    Image.new("RGB", (8, 8), RED).save(p)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_image(p)


def test_wrong_input_type_is_an_image_error():
    with pytest.raises(ImageError) as e:
        load_image(12345)  # type: ignore[arg-type]
    assert_one_line_error(e, "int")


def test_file_is_closed_after_a_failure(tmp_path):
    """A public demo decodes thousands of uploads: a failed decode must not leak its file."""
    import os

    p = tmp_path / "cut.gif"
    p.write_bytes((CRASHES / "gif_n_frames_indexerror.gif").read_bytes())
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    for _ in range(20):
        with pytest.raises(ImageError):
            load_image(p)
    assert fds() <= before


@pytest.mark.parametrize("section, words", [
    ({"size": "224", "mean": [0.5] * 3, "std": [0.5] * 3}, "size"),
    ({"size": 10 ** 9, "mean": [0.5] * 3, "std": [0.5] * 3}, "size"),
    ({"size": True, "mean": [0.5] * 3, "std": [0.5] * 3}, "size"),
    ({"size": 224, "mean": [0.5] * 2, "std": [0.5] * 3}, "mean"),
    ({"size": 224, "mean": "abc", "std": [0.5] * 3}, "mean"),
    ({"size": 224, "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, "std"),
    ({"size": 224, "mean": [0.5] * 3, "std": [0.5, float("nan"), 0.5]}, "std"),
    ({"size": 224, "resize": "crop", "mean": [0.5] * 3, "std": [0.5] * 3}, "resize"),
    ([224], "object"),
])
def test_preprocessing_section_of_wrong_types(section, words):
    with pytest.raises(ValueError) as e:
        Preprocessing.from_dict(section)
    assert_one_line_error(e, words)
    assert Preprocessing.from_dict(Preprocessing(size=288).to_dict()) == Preprocessing(size=288)
