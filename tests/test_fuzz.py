"""Issue 6, property and fuzz tests (hypothesis; derandomized and bounded, so CI runs the same cases in well
under a minute).

* any valid image size and mode becomes a 1 x 256 x 256 float32 tensor in [-1, 1];
* a 0/255, 0/1 or 0/65535 mask in any mode stays binary (and equal to what was drawn), also after resizing;
* augmentation keeps image and mask aligned for random parameters;
* fuzzing: damaged image files (bit flips, truncation, inserted and overwritten bytes, random bytes behind a
  real signature) make the image and mask loaders return a valid array or raise dataset.DataError; nothing
  else escapes.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import dataset
from augment import AugmentConfig, augment_batch
from dataset import DataError

def bounded(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# (mode, format) pairs PIL writes, restricted to the extensions the project reads
COMBOS = [(m, "PNG") for m in ("L", "RGB", "RGBA", "LA", "P", "1", "I;16")] + \
         [(m, "JPEG") for m in ("L", "RGB", "CMYK", "1")] + \
         [(m, "BMP") for m in ("L", "RGB", "P", "1", "RGBA")] + \
         [(m, "TIFF") for m in ("L", "RGB", "RGBA", "LA", "P", "PA", "1", "I;16", "I;16B", "I", "F", "CMYK",
                                "YCbCr", "LAB")]
EXT = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}
BANDS = {"RGB": 3, "RGBA": 4, "LA": 2, "PA": 2, "CMYK": 4, "YCbCr": 3, "LAB": 3}


def make_image(mode: str, h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "1":
        return Image.fromarray(rng.random((h, w)) > 0.5)
    if mode == "P":
        im = Image.frombytes("P", (w, h), rng.integers(0, 256, h * w, dtype=np.uint8).tobytes())
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return im
    if mode in ("I;16", "I;16B"):
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        return Image.frombytes(mode, (w, h), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-10**6, 10**6, (h, w), dtype=np.int32))
    if mode == "F":
        a = rng.normal(100, 300, (h, w)).astype(np.float32)
        a.flat[rng.integers(0, a.size, 3)] = rng.choice([np.nan, np.inf, -np.inf, 0.5], 3)
        return Image.fromarray(a)
    return Image.frombytes(mode, (w, h), rng.integers(0, 256, h * w * BANDS[mode], dtype=np.uint8).tobytes())


@bounded(120)
@given(combo=st.sampled_from(COMBOS), h=st.integers(1, 300), w=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_any_valid_image_becomes_a_1x256x256_tensor_in_range(combo, h, w, seed):
    mode, fmt = combo
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"scan é{EXT[fmt]}"
        make_image(mode, h, w, seed).save(path, format=fmt)
        grey = dataset.load_image(path)
        assert grey.dtype == np.uint8 and grey.shape == (h, w)
        x = dataset.preprocess(grey)
        assert x.shape == (1, 256, 256) and x.dtype == np.float32
        assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
        t = torch.as_tensor(x)  # and the same through the torch path the training batches use
        assert t.shape == (1, 256, 256)


def blob(h: int, w: int, seed: int) -> np.ndarray:
    """A random ellipse (possibly empty, possibly cut by the border)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(-0.2, 1.2) * h, rng.uniform(-0.2, 1.2) * w
    ry, rx = rng.uniform(0.5, 0.6 * h + 1), rng.uniform(0.5, 0.6 * w + 1)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


MASK_COMBOS = [("L", 255, "PNG"), ("L", 1, "PNG"), ("1", 1, "PNG"), ("P", 255, "PNG"), ("RGB", 255, "PNG"),
               ("I;16", 65535, "PNG"), ("I;16", 1, "PNG"), ("I;16", 255, "TIFF"), ("L", 255, "BMP"),
               ("L", 255, "TIFF"), ("F", 1, "TIFF"), ("RGBA", 255, "PNG"), ("LA", 255, "PNG")]


@bounded(80)
@given(combo=st.sampled_from(MASK_COMBOS), h=st.integers(1, 200), w=st.integers(1, 200),
       seed=st.integers(0, 2**32 - 1), size=st.sampled_from([32, 64, 256]))
def test_a_mask_stays_binary(combo, h, w, seed, size):
    mode, top, fmt = combo
    m = blob(h, w, seed)
    if mode == "1":
        im = Image.fromarray(m)
    elif mode == "I;16":
        im = Image.fromarray(m.astype(np.uint16) * top)
    elif mode == "F":
        im = Image.fromarray(m.astype(np.float32) * top)
    else:
        im = Image.fromarray(m.astype(np.uint8) * top).convert(mode)
        if mode == "P":
            im = Image.fromarray(m.astype(np.uint8) * top).convert("P")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x_mask{EXT[fmt]}"
        im.save(path, format=fmt)
        got = dataset.load_mask(path, (h, w))
    assert got.dtype == bool and got.shape == (h, w)
    np.testing.assert_array_equal(got, m)
    small = dataset.resize_mask(got, size)
    assert small.dtype == bool and small.shape == (size, size)
    if not m.any():
        assert not small.any()


def _aug_cfg(data) -> AugmentConfig:
    return AugmentConfig(hflip=data.draw(st.floats(0, 1)), vflip=data.draw(st.floats(0, 1)),
                         rotate_deg=data.draw(st.floats(0, 180)),
                         scale=tuple(sorted(data.draw(st.tuples(st.floats(0.5, 2), st.floats(0.5, 2))))),
                         shift=data.draw(st.floats(0, 0.3)))


@bounded(60)
@given(data=st.data(), n=st.integers(1, 4), size=st.sampled_from([16, 33, 64]), seed=st.integers(0, 2**63 - 1))
def test_augmentation_moves_image_and_mask_together(data, n, size, seed):
    """Geometry: an image equal to its mask comes out equal to its mask (same warp, to the last pixel).
    With the intensity changes on as well, the mask still marks where the (bright) object went."""
    cfg = _aug_cfg(data)
    masks = torch.stack([torch.as_tensor(blob(size, size, seed + i)) for i in range(n)])[:, None].float()
    masks = torch.cat([masks, masks.flip(-1)], 1)  # two lesion channels, both must follow
    no_intensity = AugmentConfig(**{**cfg.to_dict(), "brightness": 0.0, "contrast": (1.0, 1.0),
                                    "gamma": (1.0, 1.0), "speckle": 0.0, "blur_p": 0.0})
    images = masks[:, :1].clone()
    xi, yi = augment_batch(images, masks, torch.Generator().manual_seed(seed % 2**63), no_intensity)
    assert xi.shape == images.shape and yi.shape == masks.shape
    assert set(torch.unique(yi).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close((xi >= 0.5).float(), yi[:, :1], rtol=0, atol=0)
    x2, _ = augment_batch(masks[:, 1:].clone(), masks, torch.Generator().manual_seed(seed % 2**63), no_intensity)
    torch.testing.assert_close((x2 >= 0.5).float(), yi[:, 1:], rtol=0, atol=0)  # every channel, same warp
    # with the intensity changes: the same geometry, and inside the mask the image is brighter than outside
    x, y = augment_batch(images * 0.8 + 0.1, masks, torch.Generator().manual_seed(seed % 2**63), cfg)
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(y, yi, rtol=0, atol=0)  # same generator -> the same geometry
    for i in range(n):
        inside, outside = y[i, 0] > 0.5, y[i, 0] < 0.5
        if inside.sum() >= 16 and outside.sum() >= 16:
            assert x[i, 0][inside].mean() > x[i, 0][outside].mean()


# ---------------------------------------------------------------------------------------------------------
# Fuzzing the loaders
# ---------------------------------------------------------------------------------------------------------

def _seed_files() -> dict[str, bytes]:
    out = {}
    for mode, fmt in [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG"),
                      ("CMYK", "JPEG"), ("L", "BMP"), ("L", "TIFF"), ("F", "TIFF"), ("RGB", "TIFF")]:
        b = io.BytesIO()
        make_image(mode, 23, 31, 5).save(b, format=fmt)
        out[f"{mode}.{fmt}"] = b.getvalue()
    b = io.BytesIO()
    Image.fromarray(blob(23, 31, 1).astype(np.uint8) * 255).save(b, format="PNG")
    out["mask.PNG"] = b.getvalue()
    b = io.BytesIO()
    make_image("L", 23, 31, 5).save(b, format="TIFF", compression="tiff_deflate")
    out["deflate.TIFF"] = b.getvalue()
    return out


SEEDS = _seed_files()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("bigint"), st.integers(0, 10**6), st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                                                          b"\x00\x00\x00\x00", b"\x80\x00\x00\x00"])),
)


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in muts:
        if not b:
            break
        pos %= len(b)
        if kind == "flip":
            b[pos] ^= arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = arg
        else:
            b[pos:pos + len(arg)] = arg
    return bytes(b)


def _only_data_errors(path: Path) -> None:
    for load in (dataset.load_image, dataset.load_mask):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL may warn about odd files; warnings are not failures
                a = load(path)
        except DataError as e:
            assert str(path) in str(e)
        else:
            assert a.ndim == 2 and a.dtype in (np.uint8, np.bool_)


@bounded(800)
@given(name=st.sampled_from(sorted(SEEDS)), muts=st.lists(mutation, min_size=1, max_size=4),
       ext=st.sampled_from([".png", ".jpg", ".tif", ".bmp"]))
def test_fuzz_damaged_files_raise_only_data_error(name, muts, ext):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{ext}"
        path.write_bytes(mutate(SEEDS[name], muts))
        _only_data_errors(path)


SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xee", b"BM", b"II*\x00", b"MM\x00*",
              b"GIF89a", b"RIFF", b"P5\n", b""]


@bounded(150)
@given(sig=st.sampled_from(SIGNATURES), body=st.binary(max_size=200))
def test_fuzz_random_bytes_behind_a_signature(sig, body):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "random.png"
        path.write_bytes(sig + body)
        _only_data_errors(path)


def test_fuzz_seeds_are_valid_files():
    """The fuzz starts from files that load (so the mutations test damage, not unsupported formats)."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in SEEDS.items():
            p = Path(d) / f"seed{EXT[name.split('.')[1]]}"
            p.write_bytes(data)
            assert dataset.load_image(p).shape == (23, 31)
        p.write_bytes(SEEDS["mask.PNG"])
        assert dataset.load_mask(p).any()
