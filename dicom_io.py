"""Ultrasound DICOM files: the pixels as uint8 grey frames and, from the header, the geometry and nothing else.

    geometry, frames = read_frames("scan.dcm", frame=-1, max_pixels=50_000_000)   # every frame, one at a time
    grey = read_frame("scan.dcm", 0, max_pixels=50_000_000)                       # dataset.load_image uses this

Read from the header: Rows, Columns, Number of Frames and the pixel-module attributes needed to decode the
pixels (Photometric Interpretation, Bits Stored, Pixel Representation, the palette of PALETTE COLOR), Pixel
Spacing, and of the Sequence of Ultrasound Regions each region's location, Physical Delta X/Y, Physical Units
X/Y Direction, Region Spatial Format and Region Data Type. Nothing else (no names, IDs, dates, institution)
leaves this module: Geometry.to_json() is all that outputs carry.

Pixel size in mm (rows, columns), looked up per lesion with Geometry.pixel_size_at(row, col):
  1. the ultrasound region (DICOM PS3.3 C.8.5.5) that contains the point, when its Physical Units X and Y
     Direction are 3 (cm): Physical Delta X/Y x 10 (regions in other units, e.g. a Doppler spectrum in s and
     cm/s, give no size);
  2. else Pixel Spacing (0028,0030): row spacing, column spacing in mm;
  3. else the pixel_mm setting of predict.py / evaluate.py (pixel_mm_lookup), else unknown (None): sizes are then
     given in pixels only, never as a guessed millimetre value.

Pixels: MONOCHROME2; MONOCHROME1 (inverted, so tissue stays bright); RGB, YBR_FULL, YBR_FULL_422 and the other
YBR forms (converted to RGB by pydicom); PALETTE COLOR (through its lookup table). Colour becomes grey with
PIL's ITU-R 601-2 luma, exactly as PNG/JPEG inputs in dataset.py (equal channels keep their values). More than 8
stored bits are scaled from their range (Bits Stored, signed or not) to 0..255. Multi-frame files: each frame or a
chosen one, decoded one at a time.

Compressed transfer syntaxes are decoded by pydicom's pixel-data plugins: RLE Lossless by pydicom itself
(numpy); JPEG Baseline/Extended and JPEG 2000 by Pillow; JPEG Lossless, JPEG-LS and JPEG 2000/HTJ2K by
pylibjpeg with pylibjpeg-libjpeg and pylibjpeg-openjpeg (requirements.txt). installed_handlers() lists them.

Every problem (not DICOM, truncated, no pixel data, a compression no installed plugin decodes, a region that
lies outside the image) is a DicomError naming the file; dataset.py turns it into its DataError.
This module imports no other module of the project, and pydicom only when a DICOM file is read.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")
CM_UNITS = 3               # Physical Units X/Y Direction: 3 = cm (PS3.3 C.8.5.5.1.15)
SPATIAL_2D = 1             # Region Spatial Format: 1 = 2D (tissue or flow image)
MAX_PIXEL_MM = 10.0        # a pixel larger than 1 cm is a mistake in a setting, not an ultrasound image


class DicomError(ValueError):
    """A problem with a DICOM file (or a pixel-size setting); the message names the file."""


@dataclass(frozen=True)
class PixelSize:
    """Physical size of one pixel: rows (vertical) and columns (horizontal) in mm, and where it came from."""
    row_mm: float
    col_mm: float
    source: str   # "dicom ultrasound region N", "dicom PixelSpacing", "pixel_mm setting", "pixel_mm csv"

    def to_json(self) -> dict:
        return {"row_mm": self.row_mm, "col_mm": self.col_mm, "source": self.source}


@dataclass(frozen=True)
class Region:
    """One item of the Sequence of Ultrasound Regions: its box (inclusive pixel bounds) and pixel size."""
    index: int                 # 1-based position in the sequence
    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int        # 1: 2D image, 2: M-mode, 3: spectral, 4: waveform, ...
    pixel_size: PixelSize | None  # None when the physical units are not cm

    def contains(self, row: float, col: float) -> bool:
        return self.y0 <= row <= self.y1 and self.x0 <= col <= self.x1

    def to_json(self) -> dict:
        return {"index": self.index, "box_x0_y0_x1_y1": [self.x0, self.y0, self.x1, self.y1],
                "spatial_format": self.spatial_format,
                "pixel_size": self.pixel_size.to_json() if self.pixel_size else None}


@dataclass(frozen=True)
class Geometry:
    """What outputs may carry from an image's header: its size, frames, ultrasound regions and pixel size."""
    rows: int
    cols: int
    n_frames: int = 1
    regions: tuple[Region, ...] = ()
    pixel_spacing: PixelSize | None = None  # PixelSpacing, or a setting for files without one

    def pixel_size_at(self, row: float, col: float) -> PixelSize | None:
        """The pixel size at a point: the first region with a size that contains it, else pixel_spacing."""
        for r in self.regions:
            if r.pixel_size is not None and r.contains(row, col):
                return r.pixel_size
        return self.pixel_spacing

    def with_fallback(self, size: PixelSize | None) -> Geometry:
        """This geometry with `size` used where the header gives none (no PixelSpacing)."""
        if size is None or self.pixel_spacing is not None:
            return self
        return Geometry(self.rows, self.cols, self.n_frames, self.regions, size)

    def tissue_box(self) -> tuple[int, int, int, int] | None:
        """(row0, row1, col0, col1), end exclusive: the smallest box holding every 2D region (the ultrasound
        image without the scanner's UI around it), or None when there is no 2D region."""
        boxes = [r for r in self.regions if r.spatial_format == SPATIAL_2D]
        if not boxes:
            return None
        return (min(r.y0 for r in boxes), max(r.y1 for r in boxes) + 1,
                min(r.x0 for r in boxes), max(r.x1 for r in boxes) + 1)

    def to_json(self) -> dict:
        return {"rows": self.rows, "columns": self.cols, "frames": self.n_frames,
                "ultrasound_regions": [r.to_json() for r in self.regions],
                "pixel_spacing": self.pixel_spacing.to_json() if self.pixel_spacing else None}


# ---------------------------------------------------------------------------------------------------------
# Recognising and reading
# ---------------------------------------------------------------------------------------------------------

def has_dicom_magic(path: str | Path) -> bool:
    """True when the file has the DICOM preamble: 128 bytes, then 'DICM' (files without a known extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom(path: str | Path) -> bool:
    """A .dcm/.dicom file (read even without a preamble), or any file with the DICOM preamble."""
    p = Path(path)
    return p.suffix.lower() in DICOM_SUFFIXES or (p.is_file() and has_dicom_magic(p))


def _read_dataset(path: Path):
    """The whole data set (pixel data included), or a DicomError naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    if not path.is_file():
        raise DicomError(f"{path}: file not found")
    try:
        ds = pydicom.dcmread(path, force=True)
    except InvalidDicomError as e:
        raise DicomError(f"{path}: not a DICOM file ({e})") from None
    except Exception as e:  # noqa: BLE001 - EOFError, struct.error, ... from a cut-off file
        raise DicomError(f"{path}: cannot read DICOM ({type(e).__name__}: {e}); the file may be truncated or "
                         f"corrupt") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(f"{path}: the DICOM file holds no pixel data (not an image, e.g. a report; or a file "
                         f"cut short before its pixels)")
    for key in ("Rows", "Columns", "PhotometricInterpretation", "BitsAllocated", "SamplesPerPixel"):
        if ds.get(key) in (None, ""):
            raise DicomError(f"{path}: the DICOM header lacks {key}, which the pixels need")
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set without file meta: its encoding as read
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ("1.2.840.10008.1.2" if implicit else
                                          "1.2.840.10008.1.2.1" if little is not False else "1.2.840.10008.1.2.2")
    return ds


def _number(ds, key: str, path: Path, default=None):
    try:
        v = ds.get(key, default)
        return default if v in (None, "") else float(v)
    except (TypeError, ValueError):
        raise DicomError(f"{path}: the DICOM attribute {key} is not a number ({ds.get(key)!r})") from None


def _region(item, index: int, rows: int, cols: int, path: Path) -> Region:
    """One ultrasound region, checked against the image size."""
    box = [_number(item, k, path) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                            "RegionLocationMaxX1", "RegionLocationMaxY1")]
    if any(v is None for v in box):
        raise DicomError(f"{path}: ultrasound region {index} has no complete location (RegionLocationMin/Max)")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 <= x1 < cols and 0 <= y0 <= y1 < rows):
        raise DicomError(f"{path}: ultrasound region {index} ({x0},{y0})-({x1},{y1}) does not lie inside the "
                         f"{cols}x{rows} image: the region sequence contradicts the image size")
    size = None
    units = (_number(item, "PhysicalUnitsXDirection", path), _number(item, "PhysicalUnitsYDirection", path))
    if units == (CM_UNITS, CM_UNITS):
        dx, dy = _number(item, "PhysicalDeltaX", path), _number(item, "PhysicalDeltaY", path)
        if dx is None or dy is None or not (0 < abs(dx) * 10 < MAX_PIXEL_MM and 0 < abs(dy) * 10 < MAX_PIXEL_MM):
            raise DicomError(f"{path}: ultrasound region {index} has cm units but physical deltas "
                             f"{dx!r}, {dy!r} cm, not a pixel size")
        size = PixelSize(abs(dy) * 10.0, abs(dx) * 10.0, f"dicom ultrasound region {index}")
    fmt = _number(item, "RegionSpatialFormat", path, 0)
    return Region(index, x0, y0, x1, y1, int(fmt), size)


def geometry_of(ds, path: Path) -> Geometry:
    """Rows, columns, frames, ultrasound regions and PixelSpacing of a data set, checked."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(_number(ds, "NumberOfFrames", path, 1) or 1)
    regions = tuple(_region(item, i, rows, cols, path)
                    for i, item in enumerate(ds.get("SequenceOfUltrasoundRegions", []) or [], start=1))
    spacing = None
    if ds.get("PixelSpacing"):
        try:
            dy, dx = (float(v) for v in ds.PixelSpacing)
        except (TypeError, ValueError):
            raise DicomError(f"{path}: PixelSpacing {ds.PixelSpacing!r} is not two numbers") from None
        if not (0 < dy < MAX_PIXEL_MM and 0 < dx < MAX_PIXEL_MM):
            raise DicomError(f"{path}: PixelSpacing {dy}, {dx} mm is not a pixel size")
        spacing = PixelSize(dy, dx, "dicom PixelSpacing")
    return Geometry(rows, cols, frames, regions, spacing)


def installed_handlers() -> dict[str, list[str]]:
    """{transfer syntax name: the installed pydicom plugins that decode it} for the compressed syntaxes."""
    from pydicom import uid
    from pydicom.pixels.decoders.base import get_decoder
    out = {}
    for u in (uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
              uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
              uid.HTJ2KLossless, uid.HTJ2K):
        out[u.name] = list(get_decoder(u).available_plugins)
    return out


# ---------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------

def _scale_to_uint8(a: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Stored values of `bits` bits -> uint8, by the range of the stored type."""
    if a.dtype == np.uint8 and bits <= 8 and not signed:
        return a
    lo = -(2 ** (bits - 1)) if signed else 0
    top = 2 ** bits - 1
    return np.clip(np.round((a.astype(np.float64) - lo) / top * 255.0), 0, 255).astype(np.uint8)


def to_grey(frame: np.ndarray, ds) -> np.ndarray:
    """One decoded frame (rows x cols, or rows x cols x 3 as RGB) -> uint8 grey rows x cols."""
    from PIL import Image
    pi = str(ds.PhotometricInterpretation).strip().upper()
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        frame = apply_color_lut(frame, ds)
        bits = 16 if frame.dtype.itemsize > 1 else 8
        signed = False
    else:
        bits, signed = int(ds.get("BitsStored", ds.BitsAllocated)), int(ds.get("PixelRepresentation", 0)) == 1
    grey = _scale_to_uint8(np.asarray(frame), bits, signed)
    if grey.ndim == 3:
        grey = np.asarray(Image.fromarray(np.ascontiguousarray(grey[..., :3])).convert("L"), dtype=np.uint8)
    if pi == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1: the lowest value is white
    return grey


def _decode_error(path: Path, ds, e: Exception) -> DicomError:
    ts = ds.file_meta.TransferSyntaxUID
    name = getattr(ts, "name", str(ts))
    if isinstance(e, NotImplementedError) or "plugin" in str(e).lower():
        return DicomError(f"{path}: pixel data encoded as {name}, which no installed pixel-data handler decodes "
                          f"(installed: pydicom, Pillow, pylibjpeg with libjpeg and openjpeg; see requirements.txt)")
    return DicomError(f"{path}: cannot decode the pixel data ({name}; {type(e).__name__}: {e}); the file may be "
                      f"truncated or corrupt")


def _frames(ds, path: Path, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    from pydicom.pixels import iter_pixels
    try:
        for i, arr in zip(indices, iter_pixels(ds, indices=indices, as_rgb=True)):
            yield i, to_grey(arr, ds)
    except DicomError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, never a traceback from a plugin
        raise _decode_error(path, ds, e) from None


def read_frames(path: str | Path, frame: int = -1, *,
                max_pixels: int) -> tuple[Geometry, Iterator[tuple[int, np.ndarray]]]:
    """(geometry, iterator of (frame index, uint8 grey frame)). frame -1: every frame; else that one (0-based).
    The header is checked at once; frames are decoded one at a time as the iterator is consumed."""
    path = Path(path)
    ds = _read_dataset(path)
    geometry = geometry_of(ds, path)
    if geometry.rows * geometry.cols > max_pixels:
        raise DicomError(f"{path}: frames of {geometry.cols}x{geometry.rows} pixels exceed the limit of "
                         f"{max_pixels} pixels (dataset.MAX_IMAGE_PIXELS)")
    if frame >= geometry.n_frames:
        raise DicomError(f"{path}: frame {frame} asked, the file has {geometry.n_frames} frame(s) (0-based)")
    indices = list(range(geometry.n_frames)) if frame < 0 else [frame]
    return geometry, _frames(ds, path, indices)


def read_frame(path: str | Path, frame: int = 0, *, max_pixels: int) -> np.ndarray:
    """One frame (default the first) as uint8 grey."""
    _, frames = read_frames(path, frame, max_pixels=max_pixels)
    return next(frames)[1]


def crop(grey: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """The part of a frame inside box (row0, row1, col0, col1); the whole frame when box is None."""
    return grey if box is None else grey[box[0]:box[1], box[2]:box[3]]


def uncrop(part: np.ndarray, box: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> np.ndarray:
    """A mask (or masks ... x h x w) of the cropped part placed back into a frame of `shape`, zero outside."""
    if box is None:
        return part
    full = np.zeros((*part.shape[:-2], *shape), dtype=part.dtype)
    full[..., box[0]:box[1], box[2]:box[3]] = part
    return full


# ---------------------------------------------------------------------------------------------------------
# The pixel_mm setting (PNG/JPEG, or DICOM without a size in its header)
# ---------------------------------------------------------------------------------------------------------

def pixel_mm_value(value: str, where: str) -> float:
    """A pixel size in mm from text, checked (0 < mm < MAX_PIXEL_MM); DicomError naming `where` otherwise."""
    try:
        v = float(value)
    except ValueError:
        raise DicomError(f"{where}: pixel size {value!r} is not a number (mm per pixel)") from None
    if not 0 < v < MAX_PIXEL_MM:
        raise DicomError(f"{where}: pixel size {v} mm is not between 0 and {MAX_PIXEL_MM} mm")
    return v


def _read_size_csv(csv_path: Path) -> dict[str, float]:
    """{file as written, its resolved path and its name: mm}; a header line (file,mm) is optional."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DicomError(f"{csv_path}: cannot read the pixel_mm CSV ({e})") from None
    if rows and rows[0][-1].strip().lower() in ("mm", "pixel_mm", "mm_per_pixel"):
        rows = rows[1:]
    sizes: dict[str, float] = {}
    for i, r in enumerate(rows, start=1):
        if len(r) < 2:
            raise DicomError(f"{csv_path} row {i}: expected file,mm")
        name, mm = r[0].strip(), pixel_mm_value(r[1].strip(), f"{csv_path} row {i}")
        for key in (name, str((csv_path.parent / name).resolve()), Path(name).name):
            sizes.setdefault(key, mm)
    return sizes


def pixel_mm_lookup(spec: str) -> Callable[[Path], PixelSize | None]:
    """The pixel_mm setting as a function of the input file: '' -> always None; '0.08' -> 0.08 mm square pixels
    for every file; 'sizes.csv' -> per file (rows file,mm; a file is matched by its path as given, its resolved
    path, or its name; files not listed: None)."""
    spec = (spec or "").strip()
    if not spec:
        return lambda _path: None
    if not Path(spec).is_file():
        mm = pixel_mm_value(spec, "pixel_mm")
        return lambda _path: PixelSize(mm, mm, "pixel_mm setting")
    sizes = _read_size_csv(Path(spec))

    def lookup(path: Path) -> PixelSize | None:
        for key in (str(path), str(Path(path).resolve()), Path(path).name):
            if key in sizes:
                return PixelSize(sizes[key], sizes[key], "pixel_mm csv")
        return None
    return lookup
