"""Synthetic breast-ultrasound phantoms: the embedded default data set and the tests' data.

Each phantom has speckle texture over tissue layers (skin, subcutaneous fat, fibroglandular tissue, pectoral
muscle) and, unless it is normal, one hypoechoic lesion: oval, smooth and wider than tall with posterior
enhancement for benign; irregular, spiculated and taller than wide with posterior shadowing for malignant.

    python phantom.py --out data/phantoms --per-class 40     # writes a BUSI-style tree
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dataset import CLASS_NAMES


def _smooth(a: np.ndarray, passes: int = 2) -> np.ndarray:
    for _ in range(passes):
        a = (a + np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1) + np.roll(a, -1, 1)) / 5.0
    return a


def lesion_shape(label: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A bool lesion mask of the class's typical shape, somewhere in the fibroglandular band."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy = rng.uniform(0.45, 0.65) * h
    cx = rng.uniform(0.3, 0.7) * w
    base = rng.uniform(0.09, 0.16) * min(h, w)
    theta = np.arctan2(yy - cy, xx - cx)
    if label == "benign":   # wider than tall, smooth, slightly lobulated
        ry, rx = base * rng.uniform(0.55, 0.8), base * rng.uniform(1.1, 1.4)
        wobble = 1 + 0.06 * np.sin(2 * theta + rng.uniform(0, 6.3))
    else:                   # taller than wide, irregular margin with spicules
        ry, rx = base * rng.uniform(1.05, 1.35), base * rng.uniform(0.7, 0.9)
        k = rng.integers(6, 11)
        wobble = (1 + 0.18 * np.sin(k * theta + rng.uniform(0, 6.3))
                  + 0.10 * np.sin((k + 3) * theta + rng.uniform(0, 6.3)))
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return r <= wobble


def make_phantom(label: str, height: int = 256, width: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: (uint8 greyscale image H x W, bool lesion mask H x W; all False for normal)."""
    if label not in CLASS_NAMES:
        raise ValueError(f"label must be one of {CLASS_NAMES}, got {label!r}")
    rng = np.random.default_rng(seed)
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # tissue layers with wavy boundaries: echogenicity (mean brightness) per depth
    wave = lambda amp, f, ph: amp * h * np.sin(2 * np.pi * f * xx / w + ph)
    skin = 0.06 * h + wave(0.01, 1, rng.uniform(0, 6.3))
    fat = 0.25 * h + wave(0.03, rng.uniform(0.5, 1.5), rng.uniform(0, 6.3))
    muscle = 0.82 * h + wave(0.03, rng.uniform(0.5, 1.5), rng.uniform(0, 6.3))
    echo = np.full((h, w), 0.55)
    echo[yy < fat] = 0.3
    echo[yy < skin] = 0.85
    echo[yy > muscle] = 0.4 + 0.15 * (np.sin(yy[yy > muscle] / 3.0) > 0.5)
    echo *= 1 + 0.25 * _smooth(rng.standard_normal((h, w)), 6)  # glandular heterogeneity
    mask = np.zeros((h, w), dtype=bool)
    if label != "normal":
        mask = lesion_shape(label, h, w, rng)
        ys, xs = np.nonzero(mask)
        bottom, left, right = ys.max(), xs.min(), xs.max()
        behind = (yy > bottom) & (xx >= left) & (xx <= right)
        fall = np.exp(-(yy - bottom) / (0.25 * h))
        echo[behind] *= (1 + 0.5 * fall[behind]) if label == "benign" else (1 - 0.6 * fall[behind])
        echo[mask] = rng.uniform(0.06, 0.14)
    # speckle: fully developed speckle has Rayleigh-distributed amplitude; correlate it over a few pixels
    speckle = _smooth(rng.rayleigh(1.0, (h, w)), 1) / 1.25
    img = echo * speckle
    img *= np.exp(-0.6 * yy / h)  # depth attenuation (time-gain compensation is imperfect)
    img = np.clip(img * 255 * rng.uniform(0.85, 1.1), 0, 255).astype(np.uint8)
    return img, mask


def write_busi_tree(root: str | Path, per_class: int = 10, height: int = 256, width: int = 320,
                    seed: int = 0) -> Path:
    """Write a BUSI-style tree of phantoms: root/<class>/<class> (n).png and <class> (n)_mask.png."""
    root = Path(root)
    for ci, label in enumerate(CLASS_NAMES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            img, mask = make_phantom(label, height, width, seed=seed * 100_003 + ci * 10_007 + n)
            Image.fromarray(img).save(root / label / f"{label} ({n}).png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / label / f"{label} ({n})_mask.png")
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/phantoms", help="folder to write the BUSI-style tree into")
    ap.add_argument("--per-class", type=int, default=40, help="images per class")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_busi_tree(a.out, a.per_class, a.height, a.width, a.seed))
