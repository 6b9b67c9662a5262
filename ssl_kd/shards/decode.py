"""The one guarded decode path: every image of every stage is decoded here, by PIL.

Web-scale pools hold every kind of bad image, so decoding is defensive by construction:

- the header is read first (PIL opens lazily) and an image over ``max_pixels`` is a recorded
  skip, never a 13 GB allocation;
- PIL decodes every format: torchvision's libpng path crashes the process (SIGSEGV) on one
  flipped byte in a PNG's pixel data or on data shorter than its header declares, and its
  libjpeg path prints a line to stderr for every slightly damaged JPEG; PIL raises instead;
- a JPEG larger than the model needs is decoded at a reduced DCT scale (``size``: PIL's draft
  mode), several times faster on web-sized photos than a full decode and resize;
- the output is always ``uint8``, ``C × H × W``, with the requested channels: 16-bit images are
  scaled to 8 bits, palette and CMYK converted, alpha dropped (the colour as stored: what
  ``PIL.Image.convert("RGB")`` gives, so a torchvision-pretrained teacher sees what it was
  trained on), EXIF orientation applied, the first frame of an animation taken.

Anything else that goes wrong in one image raises :class:`SampleError` for that image alone.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ssl_kd.shards.skips import SampleError, plain

# PIL's own decompression-bomb threshold: the default limit, about 90 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_EXIF_ORIENTATION = 0x0112
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel by colour type
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)

# The pixel limit is checked here, before decoding; PIL's warning below its hard limit is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(
    data: bytes, channels: int | None, max_pixels: int = DEFAULT_MAX_PIXELS, size: int = 0
) -> torch.Tensor:
    """Decode image bytes to a ``uint8`` (C, H, W) tensor with ``channels`` (1 or 3; None: 1
    for grayscale images, else 3). With ``size``, a JPEG may come back smaller than stored but
    never with a side under ``size``. Raises :class:`SampleError` for any image it cannot use."""
    img = _open(data, max_pixels)
    if channels is None:
        channels = 1 if img.mode in _GRAY_MODES else 3
    try:
        if size and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (size, size))
        if img.format == "PNG" and _png_pixel_data_short(data):
            # PIL zero-fills the missing rows of a PNG whose stream ends early, silently.
            raise SampleError("corrupt image", "PNG pixel data shorter than its header declares")
        return _decode_pil(img, channels)
    except SampleError:
        raise
    except Exception as exc:  # MemoryError included: one image's problem, not the run's
        raise SampleError("corrupt image", plain(exc)) from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read; SampleError if unreadable or over the limit."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # PIL refuses at open time above twice its own limit; a larger limit asked for here wins.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleError("image too large", plain(exc)) from None
    except UnidentifiedImageError:
        raise SampleError("corrupt image", "not a recognised image format") from None
    except Exception as exc:
        raise SampleError("corrupt image", plain(exc)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise SampleError(
            "image too large",
            f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
        )
    if width == 0 or height == 0:
        raise SampleError("corrupt image", f"{width}x{height} pixels")
    return img


def _decode_pil(img: Image.Image, channels: int) -> torch.Tensor:
    img.load()  # first frame only for animations
    img = _oriented(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette's transparency is dropped directly
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    # One copy out of PIL; the (H, W, C) → (C, H, W) permute stays a view (the resize and the
    # batch stack copy anyway).
    t = torch.from_numpy(np.array(img, dtype=np.uint8))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _oriented(img: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation (unchanged when it has none or the EXIF
    block is unreadable: the pixels are still good)."""
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer or float) grayscale to 8 bits, scaled, not clipped."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0, 255)
    else:  # PIL holds 16-bit PNG/TIFF samples as I;16 or I: 0..65535
        arr = np.clip(arr.astype(np.int64), 0, 65535) // 257
    return Image.fromarray(arr.astype(np.uint8), "L")


def _png_pixel_data_short(data: bytes) -> bool:
    """Whether a PNG's image data inflates to fewer bytes than its header needs (the first
    frame's IDAT chunks; structural damage elsewhere is left to PIL, which raises on it)."""
    try:
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        bits = depth * _PNG_SAMPLES[colour]
    except (struct.error, KeyError):
        return False
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    needed = 0
    for x0, y0, dx, dy in passes:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            needed += h * (1 + (w * bits + 7) // 8)  # a filter byte per row
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < needed:
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IDAT":
            while chunk and got < needed:  # bounded steps: never the whole image in memory
                got += len(inflate.decompress(chunk, 1 << 22))
                chunk = inflate.unconsumed_tail
        elif got:
            break  # past the IDAT run
    if got < needed:
        got += len(inflate.flush())  # output zlib still held when the last input was taken
    return got < needed
