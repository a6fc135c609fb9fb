"""Untrusted images: every limit and every degenerate image gets an `ImageError` saying what is
wrong, checked before anything large is allocated; good images of each format decode exactly."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk
from PIL import Image, ImageFile

import engine
from engine.images import (
    ImageLimits,
    check_image_counts,
    image_from_data_uri,
    read_image,
    read_image_file,
)
from engine.runtime.image_inputs import RequestImages
from tests.conftest import CheckpointFactory
from tests.engine.vision_util import image_prompt

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a `width x height` RGB image, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


# What each hostile input is, and the message it must get (the same with default limits).
HOSTILE = {
    "one pixel": (lambda: encode(Image.new("RGB", (1, 1)), "PNG"),
                  "the image is 1x1 pixels: too small to read (at least 4 pixels per side)"),
    "a line": (lambda: encode(Image.new("L", (1, 100_000)), "PNG"),
               "the image is 1x100000 pixels, a side ratio of 100000:1; at most 100:1 is "
               "accepted"),
    "zero bytes": (lambda: b"", "the image is empty (0 bytes)"),
    "truncated PNG": (lambda: encode(noise(300, 200), "PNG")[:5000],
                      "the PNG image is truncated or corrupt (300x200 pixels): image file is "
                      "truncated"),
    "truncated JPEG": (lambda: encode(noise(300, 200), "JPEG")[:3000],
                       "the JPEG image is truncated or corrupt (300x200 pixels): image file is "
                       "truncated"),
    "PNG claiming 100000x100000": (
        lambda: png_claiming(100_000, 100_000),
        "the image is 100000x100000 pixels (10,000,000,000 pixels), over the limit of "
        "16,777,216 pixels; scale it down"),
    "WEBP of 5000x5000": (  # Pillow's WEBP reader would allocate the canvas when opening it
        lambda: encode(Image.new("RGB", (5000, 5000)), "WEBP", lossless=True),
        "the image is 5000x5000 pixels (25,000,000 pixels), over the limit of 16,777,216 "
        "pixels; scale it down"),
    "21 MiB": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(21 * MiB),
               "the image is 21.0 MiB, over the limit of 20.0 MiB"),
    "header only": (lambda: b"\x89PNG\r\n\x1a\n",
                    "not a valid PNG image: "),
}

_BOUNDED_RUNNER = """
import json, resource, sys, time
from engine.errors import ImageError
from engine.images import read_image
MiB = 1024 * 1024
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 96 * MiB, resource.RLIM_INFINITY))
try:
    bytearray(200 * MiB)
    bounded = False
except MemoryError:
    bounded = True
results = {"bounded": bounded}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    t0 = time.perf_counter()
    try:
        image = read_image(data)
        message = f"accepted {image.size}"
    except ImageError as e:
        message = str(e)
    results[path] = [message, time.perf_counter() - t0]
print(json.dumps(results))
"""


def test_each_hostile_image_gets_its_message_within_96_mib_and_a_second(tmp_path: Path) -> None:
    """All run in a child process whose address space is capped at 96 MiB above what it has
    after importing the engine (decoding any of them would need far more)."""
    paths = {}
    for i, (name, (make, _)) in enumerate(HOSTILE.items()):
        paths[name] = tmp_path / f"case{i}"
        paths[name].write_bytes(make())
    done = subprocess.run([sys.executable, "-c", _BOUNDED_RUNNER, *map(str, paths.values())],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["bounded"] is True  # the cap is real: 200 MiB cannot be allocated
    for name, (_, message) in HOSTILE.items():
        got, seconds = results[str(paths[name])]
        assert got.startswith(message), name
        assert seconds < 1.0, (name, seconds)  # a hang guard, not a speed target


def test_the_size_is_checked_from_the_header_before_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(engine.ImageError, match=r"100000x100000 pixels"):
        read_image(png_claiming(100_000, 100_000))
    with pytest.raises(engine.ImageError, match=r"5000x4000 pixels \(20,000,000 pixels\)"):
        read_image(png_claiming(5000, 4000))


def test_the_largest_accepted_image_is_4096x4096() -> None:
    read_image(encode(Image.new("RGB", (4096, 4096)), "PNG"))
    with pytest.raises(engine.ImageError, match="4097x4096 pixels"):
        read_image(png_claiming(4097, 4096))


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_the_four_formats_decode(fmt: str) -> None:
    original = Image.new("RGB", (40, 30), (200, 30, 90))
    image = read_image(encode(original, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert (image.format, image.size) == (fmt, (40, 30))
    got = np.asarray(image.convert("RGB"), dtype=int)[15, 20]
    assert np.abs(got - [200, 30, 90]).max() <= 3  # JPEG rounds


def test_a_gif_is_read_as_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    image = read_image(out.getvalue())
    assert getattr(image, "n_frames", 1) == 2
    assert image.convert("RGB").getpixel((10, 10)) == (255, 0, 0)


@pytest.mark.parametrize("fmt, name", [
    ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", "PPM"), ("PDF", "PDF"),
])
def test_other_formats_are_refused_by_name(fmt: str, name: str) -> None:
    with pytest.raises(engine.ImageError) as e:
        read_image(encode(Image.new("RGB", (32, 32)), fmt))
    assert str(e.value) == f"{name} images are not supported; use PNG, JPEG, WEBP or GIF"


def test_svg_and_unknown_bytes_are_refused_by_name() -> None:
    with pytest.raises(engine.ImageError, match="^SVG images are not supported"):
        read_image(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>')
    with pytest.raises(engine.ImageError) as e:
        read_image(b"hello, world")
    assert str(e.value) == ("not an image in a known format (it starts with b'hello, w'); use "
                            "PNG, JPEG, WEBP or GIF")


# ---------------------------------------------------------------------------------------------
# Limits the caller can change


def test_byte_and_pixel_limits_can_be_changed_by_the_caller() -> None:
    data = encode(noise(64, 64), "PNG")
    read_image(data)  # fine by default
    with pytest.raises(engine.ImageError, match=rf"the image is {len(data)} bytes, over the "
                       r"limit of 1000 bytes"):
        read_image(data, ImageLimits(max_bytes=1000))
    with pytest.raises(engine.ImageError, match=r"64x64 pixels \(4,096 pixels\), over the limit "
                       r"of 1,000 pixels"):
        read_image(data, ImageLimits(max_pixels=1000))
    with pytest.raises(engine.ImageError, match="truncated or corrupt"):
        read_image(png_claiming(10, 10), ImageLimits(min_side=1))


def test_image_counts_per_message_and_per_conversation() -> None:
    check_image_counts([8, 8])
    with pytest.raises(engine.ImageError) as e:
        check_image_counts([1, 9])
    assert str(e.value) == "message 2 has 9 images; at most 8 per message"
    with pytest.raises(engine.ImageError) as e:
        check_image_counts([8, 8, 1])
    assert str(e.value) == "the conversation has 17 images; at most 16 per conversation"
    check_image_counts([20], ImageLimits(max_images_per_message=20,
                                         max_images_per_conversation=20))


def test_limits_themselves_are_checked() -> None:
    with pytest.raises(ValueError, match="ImageLimits.max_bytes must be a positive integer"):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        ImageLimits(max_aspect_ratio=0.5)


# ---------------------------------------------------------------------------------------------
# data: URIs and files


def test_a_pasted_data_uri_decodes() -> None:
    data = encode(noise(50, 40), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    image = image_from_data_uri(uri)
    assert (image.format, image.size) == ("PNG", (50, 40))
    assert np.array_equal(np.asarray(image), np.asarray(noise(50, 40)))


@pytest.mark.parametrize("uri, message", [
    ("https://example.com/a.png", "not a data: URI"),
    ("data:image/png,%89PNG", "only base64 data: URIs are supported"),
    ("data:text/plain;base64,aGVsbG8=", "the data: URI holds 'text/plain', not an image"),
    ("data:image/png;base64,not*base64", "the data: URI's payload is not valid base64"),
    ("data:image/png;base64," + "A" * (28 * MiB), "the image is about 21.0 MiB, over the limit "
                                                   "of 20.0 MiB"),
])
def test_bad_data_uris_say_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(engine.ImageError, match="^" + message):
        image_from_data_uri(uri)


def test_a_file_too_large_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    with path.open("wb") as f:
        f.truncate(21 * MiB)  # sparse: nothing to read, the size alone decides
    with pytest.raises(engine.ImageError, match=rf"^{path}: the image is 21.0 MiB, over the "
                       r"limit of 20.0 MiB$"):
        read_image_file(path)
    with pytest.raises(engine.ImageError, match=rf"^{tmp_path / 'none.png'}: cannot read"):
        read_image_file(tmp_path / "none.png")


# ---------------------------------------------------------------------------------------------
# Alpha and palettes: as mistral-common converts them


def test_alpha_and_palette_images_become_what_mistral_commons_encoder_makes(
        make_pixtral: CheckpointFactory) -> None:
    model = engine.load(make_pixtral("native"))
    encoder = model.tokenizer.instruct_tokenizer.image_encoder
    rgba = noise(48, 32, "RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: white after conversion
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    for image in (read_image(encode(rgba, "PNG")), read_image(encode(palette, "GIF"))):
        prompt, _ = image_prompt(model, [image])
        request = RequestImages(model, [prompt], [[image]])
        want = encoder(ImageChunk(image=image)).image
        assert np.array_equal(request.rows[0].images[0].pixels.numpy(), want)
    white = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
        [0.26862954, 0.26130258, 0.27577711])
    rgba_pixels = encoder(ImageChunk(image=read_image(encode(rgba, "PNG")))).image
    # the corner patch is resized (cubic): its first pixel is close to white, not to (10, 20, 30)
    assert np.abs(rgba_pixels[:, 0, 0] - white).max() < 0.3
