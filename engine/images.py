"""Untrusted images (pasted screenshots, files, `data:` URIs) -> PIL images, within limits.

Where: at the engine's top level, beside `errors.py`, because it is neither an architecture nor
a checkpoint: it is the boundary where bytes from a person become images, used by the CLI, by
`engine.generate` (which checks the PIL images it is given) and by the language server (pasted
screenshots). It needs PIL only.

Every check runs before anything large is allocated, in this order:

1. the encoded size (`max_bytes`; a `data:` URI's payload is measured before it is decoded);
2. the format, from the file's magic bytes: PNG, JPEG, WEBP and GIF (its first frame) are read;
   anything else is refused by name ("BMP images are not supported");
3. the dimensions, from the header alone: a side ratio over `max_aspect_ratio`, a side under
   `min_side`, more than `max_pixels` pixels (the size at which Pillow would only warn about a
   decompression bomb is far higher: here it is our error, before decoding). A WEBP's size is
   read from its header here, because Pillow's WEBP reader allocates the canvas when it opens;
4. decoding, whose errors (truncated or corrupt data) become `ImageError`s.

Alpha and palette images are left as they are: mistral-common's `ImageEncoder` composites them
over white when the engine preprocesses them, as it does for Mistral's own services. The counts
per message and per conversation are checked by `check_image_counts` (the caller knows the
messages; `engine.generate` checks the total per prompt).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import GifImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from .errors import ImageError

MiB = 1024 * 1024
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be; every limit can be overridden (`ImageLimits(max_bytes=...)`)."""

    max_bytes: int = 20 * MiB  # encoded size of one image
    max_pixels: int = 4096 * 4096  # ~16.8 million: checked from the header, before decoding
    min_side: int = 4  # pixels: smaller images carry nothing readable
    max_aspect_ratio: float = 100.0  # long side / short side
    max_images_per_message: int = 8
    max_images_per_conversation: int = 16

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_side", "max_images_per_message",
                     "max_images_per_conversation"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"ImageLimits.max_aspect_ratio must be >= 1, got "
                             f"{self.max_aspect_ratio!r}")


DEFAULT_LIMITS = ImageLimits()


def _size_text(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


# Magic bytes of formats we refuse, so the message can name them.
_REFUSED = (
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"), (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"\x76\x2f\x31\x01", "EXR"),
    (b"P1", "PBM"), (b"P4", "PBM"), (b"P2", "PGM"), (b"P5", "PGM"), (b"P3", "PPM"),
    (b"P6", "PPM"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}


def sniff_format(data: bytes) -> str:
    """The format of encoded image bytes: one of `FORMATS`, or `ImageError` naming what it is."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    name = None
    for magic, refused in _REFUSED:
        if data.startswith(magic):
            name = refused
            break
    if data[4:8] == b"ftyp":
        name = _FTYP_BRANDS.get(data[8:12], "ISO media (video?)")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        name = "SVG"
    supported = ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]
    if name is not None:
        raise ImageError(f"{name} images are not supported; use {supported}")
    raise ImageError(f"not an image in a known format (it starts with {data[:8]!r}); use "
                     f"{supported}")


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a WEBP's first chunk header (None if it is not one we know)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return (1 + int.from_bytes(data[24:27], "little"),
                1 + int.from_bytes(data[27:30], "little"))
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    return None


def check_size(width: int, height: int, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """`ImageError` unless a `width x height` image is within `limits` (aspect ratio, smallest
    side, pixel count)."""
    dims = f"{width}x{height} pixels"
    if width <= 0 or height <= 0:
        raise ImageError(f"the image is {dims}: it has no pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(f"the image is {dims}, a side ratio of {ratio:.0f}:1; at most "
                         f"{limits.max_aspect_ratio:g}:1 is accepted")
    if min(width, height) < limits.min_side:
        raise ImageError(f"the image is {dims}: too small to read (at least {limits.min_side} "
                         f"pixels per side)")
    if width * height > limits.max_pixels:
        raise ImageError(f"the image is {dims} ({width * height:,} pixels), over the limit of "
                         f"{limits.max_pixels:,} pixels; scale it down")


def check_image(image: Image.Image, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """`ImageError` unless a PIL image (already opened) is within `limits`: its size, and its
    format when it was read from a file."""
    if image.format is not None and image.format not in FORMATS:
        raise ImageError(f"{image.format} images are not supported; use "
                         f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    check_size(image.width, image.height, limits)


_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile,
    "GIF": GifImagePlugin.GifImageFile, "WEBP": WebPImagePlugin.WebPImageFile,
}
# What Pillow raises on bad data: its readers wrap parse errors in SyntaxError; decoders raise
# OSError ("image file is truncated"), and the rest show up on odd files.
_DECODE_ERRORS = (SyntaxError, OSError, ValueError, EOFError, struct.error, IndexError,
                  Image.DecompressionBombError)


def read_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode one image's bytes (PNG, JPEG, WEBP; a GIF's first frame) into a loaded PIL image,
    or raise `ImageError` saying what is wrong. Time and memory are bounded by `limits`."""
    if len(data) == 0:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {_size_text(len(data))}, over the limit of "
                         f"{_size_text(limits.max_bytes)}")
    fmt = sniff_format(data)
    if fmt == "WEBP" and (size := _webp_size(data)) is not None:
        check_size(*size, limits)
    # The format's reader parses the header only (Image.open would also do this, then apply
    # Pillow's own, much larger, decompression-bomb limit before ours could say the size).
    try:
        image = _OPENERS[fmt](io.BytesIO(data))
    except _DECODE_ERRORS as e:
        raise ImageError(f"not a valid {fmt} image: {_reason(e)}") from None
    check_size(image.width, image.height, limits)
    try:
        image.load()  # a GIF or an animated WEBP: the first frame
    except _DECODE_ERRORS as e:
        raise ImageError(f"the {fmt} image is truncated or corrupt ({image.width}x"
                         f"{image.height} pixels): {_reason(e)}") from None
    return image


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text[:200] if text else type(error).__name__


def read_image_file(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """`read_image` of a file; its size is checked before it is read."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"{path}: the image is {_size_text(size)}, over the limit of "
                             f"{_size_text(limits.max_bytes)}")
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return read_image(data, limits)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


def image_from_data_uri(uri: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """`read_image` of a base64 `data:` URI (`data:image/png;base64,...`), as editors paste
    screenshots. The payload's size is checked before it is decoded."""
    if not uri.startswith("data:") or "," not in uri:
        raise ImageError("not a data: URI (expected data:image/<format>;base64,<data>)")
    header, payload = uri[5:].split(",", 1)
    media, *params = header.split(";")
    if "base64" not in params:
        raise ImageError("only base64 data: URIs are supported (data:image/png;base64,...)")
    if media and not media.lower().startswith("image/"):
        raise ImageError(f"the data: URI holds {media!r}, not an image")
    if len(payload) // 4 * 3 > limits.max_bytes + 3:
        raise ImageError(f"the image is about {_size_text(len(payload) // 4 * 3)}, over the "
                         f"limit of {_size_text(limits.max_bytes)}")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URI's payload is not valid base64") from None
    return read_image(data, limits)


def check_image_counts(per_message: Sequence[int], limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """`ImageError` if a message has more than `max_images_per_message` images or the whole
    conversation (`per_message`: each message's count, in order) more than
    `max_images_per_conversation`."""
    for i, n in enumerate(per_message):
        if n > limits.max_images_per_message:
            raise ImageError(f"message {i + 1} has {n} images; at most "
                             f"{limits.max_images_per_message} per message")
    total = sum(per_message)
    if total > limits.max_images_per_conversation:
        raise ImageError(f"the conversation has {total} images; at most "
                         f"{limits.max_images_per_conversation} per conversation")
