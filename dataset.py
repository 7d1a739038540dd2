"""Data: finding images and masks, reading them safely, preprocessing, splitting, and in-memory tensors.

This module is the one place for the facts every script shares: image size, normalization, class names.
They are stored in every checkpoint (see model.py), so predict.py and evaluate.py never guess them.

Three layouts are understood:
  * BUSI class folders:  root/{benign,malignant,normal}/X (n).png with masks X (n)_mask.png, X (n)_mask_1.png ...
  * two folders (the original repo's path_to_images / path_to_masks): masks matched to images by file name
  * a manifest CSV with columns image,mask,label (paths relative to the CSV; several masks joined by ';')
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dicom_io import has_dicom_magic, is_dicom

log = logging.getLogger("dataset")

# ---- the shared facts (stored in every checkpoint) ----
IMAGE_SIZE = 256                                  # network input is IMAGE_SIZE x IMAGE_SIZE, one grey channel
NORM_MEAN = 0.5                                   # pixels scaled to [0,1], then (x - NORM_MEAN) / NORM_STD
NORM_STD = 0.5
CLASS_NAMES = ("normal", "benign", "malignant")   # image-level labels
LESION_CLASSES = ("benign", "malignant")          # one output channel per lesion class, in this order
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")  # DICOM: dicom_io.py
# Decompression-bomb guard, set on purpose: the largest ultrasound frames are a few megapixels; a file that
# decodes to more than this is refused instead of filling memory.
MAX_IMAGE_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Working resolution: an image whose longest side is over this is read, segmented, measured and drawn at this size
# (shrink); only its mask is drawn back at full size (to_full), so memory stays bounded whatever the image's size.
WORK_SIDE = 2048


class DataError(Exception):
    """A problem with an input file or folder. The message names the file and says what is wrong."""


def preprocessing_meta(image_size: int = IMAGE_SIZE) -> dict:
    """The preprocessing facts a checkpoint must carry."""
    return {"image_size": image_size, "in_channels": 1, "norm_mean": NORM_MEAN, "norm_std": NORM_STD,
            "class_names": list(CLASS_NAMES), "lesion_classes": list(LESION_CLASSES)}


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------

ORIENTATION_TAG = 0x0112  # EXIF Orientation (JPEG, TIFF, PNG eXIf): 1 is upright


def _open(path: Path) -> Image.Image:
    """A decoded image, upright as its EXIF orientation says; a DataError naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an image file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    img = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's own guard, checked from the header at open
            img = Image.open(path)
            if img.width * img.height > MAX_IMAGE_PIXELS:  # also refused before decoding, whatever PIL says
                raise Image.DecompressionBombError(f"{img.width}x{img.height} = {img.width * img.height} pixels")
            img.load()
            if img.getexif().get(ORIENTATION_TAG, 1) != 1:  # stored turned: show it as every viewer does
                ImageOps.exif_transpose(img, in_place=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        _close(img)
        raise DataError(f"{path}: image too large ({e}); the limit is {MAX_IMAGE_PIXELS} pixels "
                        f"(dataset.MAX_IMAGE_PIXELS) to guard against decompression bombs") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file PIL can read (wrong extension, or not an image)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, never a traceback from PIL
        _close(img)
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); the file may be truncated or "
                        f"corrupt") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: image too large ({img.width}x{img.height}); the limit is {MAX_IMAGE_PIXELS} pixels")
    return img


def _close(img: Image.Image | None) -> None:
    if img is not None:
        try:
            img.close()
        except Exception:  # noqa: BLE001 - closing a broken file must not hide the real error
            pass


def _to_grey(img: Image.Image, path: Path) -> np.ndarray:
    """Any PIL mode -> uint8 HxW. 16-bit and float images are scaled by their type's range."""
    mode = img.mode
    try:
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(img, dtype=np.float64)
            top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
            return np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        if mode == "F":
            a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            top = 1.0 if a.max() <= 1.0 else 255.0
            return np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")  # alpha is dropped: pixel values stay as stored
        if mode == "LAB":
            return np.asarray(img.getchannel("L"), dtype=np.uint8)  # lightness is the grey image
        return np.asarray(img if mode == "L" else img.convert("L"), dtype=np.uint8)  # L: no second copy
    except Exception as e:  # noqa: BLE001 - e.g. a mode PIL cannot convert, or a decoder error on access
        raise DataError(f"{path}: cannot convert image of mode {mode} to greyscale ({e})") from None


def load_image(path: str | Path) -> np.ndarray:
    """Read any image file as uint8 greyscale HxW (RGB with equal channels keeps its values exactly). DICOM
    (.dcm, or the DICOM preamble): its first frame, through dicom_io.py."""
    path = Path(path)
    if is_dicom(path):
        from dicom_io import DicomError, read_frame
        try:
            return read_frame(path, 0, max_pixels=MAX_IMAGE_PIXELS)
        except DicomError as e:
            raise DataError(str(e)) from None
    return _to_grey(_open(path), path)


def load_working_image(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
    """(load_image at the working resolution (shrink), the image's full (rows, cols))."""
    grey = load_image(path)
    return shrink(grey), grey.shape


def load_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask file as bool HxW. Accepts 0/255 and 0/1 masks in any mode; anything else is an error."""
    path = Path(path)
    img = _open(path)
    if expected_shape is not None and (img.height, img.width) != tuple(expected_shape):
        raise DataError(f"{path}: mask is {img.width}x{img.height} but its image is "
                        f"{expected_shape[1]}x{expected_shape[0]}")
    if img.mode.startswith(("I", "F")):  # 16/32-bit or float masks: judge the stored values, not scaled ones
        try:
            raw = np.unique(np.asarray(img))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot read mask of mode {img.mode} ({e})") from None
        for top in (1, 255, 65535):
            if np.all(np.isin(raw, (0, top))):
                return np.asarray(img) == top
        shown = ", ".join(f"{v:g}" for v in raw[:8]) + (" ..." if len(raw) > 8 else "")
        raise DataError(f"{path}: mask must hold only 0/255, 0/1 or 0/65535, found values {shown}")
    a = _to_grey(img, path)
    values = np.unique(a)
    if np.all(np.isin(values, (0, 255))):
        return a == 255
    if np.all(np.isin(values, (0, 1))):
        return a == 1
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    raise DataError(f"{path}: mask must hold only 0/255 or 0/1, found values {shown}")


def load_mask_union(paths: list[Path] | tuple[Path, ...], shape: tuple[int, int]) -> np.ndarray:
    """The union of several mask files (BUSI has up to 3 per image); no files -> an empty mask."""
    mask = np.zeros(shape, dtype=bool)
    for p in paths:
        mask |= load_mask(p, shape)
    return mask


# ---------------------------------------------------------------------------------------------------------
# Preprocessing (the one place that defines what the network sees)
# ---------------------------------------------------------------------------------------------------------

def resize_image(grey: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 HxW -> uint8 size x size (bilinear with antialiasing)."""
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """bool HxW -> bool size x size. Area-weighted resize then >= 0.5, so the mask stays binary and centred."""
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(m) >= 128


def working_size(shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of an image of this shape at the working resolution: the longest side at most WORK_SIDE."""
    h, w = int(shape[0]), int(shape[1])
    k = WORK_SIDE / max(h, w)
    return (h, w) if k >= 1 else (max(1, round(h * k)), max(1, round(w * k)))


def shrink(grey: np.ndarray) -> np.ndarray:
    """uint8 H x W at the working resolution (bilinear with antialiasing); the array itself when small enough."""
    h, w = working_size(grey.shape)
    if (h, w) == grey.shape:
        return grey
    return np.asarray(Image.fromarray(grey).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def block_edges(full: int, work: int) -> np.ndarray:
    """work + 1 pixel indices: working pixel i stands for the full-size pixels block_edges[i] to block_edges[i+1] - 1
    (the inverse of to_full's nearest neighbour)."""
    return -(-np.arange(work + 1, dtype=np.int64) * full // work)


def to_full(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask (or label image, or a stack ... x h x w) at the working resolution drawn back at full size by nearest
    neighbour: full pixel (r, c) takes working pixel (r * h // H, c * w // W). Same dtype: a mask, never a float map.
    The array itself when it already has that size."""
    h, w = mask.shape[-2:]
    rows, cols = int(shape[0]), int(shape[1])
    if (h, w) == (rows, cols):
        return mask
    return mask[..., np.arange(rows) * h // rows, :][..., np.arange(cols) * w // cols]


def full_area(mask: np.ndarray, shape: tuple[int, int]) -> int:
    """The number of pixels of to_full(mask, shape), without drawing it."""
    rows = np.diff(block_edges(shape[0], mask.shape[0]))
    cols = np.diff(block_edges(shape[1], mask.shape[1]))
    return int(rows @ np.asarray(mask, np.int64) @ cols)


def normalize(x):
    """uint8 values (numpy or torch) -> float in [-1, 1]: [0,1] then (x - mean) / std."""
    return (x / 255.0 - NORM_MEAN) / NORM_STD


def preprocess(grey: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 HxW -> float32 1 x size x size in [-1, 1]: exactly what the network is given."""
    return normalize(resize_image(grey, size).astype(np.float32))[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One labelled image: its file, its mask files (empty for a normal image), its label and a stable key."""
    image: Path
    masks: tuple[Path, ...]
    label: str
    key: str  # path relative to the data root (prefixed "<source>/" in multi-source runs), used in split files
    patient: str = ""  # patient id where the data says (a manifest's patient column): a split group
    attrs: tuple = ()  # other manifest columns as (name, value) pairs, e.g. (("doppler", "yes"),), for subgroups
    source: str = ""   # name of the data source in a multi-source run ("" for a single source)

    @property
    def lesion_index(self) -> int | None:
        return LESION_CLASSES.index(self.label) if self.label in LESION_CLASSES else None


_MASK_RE = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<n>\d+))?$", re.IGNORECASE)


def _is_image(p: Path) -> bool:
    """An image file by its extension, or a DICOM file by its content (often named without an extension)."""
    return p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in IMAGE_EXTENSIONS or has_dicom_magic(p))


def _check_label(label: str, where: str) -> str:
    label = label.strip().lower()
    if label not in CLASS_NAMES:
        raise DataError(f"{where}: unknown label {label!r}; expected one of {', '.join(CLASS_NAMES)}")
    return label


def _pair_masks(files: list[Path], where: Path) -> dict[Path, list[Path]]:
    """Split a folder listing into images and their masks (X.png <- X_mask.png, X_mask_1.png, ...)."""
    images = {p.stem: p for p in files if not _MASK_RE.match(p.stem)}
    masks: dict[Path, list[Path]] = {p: [] for p in images.values()}
    for p in files:
        m = _MASK_RE.match(p.stem)
        if not m:
            continue
        owner = images.get(m.group("stem"))
        if owner is None:
            raise DataError(f"{p}: mask with no image (expected {m.group('stem')}.<ext> in {where})")
        masks[owner].append(p)
    return {img: sorted(ms, key=lambda q: q.name) for img, ms in masks.items()}


def discover_busi(root: str | Path) -> list[Sample]:
    """Find every image in a BUSI-style tree: root/<class>/<image> with <stem>_mask*.png beside it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    present = [c for c in CLASS_NAMES if (root / c).is_dir()]
    missing = [c for c in CLASS_NAMES if c not in present]
    if not present:
        entries = sorted(p.name for p in root.iterdir())[:10]
        if not entries:
            raise DataError(f"{root}: the folder is empty; expected class folders {', '.join(CLASS_NAMES)}")
        raise DataError(f"{root}: no class folders ({', '.join(CLASS_NAMES)}) found; it holds {entries}. "
                        f"For other layouts use path_to_images/path_to_masks or a manifest CSV")
    if missing:
        raise DataError(f"{root}: missing class folder(s) {', '.join(missing)} (found {', '.join(present)}); "
                        f"to train on a subset of classes write a manifest CSV")
    samples = []
    for label in CLASS_NAMES:
        folder = root / label
        files = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)
        pairs = _pair_masks(files, folder)
        if not pairs:
            raise DataError(f"{folder}: no images found")
        for img, masks in sorted(pairs.items(), key=lambda kv: _natural_key(kv[0].name)):
            if not masks:
                raise DataError(f"{img}: image with no mask (expected {img.stem}_mask.png beside it)")
            samples.append(Sample(img, tuple(masks), label, img.relative_to(root).as_posix()))
    return samples


def label_from_name(name: str) -> str | None:
    """'benign (3).png' -> 'benign'; None when the name holds no class name."""
    low = name.lower()
    found = [c for c in CLASS_NAMES if c in low]
    return found[0] if len(found) == 1 else None


def discover_folders(path_to_images: str | Path, path_to_masks: str | Path,
                     default_label: str = "") -> list[Sample]:
    """The original layout: one folder of images, one of masks, matched by file name.

    A mask matches an image when it has the same stem (any extension) or is <stem>_mask*.<ext>. The label
    comes from the file name (BUSI names start with their class), else from default_label.
    """
    images_dir, masks_dir = Path(path_to_images), Path(path_to_masks)
    for d, what in ((images_dir, "path_to_images"), (masks_dir, "path_to_masks")):
        if not d.is_dir():
            raise DataError(f"{d}: {what} folder not found")
    images = sorted((p for p in images_dir.iterdir() if _is_image(p)), key=lambda p: _natural_key(p.name))
    if not images:
        raise DataError(f"{images_dir}: no images found")
    by_stem: dict[str, list[Path]] = {}
    for p in (p for p in masks_dir.iterdir() if _is_image(p)):
        m = _MASK_RE.match(p.stem)
        by_stem.setdefault(m.group("stem") if m else p.stem, []).append(p)
    stems = {p.stem for p in images}
    for stem, ps in by_stem.items():
        if stem not in stems:
            raise DataError(f"{ps[0]}: mask with no image in {images_dir}")
    samples = []
    for img in images:
        masks = sorted(by_stem.get(img.stem, []), key=lambda q: q.name)
        if not masks:
            raise DataError(f"{img}: image with no mask in {masks_dir}")
        label = label_from_name(img.name) or default_label
        if not label:
            raise DataError(f"{img}: cannot tell the class from the file name; set default_label or use a "
                            f"manifest CSV with a label column")
        samples.append(Sample(img, tuple(masks), _check_label(label, str(img)), img.name))
    return samples


def discover_manifest(csv_path: str | Path) -> list[Sample]:
    """A CSV with columns image,mask,label; paths relative to the CSV; several masks joined by ';'."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: manifest not found")
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: not a readable CSV ({e})") from None
    if not rows or not {"image", "mask", "label"} <= set(rows[0].keys()):
        raise DataError(f"{csv_path}: manifest needs a header with columns image,mask,label")
    samples = []
    for i, row in enumerate(rows, start=2):
        where = f"{csv_path} line {i}"
        if not (row["image"] or "").strip():
            raise DataError(f"{where}: empty image path")
        img = base / row["image"].strip()
        if not img.is_file():
            raise DataError(f"{where}: image {img} not found")
        masks = tuple(base / m.strip() for m in (row["mask"] or "").split(";") if m.strip())
        for m in masks:
            if not m.is_file():
                raise DataError(f"{where}: mask {m} not found")
        label = _check_label(row["label"] or "", where)
        if label != "normal" and not masks:
            raise DataError(f"{where}: a {label} image needs a mask")
        extra = tuple((k, (v or "").strip()) for k, v in row.items()
                      if k and k not in ("image", "mask", "label", "patient"))
        samples.append(Sample(img, masks, label, row["image"].strip(), (row.get("patient") or "").strip(), extra))
    return samples


def discover(data_dir: str = "", path_to_images: str = "", path_to_masks: str = "", manifest: str = "",
             default_label: str = "") -> list[Sample]:
    """Pick the layout from whichever setting is given: manifest, then the two folders, then data_dir."""
    if manifest:
        return discover_manifest(manifest)
    if path_to_images or path_to_masks:
        if not (path_to_images and path_to_masks):
            raise DataError("path_to_images and path_to_masks must be given together")
        return discover_folders(path_to_images, path_to_masks, default_label)
    if not data_dir:
        raise DataError("no data given: set data_dir, path_to_images/path_to_masks or manifest")
    return discover_busi(data_dir)


def parse_sources(spec: str) -> list[tuple[str, str]]:
    """'busi=data/BUSI;uclm=data/BUS-UCLM/manifest.csv;mine=imgs,masks' -> [(name, path), ...]."""
    out = []
    for item in (x.strip() for x in spec.split(";") if x.strip()):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise DataError(f"sources: {item!r} is not name=path (name: letters, digits, _ . -; path: a BUSI "
                            f"folder, a manifest .csv, or images_folder,masks_folder)")
        if name in (n for n, _ in out):
            raise DataError(f"sources: the name {name!r} is given twice")
        out.append((name, path))
    return out


def discover_source(name: str, path: str, default_label: str = "") -> list[Sample]:
    """One named source of a multi-source run; its keys are prefixed '<name>/' so sources never collide."""
    try:
        if "," in path:
            images, masks = (p.strip() for p in path.split(",", 1))
            found = discover_folders(images, masks, default_label)
        elif path.lower().endswith(".csv"):
            found = discover_manifest(path)
        else:
            found = discover_busi(path)
    except DataError as e:
        raise DataError(f"source {name!r}: {e}") from None
    return [Sample(s.image, s.masks, s.label, f"{name}/{s.key}", s.patient, s.attrs, name) for s in found]


def discover_all(sources: str = "", **single) -> list[Sample]:
    """The samples of a run: every named source of `sources`, or the single source of discover(**single)."""
    if not sources:
        return discover(**single)
    return [s for name, path in parse_sources(sources) for s in discover_source(name, path,
                                                                               single.get("default_label", ""))]


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------------------
# Loading into memory, duplicates
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LoadedSet:
    """Samples decoded into memory: network-size uint8 tensors plus original-size masks for evaluation."""
    samples: list[Sample]
    images: np.ndarray            # uint8 N x 1 x S x S
    targets: np.ndarray           # uint8 N x len(LESION_CLASSES) x S x S (0/1)
    full_masks: list[np.ndarray]  # bool H x W at each image's original resolution
    hashes: list[str] = field(default_factory=list)         # content hash of the decoded pixels (exact copies)
    phashes: list[tuple] = field(default_factory=list)      # perceptual hashes (near-duplicates), see image_hashes

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: list[int]) -> "LoadedSet":
        return LoadedSet([self.samples[i] for i in indices], self.images[indices], self.targets[indices],
                         [self.full_masks[i] for i in indices], [self.hashes[i] for i in indices],
                         [self.phashes[i] for i in indices] if self.phashes else [])


def load_sample(s: Sample, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, tuple]:
    """Decode one sample: (image uint8 SxS, target uint8 CxSxS, full-size bool mask, content hash,
    perceptual hashes)."""
    grey = load_image(s.image)
    mask = load_mask_union(s.masks, grey.shape)
    target = np.zeros((len(LESION_CLASSES), size, size), dtype=np.uint8)
    if s.lesion_index is not None:
        target[s.lesion_index] = resize_mask(mask, size)
    elif mask.any():
        log.warning("%s: labelled normal but its mask is not empty; the mask is ignored", s.image)
        mask = np.zeros_like(mask)
    digest = hashlib.sha256(np.ascontiguousarray(grey).tobytes() + str(grey.shape).encode()).hexdigest()
    return resize_image(grey, size), target, mask, digest, image_hashes(grey)


def load_set(samples: list[Sample], size: int = IMAGE_SIZE, progress: bool = False) -> LoadedSet:
    """Decode every sample into memory (780 BUSI images at 256x256 take about 100 MB with the masks)."""
    it = samples
    if progress:
        from tqdm import tqdm
        it = tqdm(samples, desc="loading images", unit="img", leave=False)
    imgs, tgts, fulls, hashes, phashes = [], [], [], [], []
    for s in it:
        img, tgt, full, h, ph = load_sample(s, size)
        imgs.append(img[None]); tgts.append(tgt); fulls.append(full); hashes.append(h); phashes.append(ph)
    n = len(samples)
    images = np.stack(imgs) if n else np.zeros((0, 1, size, size), np.uint8)
    targets = np.stack(tgts) if n else np.zeros((0, len(LESION_CLASSES), size, size), np.uint8)
    return LoadedSet(list(samples), images, targets, fulls, hashes, phashes)


def duplicate_groups(hashes: list[str]) -> list[list[int]]:
    """Indices of samples whose decoded pixels are identical, as groups of two or more."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def resolve_duplicates(samples: list[Sample], hashes: list[str]) -> tuple[list[int], dict]:
    """Decide what to do with copies of one picture; returns (indices to keep, report).

    Copies with the same label: the first is kept, the others dropped (they would only weight that image
    twice). Copies with different labels (BUSI's benign (433) = malignant (145)): all are dropped, since
    one picture cannot be trained towards two answers, and no copy can end up on both sides of a split.
    """
    drop: set[int] = set()
    report = {"same_label": [], "conflicting_labels": []}
    for group in duplicate_groups(hashes):
        keys = [samples[i].key for i in group]
        if len({samples[i].label for i in group}) == 1:
            drop.update(group[1:])
            report["same_label"].append({"kept": keys[0], "dropped": keys[1:]})
        else:
            drop.update(group)
            report["conflicting_labels"].append({"dropped": keys,
                                                 "labels": [samples[i].label for i in group]})
    for item in report["same_label"]:
        log.warning("duplicate images (same picture): kept %s, dropped %s", item["kept"], item["dropped"])
    for item in report["conflicting_labels"]:
        log.warning("duplicate images with conflicting labels %s: all dropped: %s", item["labels"], item["dropped"])
    return [i for i in range(len(samples)) if i not in drop], report


# ---------------------------------------------------------------------------------------------------------
# Near-duplicates (the same scan saved twice with another crop, gain or caliper marks)
# ---------------------------------------------------------------------------------------------------------

# Two images are the same scan when BOTH of two independent 64-bit perceptual hashes are close: the DCT hash
# (phash: coarse structure, robust to gain, noise, marks and small crops) and the difference hash (dhash:
# local gradients, which separates different lesions in similar-looking tissue). Thresholds chosen by looking
# at the pairs on both sides of them (python near_duplicates.py writes the contact sheets): on BUSI every
# pair up to phash 8 is the same scan; at phash 10-12 pairs with dhash <= 20 are the same scan (shifted,
# re-cropped, marked) and pairs with dhash >= 23 are mostly different lesions or a normal scan beside a
# lesion. With this rule BUSI has 8 groups whose images carry both labels, the count a published audit
# (Pawlowska et al. 2023) gives for lesions filed as benign and as malignant; at phash 14 or dhash 26
# normal/benign pairs of different scans start to merge.
NEAR_DUP_METHOD = "imagehash phash 64-bit + dhash 64-bit, Hamming distances"
NEAR_DUP_PHASH_MAX = 12   # Hamming distance of the DCT hashes at most this ...
NEAR_DUP_DHASH_MAX = 22   # ... and of the difference hashes at most this


def image_hashes(grey: np.ndarray) -> tuple[int, int]:
    """(64-bit DCT perceptual hash, 64-bit difference hash) of a uint8 greyscale image, as ints."""
    import imagehash
    img = Image.fromarray(grey)
    return (int(str(imagehash.phash(img)), 16), int(str(imagehash.dhash(img)), 16))


def hash_distances(phashes: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """N x N Hamming distances of the phashes and of the dhashes."""
    if not phashes:
        return np.zeros((0, 0), int), np.zeros((0, 0), int)
    bits = np.array([[(h >> k) & 1 for k in range(64)] for pair in phashes for h in pair], dtype=np.uint8)
    bits = bits.reshape(len(phashes), 2, 64)
    out = []
    for j in range(2):
        b = bits[:, j].astype(np.int32)
        out.append(b.sum(1)[:, None] + b.sum(1)[None, :] - 2 * (b @ b.T))
    return out[0], out[1]


def near_duplicate_pairs(phashes: list[tuple], phash_max: int = NEAR_DUP_PHASH_MAX,
                         dhash_max: int = NEAR_DUP_DHASH_MAX) -> list[tuple[int, int]]:
    """Index pairs (i < j) of images that are the same scan by the rule above."""
    dp, dd = hash_distances(phashes)
    i, j = np.nonzero(np.triu((dp <= phash_max) & (dd <= dhash_max), k=1))
    return list(zip(i.tolist(), j.tolist()))


def _components(n: int, pairs) -> list[int]:
    """Connected components of n items joined by pairs: a component id per item (union-find)."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(a) for a in range(n)]


def resolve_near_duplicates(samples: list[Sample], phashes: list[tuple]) -> tuple[list[int], dict]:
    """Group near-duplicates; groups whose images carry different labels are dropped (one scan cannot be
    trained towards two answers), as exact copies with conflicting labels are. Returns (indices to keep,
    report with the groups by key)."""
    # images of one patient are a split group anyway, and a normal frame beside a lesion frame of the same
    # sweep is no mislabelled copy: only pairs across patients (or without patient ids) are near-duplicates
    pairs = [(i, j) for i, j in near_duplicate_pairs(phashes)
             if not (samples[i].patient and (samples[i].source, samples[i].patient) ==
                     (samples[j].source, samples[j].patient))]
    comp = _components(len(samples), pairs)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(comp):
        members.setdefault(c, []).append(i)
    groups = [m for m in members.values() if len(m) > 1]
    conflicting = [g for g in groups if len({samples[i].label for i in g}) > 1]
    drop = {i for g in conflicting for i in g}
    report = {"method": NEAR_DUP_METHOD, "phash_max": NEAR_DUP_PHASH_MAX, "dhash_max": NEAR_DUP_DHASH_MAX,
              "groups": [sorted(samples[i].key for i in g) for g in groups if not set(g) & drop],
              "conflicting_labels": [{"dropped": [samples[i].key for i in g], "labels": [samples[i].label for i in g]}
                                     for g in conflicting]}
    for item in report["conflicting_labels"]:
        log.warning("near-duplicate images with conflicting labels %s: all dropped: %s", item["labels"], item["dropped"])
    log.info("near-duplicates: %d groups of the same scan (%d images), %d with conflicting labels dropped",
             len(report["groups"]), sum(len(g) for g in report["groups"]), len(conflicting))
    return [i for i in range(len(samples)) if i not in drop], report


def split_groups(samples: list[Sample], near_dup_groups: list[list[str]] = ()) -> dict[str, str]:
    """A group id per sample key: near-duplicates and images of one patient share a group (chained)."""
    index = {s.key: i for i, s in enumerate(samples)}
    pairs = [(index[g[0]], index[k]) for g in near_dup_groups for k in g[1:] if g[0] in index and k in index]
    by_patient: dict[tuple, int] = {}
    for i, s in enumerate(samples):
        if s.patient:
            first = by_patient.setdefault((s.source, s.patient), i)
            if first != i:
                pairs.append((first, i))
    comp = _components(len(samples), pairs)
    return {s.key: samples[comp[i]].key for i, s in enumerate(samples)}


# ---------------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------------

def make_split(samples: list[Sample], val_fraction: float = 0.2, seed: int = 42, folds: int = 0,
               groups: dict[str, str] | None = None) -> dict:
    """A deterministic split, stratified by class and seeded.

    folds == 0: one train/validation split with round(val_fraction * n) validation images per class.
    folds >= 2: K stratified folds (each class dealt round-robin over the folds after a seeded shuffle);
    the split dict then stores all folds and select_fold() picks the validation fold.
    groups: {key: group id} (split_groups): the images of a group always land on the same side / fold.
    """
    if groups is not None and len(set(groups.values())) < len(groups):  # some group holds two or more images
        return _grouped_split(samples, val_fraction, seed, folds, groups)
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s.key)
    split = {"version": 1, "seed": seed, "classes": {c: len(v) for c, v in sorted(by_class.items())}}
    if folds and folds >= 2:
        fold_lists: list[list[str]] = [[] for _ in range(folds)]
        offset = 0
        for label in sorted(by_class):
            keys = sorted(by_class[label])
            rng.shuffle(keys)
            for j, k in enumerate(keys):
                fold_lists[(j + offset) % folds].append(k)
            offset += len(keys)  # so the smaller folds are not always the first ones
        split.update(folds=[sorted(f) for f in fold_lists])
        return split
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train, val = [], []
    for label in sorted(by_class):
        keys = sorted(by_class[label])
        rng.shuffle(keys)
        n_val = max(1, round(val_fraction * len(keys))) if len(keys) > 1 else 0
        val += keys[:n_val]
        train += keys[n_val:]
    split.update(val_fraction=val_fraction, train=sorted(train), val=sorted(val))
    return split


def _grouped_split(samples: list[Sample], val_fraction: float, seed: int, folds: int,
                   groups: dict[str, str]) -> dict:
    """make_split with groups: whole groups are dealt, largest first (seeded order among equal sizes), each to
    the part (validation or training; or the fold) that is furthest below its share of the group's classes,
    relative to that share, so every class keeps close to its share in every part, groups of near-duplicates
    are spread over all parts like single images, and no group straddles two parts."""
    if not folds and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    rng = random.Random(seed)
    members: dict[str, list[Sample]] = {}
    for s in samples:
        members.setdefault(groups.get(s.key, s.key), []).append(s)
    order = sorted(members)
    rng.shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: the seeded order stays among equal sizes
    totals = {c: sum(s.label == c for s in samples) for c in CLASS_NAMES}
    shares = [1.0 / folds] * folds if folds and folds >= 2 else [val_fraction, 1.0 - val_fraction]
    counts = [{c: 0 for c in CLASS_NAMES} for _ in shares]
    parts: list[list[str]] = [[] for _ in shares]
    for g in order:
        need = {c: sum(s.label == c for s in members[g]) for c in CLASS_NAMES}
        # how far each part is below its share of these classes, relative to that share (so a small
        # validation part and a large training part fill at the same pace)
        deficit = [sum(n * (share * totals[c] - counts[p][c]) / max(1e-9, share * totals[c])
                       for c, n in need.items()) for p, share in enumerate(shares)]
        p = max(range(len(shares)), key=lambda k: (deficit[k], -k))
        parts[p] += [s.key for s in members[g]]
        for c, n in need.items():
            counts[p][c] += n
    split = {"version": 2, "seed": seed, "classes": {c: n for c, n in sorted(totals.items()) if n},
             "grouped": {"groups": sorted(sorted(s.key for s in m) for m in members.values() if len(m) > 1)}}
    if folds and folds >= 2:
        split.update(folds=[sorted(f) for f in parts])
    else:
        split.update(val_fraction=val_fraction, val=sorted(parts[0]), train=sorted(parts[1]))
    return split


def _move_to_val(split: dict, samples: list[Sample], groups: dict[str, str], names: frozenset[str]) -> None:
    """Move every training image named in names (a file name), and the rest of its group, to validation."""
    moving = {groups.get(s.key, s.key) for s in samples if Path(s.key).name in names}
    moved = {s.key for s in samples if groups.get(s.key, s.key) in moving} & set(split["train"])
    split["train"] = sorted(set(split["train"]) - moved)
    split["val"] = sorted(set(split["val"]) | moved)
    split["val_always"] = sorted(names)
    if moved:
        log.info("moved %d image(s) to validation (val_always): %s", len(moved), sorted(moved)[:6])


def select_fold(split: dict, fold: int) -> tuple[list[str], list[str]]:
    """(train keys, validation keys) of a split: the stored pair, or fold `fold` of a K-fold split."""
    if "folds" in split:
        k = len(split["folds"])
        if not 0 <= fold < k:
            raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
        val = split["folds"][fold]
        train = [key for i, f in enumerate(split["folds"]) if i != fold for key in f]
        return sorted(train), sorted(val)
    return split["train"], split["val"]


def save_json_atomic(path: str | Path, obj) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None  # say which file could not be written
        raise


def read_split(path: str | Path, hint: str = "") -> dict:
    """A split file's content; a file that is not JSON is a DataError naming it (hint: what to do about it)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: split file is not valid JSON ({e}){hint}") from None


def load_or_make_split(path: str | Path, samples: list[Sample], val_fraction: float = 0.2, seed: int = 42,
                       folds: int = 0, report: dict | None = None, groups: dict[str, str] | None = None,
                       val_always: frozenset[str] = frozenset()) -> dict:
    """Reuse the split file when it exists (so every run sees the same validation images), else write one.
    val_always: file names that a new train/validation split puts in validation, with their whole group
    (e.g. the committed sample scans, so the model's predictions of them show images it never trained on)."""
    path = Path(path)
    keys = {s.key for s in samples}
    if path.exists():
        split = read_split(path, "; delete it to make a new split")
        if folds and "folds" not in split:
            raise DataError(f"{path}: holds a train/val split but folds={folds} was asked; use another split_file")
        if folds and len(split["folds"]) != folds:
            raise DataError(f"{path}: holds {len(split['folds'])} folds but folds={folds} was asked")
        listed = set(split["folds"][0]).union(*split["folds"]) if "folds" in split else \
            set(split["train"]) | set(split["val"])
        gone = sorted(listed - keys)
        if gone:
            raise DataError(f"{path}: the split names {len(gone)} image(s) not in the data, e.g. {gone[:3]}; "
                            f"delete the split file to make a new one")
        new = sorted(keys - listed)
        if new:
            log.warning("%d image(s) are not in the stored split %s and are not used (e.g. %s)",
                        len(new), path, new[:3])
        log.info("reusing split %s", path)
        return split
    names = sorted({s.source for s in samples})
    if len(names) > 1:  # per source, each stratified by class (and grouped), then merged
        parts = {n: make_split([s for s in samples if s.source == n], val_fraction, seed, folds, groups)
                 for n in names}
        split = {"version": 2, "seed": seed, "sources": {n: p["classes"] for n, p in parts.items()},
                 "classes": {c: sum(p["classes"].get(c, 0) for p in parts.values()) for c in CLASS_NAMES}}
        if folds and folds >= 2:
            split["folds"] = [sorted(k for p in parts.values() for k in p["folds"][i]) for i in range(folds)]
        else:
            split.update(val_fraction=val_fraction, train=sorted(k for p in parts.values() for k in p["train"]),
                         val=sorted(k for p in parts.values() for k in p["val"]))
        if groups is not None:
            split["grouped"] = {"groups": sorted(g for p in parts.values() for g in p.get("grouped", {}).get("groups", []))}
    else:
        split = make_split(samples, val_fraction, seed, folds, groups)
    if val_always and "train" in split:
        _move_to_val(split, samples, groups or {}, val_always)
    if report:
        split["duplicates"] = {k: v for k, v in report.items() if k != "near_duplicates"}
        if "near_duplicates" in report:
            split.setdefault("grouped", {})["near_duplicates"] = report["near_duplicates"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json_atomic(path, split)
    log.info("wrote split %s", path)
    return split
