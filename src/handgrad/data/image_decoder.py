"""Decode untrusted PNG/JPEG files with Pillow in a process of their own: a decoder that crashes takes that process
down, not the run.

    decode(path, max_pixels)  one file as the model takes it: 32x32 RGB uint8 bytes (row-major, height x width x 3)
    reason(err)               why a file cannot be used, in one line (Pillow's exceptions, MemoryError, ...)
    serve(requests, replies)  the worker's loop: a path in, the pixels or a one-line reason out, one file at a time
    main(argv)                ``python image_decoder.py MAX_PIXELS``: the worker (handgrad.data.images starts it)

This module imports Pillow and the standard library only, and the worker runs it by its file path (not ``-m
handgrad.data.image_decoder``, which would import the handgrad package and with it torch): it starts in a tenth of
a second and holds no more memory than the one image it decodes.

The pixels. The header is read first (Image.open reads no pixel data): an image of more than ``max_pixels`` pixels
(width x height as its header declares them; default :data:`MAX_PIXELS`) is refused before anything is decoded,
whatever its file size (a 631-byte JPEG can declare 60000x60000). Only PNG and JPEG are opened (the formats the
project documents), whatever the file's name. A JPEG is decoded at a reduced scale where it is large
(``Image.draft('RGB', (64, 64))``: libjpeg's DCT scaling, 1/2 to 1/8, to no less than twice the target as
Image.thumbnail does), which bounds its memory. Then: RGB (grayscale expanded, alpha dropped, 16-bit grayscale
reduced to its high byte), resized to 32x32 with ``Image.resize((32, 32), Image.BILINEAR, reducing_gap=None)``
(bilinear, antialiased: the filter is widened by the reduction factor, as torchvision's resize with antialias=True
does; the whole picture squeezed, its aspect ratio not kept), and the EXIF orientation applied
(ImageOps.exif_transpose; after the resize, which commutes with it for a square target).

The protocol, on the worker's stdin and stdout: the worker first writes :data:`READY`. A request is a 4-byte
big-endian length and the path (os.fsencode); the reply is one status byte (:data:`IMAGE` or :data:`REFUSED`), a
4-byte big-endian length and the payload: 32*32*3 bytes, or the reason in UTF-8.
"""

from __future__ import annotations

import os
import struct
import sys
import warnings
from typing import BinaryIO, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = (32, 32)  # (width, height) of what the model takes
MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS (its decompression-bomb warning): about 0.25 GB RGBA
FORMATS = ("PNG", "JPEG")  # the decoders a file may reach, whatever its name
DRAFT = (2 * SIZE[0], 2 * SIZE[1])  # a JPEG is decoded at the smallest DCT scale that keeps at least this size
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of 16-bit grayscale PNG
READY, IMAGE, REFUSED = b"R", b"+", b"-"
HEADER = struct.Struct(">I")
MAX_REASON = 200  # characters


class Refused(ValueError):
    """A file that is refused before it is decoded (its header declares too many pixels)."""


def decode(path: str, max_pixels: int = MAX_PIXELS) -> bytes:
    """The image at ``path`` as 32x32 RGB uint8 bytes (row-major, height x width x 3); raises :class:`Refused`
    before decoding an image of more than ``max_pixels`` pixels, and Pillow's exceptions for a bad file."""
    with Image.open(path, formats=FORMATS) as img:
        check_pixels(img, max_pixels)
        if img.format == "JPEG":
            img.draft("RGB", DRAFT)
        img.load()
        small = to_rgb(img).resize(SIZE, Image.BILINEAR, reducing_gap=None)
        return ImageOps.exif_transpose(small).tobytes()


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels: nothing of it is decoded yet."""
    width, height = img.size
    if width * height > max_pixels:
        raise Refused(f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                      f"(--predict.max_pixels): refused before decoding")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB: grayscale expanded, alpha dropped, 16-bit grayscale reduced to its high byte (Pillow's own conversion of
    16-bit values to RGB clips them at 255 instead)."""
    if img.mode in SIXTEEN_BIT:
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def reason(err: BaseException) -> str:
    """Why a file cannot be used, in one line of at most MAX_REASON characters."""
    if isinstance(err, UnidentifiedImageError):
        return f"not a {' or '.join(FORMATS)} image"
    if isinstance(err, MemoryError):
        return "out of memory while decoding it"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


# ----------------------------------------------------------------------------- the worker

def read_request(requests: BinaryIO) -> Optional[str]:
    """The next path, or None when the requests have ended."""
    head = requests.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    return os.fsdecode(requests.read(HEADER.unpack(head)[0]))


def serve(requests: BinaryIO, replies: BinaryIO, max_pixels: int = MAX_PIXELS) -> None:
    """Answer each path with its pixels or a one-line reason, until the requests end."""
    replies.write(READY)
    replies.flush()
    while (path := read_request(requests)) is not None:
        try:
            status, payload = IMAGE, decode(path, max_pixels)
        except Exception as err:  # (MemoryError included) a bad file is a reply, never the worker's end
            status, payload = REFUSED, reason(err).encode()
        replies.write(status + HEADER.pack(len(payload)) + payload)
        replies.flush()


def main(argv: list[str]) -> None:
    """``python image_decoder.py MAX_PIXELS``: serve stdin and stdout. Pillow's own decompression-bomb check is
    replaced by check_pixels (one rule, the given limit), and its warnings (a palette's transparency, ...) are not
    printed: a file's only message is its reply."""
    Image.MAX_IMAGE_PIXELS = None
    warnings.simplefilter("ignore")
    serve(sys.stdin.buffer, sys.stdout.buffer, int(argv[1]))


if __name__ == "__main__":
    main(sys.argv)
