"""The guarded decode path: damaged, oversized and unusual images are one sample's skip, never
a crash, and every image comes out uint8 (C, H, W) with the channels asked for."""

from __future__ import annotations

import io
import resource
import time
import zlib

import numpy as np
import pytest
from helpers import bomb_png, flip_byte, idat_span, raw_png
from PIL import Image

from ssl_kd.shards.decode import decode_image
from ssl_kd.shards.skips import SampleError


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _gray(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(img, channels: int, shape: tuple[int, int]) -> None:
    assert img.dtype.is_floating_point is False and str(img.dtype) == "torch.uint8"
    assert tuple(img.shape) == (channels, *shape)


@pytest.mark.parametrize("where", [0.5, 0.8, 0.95])
def test_png_with_one_flipped_byte_is_a_skip_not_a_crash(where: float) -> None:
    # torchvision's libpng decoder dies with SIGSEGV on exactly this ("IDAT: incorrect data
    # check"); reaching the assertion at all is half the test.
    png = _encode(_gray(), "PNG")
    start, end = idat_span(png)
    bad = flip_byte(png, start + int((end - start) * where))
    with pytest.raises(SampleError) as err:
        decode_image(bad, 1)
    assert err.value.reason == "corrupt image"


@pytest.mark.parametrize("height", [100, 1000])
def test_png_with_less_data_than_its_header_declares(height: int) -> None:
    rows = b"".join(b"\x00" + bytes(28) for _ in range(10))  # 10 rows where `height` are due
    with pytest.raises(SampleError) as err:
        decode_image(raw_png(28, height, zlib.compress(rows)), 1)
    assert err.value.reason == "corrupt image"


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = bomb_png(50_000)  # 304 KB that decode to 2.5 GB of pixels (10 GB as floats)
    assert len(bomb) < 400_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(SampleError) as err:
        decode_image(bomb, 1)
    assert err.value.reason == "image too large"
    assert "2500000000 pixels" in err.value.detail
    # Refused from the header: no decode ran (peak memory grew by less than 100 MB).
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100_000, f"peak RSS grew by {grown_kb} KB"
    assert time.perf_counter() - t0 < 5


def test_pixel_limit_is_configurable() -> None:
    png = _encode(_gray(100, 100), "PNG")
    assert decode_image(png, 1, max_pixels=10_000).shape == (1, 100, 100)
    with pytest.raises(SampleError) as err:
        decode_image(png, 1, max_pixels=9_999)
    assert err.value.reason == "image too large"


def test_16_bit_png_is_scaled_to_8_bits() -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    gray16 = _encode(values, "PNG")  # PIL writes mode I;16
    img = decode_image(gray16, 1)
    _check(img, 1, (1, 3))
    assert img.flatten().tolist() == [0, 100, 255]
    # 16-bit RGB (PIL cannot write it): by hand, big-endian samples, filter 0.
    px = np.array([[[65535, 0, 257 * 50]]], dtype=">u2").tobytes()
    rgb16 = raw_png(1, 1, zlib.compress(b"\x00" + px), bit_depth=16, color_type=2)
    img = decode_image(rgb16, 3)
    _check(img, 3, (1, 1))
    assert img.flatten().tolist() == [255, 0, 50]


@pytest.mark.parametrize("channels", [1, 3])
def test_webp_gif_apng_give_the_channels_asked_for(channels: int) -> None:
    rgb = _rgb(20, 30)
    frames = [Image.fromarray(_rgb(20, 30, seed=s)) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:])
    for data in (_encode(rgb, "WEBP"), gif.getvalue(), apng.getvalue()):
        _check(decode_image(data, channels), channels, (20, 30))


def test_first_frame_of_an_animation() -> None:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue(), 1).unique().tolist() == [10]


def test_palette_alpha_cmyk_and_bilevel_images() -> None:
    rgba = np.dstack([_rgb(6, 6), np.zeros((6, 6), np.uint8)])  # fully transparent
    palette = Image.fromarray(_rgb(6, 6)).convert("P")
    palette.info["transparency"] = 0
    p_buf = io.BytesIO()
    palette.save(p_buf, "PNG", transparency=0)
    cmyk = io.BytesIO()
    Image.fromarray(_rgb(6, 6)).convert("CMYK").save(cmyk, "JPEG")
    bilevel = io.BytesIO()
    Image.fromarray(_gray(6, 6)).convert("1").save(bilevel, "PNG")
    la = Image.fromarray(np.dstack([_gray(6, 6), _gray(6, 6, 1)]), "LA")
    la_buf = io.BytesIO()
    la.save(la_buf, "PNG")
    for data in (_encode(rgba, "PNG"), p_buf.getvalue(), cmyk.getvalue(), la_buf.getvalue()):
        for channels in (1, 3):
            _check(decode_image(data, channels), channels, (6, 6))
    # Alpha is dropped, the colour kept as stored (what PIL's convert("RGB") gives).
    assert decode_image(_encode(rgba, "PNG"), 3).permute(1, 2, 0).numpy().tolist() == (
        rgba[..., :3].tolist()
    )
    assert set(decode_image(bilevel.getvalue(), 1).unique().tolist()) <= {0, 255}
    # None: grayscale stays one channel, colour becomes three.
    assert decode_image(la_buf.getvalue(), None).shape[0] == 1
    assert decode_image(cmyk.getvalue(), None).shape[0] == 3


def test_exif_orientation_is_applied() -> None:
    img = Image.fromarray(_rgb(10, 40))  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    _check(decode_image(buf.getvalue(), 3), 3, (40, 10))


def test_large_jpeg_decodes_at_a_reduced_scale_never_below_size() -> None:
    jpeg = _encode(_rgb(800, 1200), "JPEG")
    assert decode_image(jpeg, 3).shape == (3, 800, 1200)
    small = decode_image(jpeg, 3, size=100)
    assert small.shape == (3, 100, 150)  # 1/8 DCT scale: the shorter side exactly reaches 100
    assert min(decode_image(jpeg, 3, size=224).shape[1:]) >= 224


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_damaged_images_of_every_format_are_skips(fmt: str) -> None:
    data = _encode(_rgb(64, 64), fmt)
    rng = np.random.default_rng(0)
    damaged = [data[:n] for n in (0, 8, len(data) // 3, len(data) // 2)]
    damaged += [flip_byte(data, int(p)) for p in rng.integers(0, len(data), 40)]
    for bad in damaged:
        try:
            img = decode_image(bad, 3)
        except SampleError as exc:
            assert exc.reason in ("corrupt image", "image too large")
            assert "0x" not in exc.detail  # plain text, no object reprs
            continue
        _check(img, 3, tuple(img.shape[1:]))  # a flip in a tolerant place: still a clean image


def test_not_an_image_is_a_plain_reason() -> None:
    with pytest.raises(SampleError) as err:
        decode_image(b"hello, world", 1)
    assert (err.value.reason, err.value.detail) == (
        "corrupt image",
        "not a recognised image format",
    )


# The Adam7 passes (x0, y0, dx, dy), written out from the PNG spec rather than imported: the
# test builds its interlaced image independently of the code it checks.
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def test_interlaced_png_decodes_and_a_short_one_is_refused() -> None:
    arr = _gray(13, 11)
    rows = [row for x0, y0, dx, dy in ADAM7 for row in arr[y0::dy, x0::dx] if row.size]
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 per pass row
    good = raw_png(11, 13, zlib.compress(raw), interlace=1)
    assert decode_image(good, 1)[0].numpy().tolist() == arr.tolist()
    with pytest.raises(SampleError):
        decode_image(raw_png(11, 13, zlib.compress(raw[:-20]), interlace=1), 1)
