"""Segment breast ultrasound images with a trained checkpoint, and read out size, shape cues and uncertainty.

    python predict.py "scan 1.png"                       # one file
    python predict.py scans/ --tta                         # a folder (mask files *_mask*.png are skipped)
    python predict.py --path_to_image 'scans/*.png' --checkpoint runs/resnet18/best.safetensors
    python predict.py exam.dcm --uncertainty --dicom_crop  # DICOM: sizes in mm from its header
    python predict.py scans/ --pixel_mm 0.08               # PNG/JPEG with a known pixel size (or a CSV file,mm)
    python predict.py "scan 1.png" --box 120,80,260,190    # the mask from LiteMedSAM for this box (box_prompt.py)
    python predict.py exam/ --dicom_out                    # DICOM: also a DICOM SEG and SR per frame (dicom_out.py)

Inputs: PNG, JPEG, BMP, TIFF and DICOM (.dcm, and files without an extension that start like DICOM); each
frame of a multi-frame DICOM is an image of its own (or only `frame`). For each image it writes, into out_dir:
<name>_mask.png (binary lesion mask at the original resolution), <name>_overlay.png (lesion outline over the
image, label and confidence, the two diameters of each lesion and its size: in mm when the pixel size is known,
in pixels otherwise), <name>_lesions.json (every lesion's measurements and shape cues, measure.py), with
--uncertainty <name>_uncertainty.png (the per-pixel map, uncertainty.py), and one row of predictions.csv (file,
label, confidence, malignancy probability P(malignant | lesion), the head's probability that the image is normal
(models with a classification head), lesion area in pixels and as a fraction, mean lesion probability, the
number of lesions and the measurements of the largest, the pixel size and its source, the uncertainty score and
the review flag). The shape cues are descriptors computed from a predicted mask, not a diagnosis and not a
BI-RADS category; every output says so. With --dicom_out, each frame of a DICOM input also gets <name>_seg.dcm (a
DICOM Segmentation of its lesions) and <name>_sr.dcm (a TID 1500 measurement report), new instances of the
source's patient and study (dicom_out.py); the other outputs still carry nothing of the header but its geometry.
Images are read upright as their EXIF orientation says. An image whose longest side is over dataset.WORK_SIDE
(2048) pixels is segmented, measured and drawn at that working resolution (the overlay and uncertainty pictures
have that size); the mask is drawn back at full size and every size and point is in full-size pixels, so the
memory an image needs stays bounded (README: peak memory per megapixel).
Threshold, minimum lesion area, the head's normal gate and the uncertainty cut-off come from the checkpoint.
Image size, normalization, classes and threshold come from the checkpoint, never from flags that could
disagree with training. A bad file is reported and skipped; the others are still written; the exit code
is then 1.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import glob
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from backends import pick_device, predict_logits, split_output  # noqa: F401 - predict.py's public names
from dataset import (CLASS_NAMES, IMAGE_EXTENSIONS, LESION_CLASSES, MAX_IMAGE_PIXELS, DataError, _MASK_RE, full_area,
                     load_working_image, resize_image, save_json_atomic, shrink, to_full, working_size)
from dicom_io import DicomError, Geometry, has_dicom_magic, is_dicom, pixel_mm_lookup

log = logging.getLogger("predict")

# ---- settings (edit here, or override on the command line: --threshold 0.4)
path_to_image = "samples"                                   # image file, folder or glob; several joined by ";" (default: six BUSI validation scans)
checkpoint = "checkpoints/all_unet_efficientnet_lite0.safetensors"   # trained model (.safetensors) to use
out_dir = "sample_predictions"                              # where masks, overlays and predictions.csv go
threshold = -1.0                                            # lesion probability threshold; < 0 uses the checkpoint's
tta = False                                                 # also predict the mirrored image and average
device = "auto"                                             # auto (cuda, then mps, then cpu), cpu, cuda, mps
batch_size = 8                                              # images per forward pass
backend = "torch"                                           # torch; onnx (ONNX Runtime on the CPU; <checkpoint>.onnx is exported beside it if missing or stale); onnx-int8 (INT8 model, quantize.py; <checkpoint>.int8.onnx is built beside it, calibrated on the checkpoint's training images)
pixel_mm = ""                                               # pixel size where the file gives none (PNG/JPEG; DICOM without one): mm per pixel, or a CSV file,mm; empty: unknown (sizes in pixels)
frame = -1                                                  # multi-frame DICOM: -1 each frame, else only this frame (0-based)
dicom_crop = False                                          # DICOM: segment only inside its ultrasound regions (scanner UI left out); the mask is put back into the full frame
uncertainty = False                                         # test-time-augmentation uncertainty: per-pixel map (<name>_uncertainty.png), score per image, review flag
uncertainty_cutoff = -1.0                                   # review when the uncertainty score is above this; < 0 uses the checkpoint's (none stored: no flag)
box = ""                                                    # x0,y0,x1,y1 in pixels: the mask is LiteMedSAM's for this box (box_prompt.py), not the network's; label and malignancy stay the network's
dicom_out = False                                           # DICOM inputs: also a DICOM Segmentation (<name>_seg.dcm) and measurement report SR (<name>_sr.dcm) per frame for OHIF, 3D Slicer or a PACS (dicom_out.py); they carry the source's patient and study identification
# ---- end of settings

OUTLINE_COLOURS = {"benign": (60, 220, 60), "malignant": (240, 50, 50)}


def to_original(probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """C x S x S probabilities -> C x H x W at the image's original resolution (bilinear)."""
    return F.interpolate(probs[None].float(), size=tuple(shape), mode="bilinear", align_corners=False)[0]


@dataclass
class Decision:
    lesion: np.ndarray       # bool H x W: union of the lesion channels above the threshold (small parts removed)
    class_masks: np.ndarray  # bool C x H x W: each lesion pixel assigned to its most probable class
    label: str               # normal / benign / malignant
    confidence: float        # probability of the chosen label (see decide)
    mean_lesion_prob: float  # mean of max-channel probability inside the lesion (0 if none)
    malignancy: float = float("nan")  # P(malignant | lesion): from the head when there is one, else from the channels
    p_normal: float = float("nan")    # the head's probability that the image is normal (NaN without a head)
    gated: bool = False               # the normal gate erased a mask that the threshold and min_area had kept
    gate_conflict: bool = False       # the head said normal (P(normal) >= gate) but the mask was confident: kept, review it


def remove_small(lesion: torch.Tensor, min_area: float) -> torch.Tensor:
    """Drop connected lesion components (8-connectivity) smaller than min_area pixels."""
    if min_area <= 0 or not bool(lesion.any()):
        return lesion
    from skimage.measure import label
    mask = lesion.numpy()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # labelling only the lesion's bounding box
    components = label(mask[box], connectivity=2)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_area
    keep[0] = False  # background
    out = np.zeros_like(mask)
    out[box] = keep[components]
    return torch.from_numpy(out)


GATE_KEEP = 0.8  # the normal gate never erases a mask whose mean lesion probability is at least this


def decide(probs: torch.Tensor, threshold: float, min_area: float = 0.0, cls_probs: torch.Tensor | None = None,
           normal_gate: float = 1.0, gate_keep: float = 1.0) -> Decision:
    """Turn per-class probabilities C x H x W into a mask and an image label.

    min_area: lesion components smaller than this many pixels (at this resolution) are removed.
    Without a head (cls_probs None): the label is normal when no pixel survives, otherwise the lesion class
    whose channel holds the most probability inside the lesion; malignancy = the malignant share of that
    probability.
    With a head (cls_probs: probabilities of CLASS_NAMES): the mask is cleared when the head's P(normal) is
    at least normal_gate, unless the mask is confident (mean lesion probability >= gate_keep): then it is kept
    and gate_conflict raised (a lesion the head calls normal is a case for review, not for erasing). An image
    with a lesion left is labelled benign or malignant by the head's P(malignant) / (P(benign) + P(malignant))
    against 0.5, and normal otherwise.
    """
    p = probs.float()
    if p.shape[0] == 1 and cls_probs is None:
        raise ValueError("a model with one (class-agnostic) lesion channel needs its classification head for the label")
    top, arg = p.max(0)
    head = None
    if cls_probs is not None:
        head = {c: float(v) for c, v in zip(CLASS_NAMES, cls_probs.float().tolist())}
        lesion_mass = head["benign"] + head["malignant"]
        malignancy = head["malignant"] / lesion_mass if lesion_mass > 0 else 0.5
    lesion, gated, conflict = _gated_lesion(top, threshold, min_area, None if head is None else head["normal"],
                                            normal_gate, gate_keep)
    if p.shape[0] == 1:  # one lesion channel: the lesion goes into the channel of the head's label (below)
        class_masks = torch.zeros((len(LESION_CLASSES), *lesion.shape), dtype=torch.bool)
    else:
        class_masks = torch.stack([lesion & (arg == c) for c in range(p.shape[0])])
    if not lesion.any():
        if head is not None:
            return Decision(lesion.numpy(), class_masks.numpy(), "normal", head["normal"], 0.0, malignancy,
                            head["normal"], gated)
        return Decision(lesion.numpy(), class_masks.numpy(), "normal", float(1 - top.max()), 0.0)
    mass = (p * lesion).sum(dim=(1, 2))
    n = lesion.sum()
    mean_prob = float(top[lesion].mean())
    if head is not None:
        label = "malignant" if malignancy >= 0.5 else "benign"
        if p.shape[0] == 1:  # one lesion channel: the lesion goes to the class the head names
            class_masks = torch.stack([lesion & (c == label) for c in LESION_CLASSES])
        return Decision(lesion.numpy(), class_masks.numpy(), label, head[label], mean_prob, malignancy,
                        head["normal"], gated, conflict)
    c = int(mass.argmax())
    mal = LESION_CLASSES.index("malignant")
    return Decision(lesion.numpy(), class_masks.numpy(), LESION_CLASSES[c], float(mass[c] / n), mean_prob,
                    float(mass[mal] / mass.sum()) if float(mass.sum()) > 0 else 0.5)


def _gated_lesion(top: torch.Tensor, threshold: float, min_area: float, p_normal: float | None, normal_gate: float,
                  gate_keep: float) -> tuple[torch.Tensor, bool, bool]:
    """decide's lesion from the largest lesion probability per pixel: (bool H x W, gated, gate_conflict)."""
    lesion = remove_small(top > threshold, min_area)
    if p_normal is None or p_normal < normal_gate or not bool(lesion.any()):
        return lesion, False, False
    if float(top[lesion].mean()) >= gate_keep:
        return lesion, False, True
    return torch.zeros_like(lesion), True, False


def lesion_mask(probs: torch.Tensor, threshold: float, min_area: float = 0.0, cls_probs: torch.Tensor | None = None,
                normal_gate: float = 1.0, gate_keep: float = 1.0) -> np.ndarray:
    """decide(...).lesion alone (bool H x W), without the work of the label and the class masks (the
    uncertainty's views need only the mask)."""
    p_normal = None if cls_probs is None else float(cls_probs.float()[CLASS_NAMES.index("normal")])
    return _gated_lesion(probs.float().amax(0), threshold, min_area, p_normal, normal_gate, gate_keep)[0].numpy()


def _at_work(probs: torch.Tensor, shape: tuple[int, int], min_area: float) -> tuple[torch.Tensor, float]:
    """Network-size probabilities at the working resolution of an image of this shape, and a minimum area in its
    pixels at that resolution."""
    work = working_size(shape)
    return to_original(probs, work), min_area * (work[0] * work[1]) / (shape[0] * shape[1])


def decide_full(probs: torch.Tensor, shape: tuple[int, int], threshold: float, min_area: float = 0.0,
                cls_probs: torch.Tensor | None = None, normal_gate: float = 1.0, gate_keep: float = 1.0) -> Decision:
    """decide() for an image of this shape (min_area: its pixels) at its working resolution (dataset.working_size),
    the masks drawn back at full size: no probability map larger than dataset.WORK_SIDE a side is made."""
    p, area = _at_work(probs, shape, min_area)
    d = decide(p, threshold, area, cls_probs, normal_gate, gate_keep)
    return replace(d, lesion=to_full(d.lesion, shape), class_masks=to_full(d.class_masks, shape))


def lesion_full(probs: torch.Tensor, shape: tuple[int, int], threshold: float, min_area: float = 0.0,
                cls_probs: torch.Tensor | None = None, normal_gate: float = 1.0, gate_keep: float = 1.0) -> np.ndarray:
    """decide_full(...).lesion alone (lesion_mask at the working resolution)."""
    p, area = _at_work(probs, shape, min_area)
    return to_full(lesion_mask(p, threshold, area, cls_probs, normal_gate, gate_keep), shape)


def scale_min_area(min_area: float, image_size: int, shape: tuple[int, int]) -> float:
    """A minimum lesion-component area in pixels of the network input (image_size x image_size), in pixels of an
    image of this shape."""
    return float(min_area or 0) * shape[0] * shape[1] / (image_size * image_size)


def min_area_at(meta: dict, shape: tuple[int, int]) -> float:
    """The checkpoint's minimum lesion-component area in pixels of an image of this shape."""
    return scale_min_area(meta.get("min_area", 0), int(meta["image_size"]), shape)


DIAMETER_COLOURS = ((255, 220, 0), (0, 200, 255))  # longest diameter, the one perpendicular to it
SHORT_NOTE = "shape cues from the predicted mask: not a diagnosis, not a BI-RADS category"
UMAP_FULL = 0.25  # uncertainty picture: a standard deviation of the lesion probability shown in full colour


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[tuple[str, tuple, int]]) -> None:
    """(text, colour, font size) lines on a black box, from the corner xy downwards."""
    x, y = xy
    for text, colour, size in lines:
        font = _font(size)
        box = draw.textbbox((x + 4, y + 3), text, font=font)
        draw.rectangle([x, y, box[2] + 4, box[3] + 3], fill=(0, 0, 0))
        draw.text((x + 4, y + 3), text, fill=colour, font=font)
        y = box[3] + 3


def _draw_diameters(draw: ImageDraw.ImageDraw, lesions: list[dict], width: int, size: int,
                    scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """Each lesion's two diameters as caliper lines with end marks, and its number beside the first end; scale:
    the picture's pixels per pixel of the lesions' coordinates (rows, cols)."""
    for lesion in lesions:
        for key, colour in zip(("long_diameter", "perpendicular_diameter"), DIAMETER_COLOURS):
            (r0, c0), (r1, c1) = ((r * scale[0], c * scale[1]) for r, c in lesion[key]["ends_row_col"])
            draw.line([(c0, r0), (c1, r1)], fill=colour, width=width)
            for r, c in ((r0, c0), (r1, c1)):
                k = 2 * width + 2
                draw.line([(c - k, r), (c + k, r)], fill=colour, width=width)
                draw.line([(c, r - k), (c, r + k)], fill=colour, width=width)
        if len(lesions) > 1:
            r, c = lesion["long_diameter"]["ends_row_col"][0]
            r, c = r * scale[0], c * scale[1]
            draw.text((c + 4, r + 4), str(lesion["lesion"]), fill=DIAMETER_COLOURS[0], font=_font(size))


def lesion_line(lesion: dict) -> str:
    """'#1 23.1 x 12.4 mm  oval, parallel, circumscribed' (pixels when the pixel size is unknown)."""
    from measure import size_text
    words = ", ".join(lesion[k]["term"] for k in ("shape", "orientation", "margin"))
    return f"#{lesion['lesion']} {size_text(lesion)}  {words}"


def thick_boundaries(mask: np.ndarray) -> np.ndarray:
    """skimage.segmentation.find_boundaries(mask, mode="thick") of a bool mask (the pixels whose 4-neighbourhood
    is not all inside or all outside), with array shifts instead of grey-level filters."""
    m = np.asarray(mask, bool)
    grown, shrunk = m.copy(), m.copy()
    for a, b in ((np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:])):
        grown[a] |= m[b]
        shrunk[a] &= m[b]
        grown[:, a] |= m[:, b]
        shrunk[:, a] &= m[:, b]
    return grown & ~shrunk


def overlay(grey: np.ndarray, d: Decision, lesions: list[dict] | None = None, extra: str = "",
            shape: tuple[int, int] | None = None) -> Image.Image:
    """The image in grey with the lesion outline in the class colour and 'label confidence' (+ extra) written on
    it; with lesions (measure.measure_lesions), their diameters drawn and their sizes and shape cues listed.
    shape: the full size the lesions were measured at when grey is at the working resolution."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    edge = thick_boundaries(d.lesion)
    if edge.any():
        edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # 2-3 px wide, visible on large scans
        rgb[edge] = OUTLINE_COLOURS.get(d.label, (255, 255, 0))
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    h, w = grey.shape
    size = max(12, min(h // 22, w // 24))
    small = max(10, int(size * 0.72))
    lines = [(f"{d.label} {d.confidence:.2f}{extra}", OUTLINE_COLOURS.get(d.label, (255, 255, 255)), size)]
    if lesions:
        scale = (1.0, 1.0) if shape is None else (h / shape[0], w / shape[1])
        _draw_diameters(draw, lesions, max(2, min(h, w) // 250), small, scale)
        lines += [(lesion_line(x), (255, 255, 255), small) for x in lesions[:3]]
        if len(lesions) > 3:
            lines.append((f"(+{len(lesions) - 3} more lesions in the JSON)", (255, 255, 255), small))
        _text_lines(draw, (0, h - small - 8), [(SHORT_NOTE, (200, 200, 200), max(9, int(small * 0.8)))])
    _text_lines(draw, (0, 0), lines)
    return img


@functools.lru_cache(maxsize=1)
def _inferno() -> np.ndarray:
    """matplotlib's inferno colours, N x 3 in 0..255."""
    from matplotlib import colormaps
    cmap = colormaps["inferno"]
    return cmap(np.arange(cmap.N))[:, :3] * 255


def uncertainty_image(grey: np.ndarray, umap: np.ndarray) -> Image.Image:
    """The per-pixel uncertainty (standard deviation of the lesion probability, 0..0.5) in the inferno colours
    over the grey image, full colour from UMAP_FULL up; certain pixels stay grey. A legend names the scale."""
    from uncertainty import VIEWS
    u = np.clip(np.asarray(umap, float) / UMAP_FULL, 0, 1)
    alpha = np.clip(u * 2, 0, 0.85)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    # only where the colour can move a grey level by half a step or more: elsewhere the blend rounds to grey
    sel = alpha * 255 >= 0.5
    lut = _inferno()  # the colormap's own lookup (matplotlib: index = int(x * N)), without its float RGBA array
    colour = lut[np.minimum(((0.25 + 0.75 * u[sel]) * len(lut)).astype(np.intp), len(lut) - 1)]
    a = alpha[sel][:, None]
    rgb[sel] = np.round(grey[sel][:, None].astype(float) * (1 - a) + colour * a).astype(np.uint8)
    img = Image.fromarray(rgb)
    size = max(10, min(grey.shape[0] // 30, grey.shape[1] // 34))
    legend = f"uncertainty: std of the lesion probability over {len(VIEWS) + 1} views (full colour >= {UMAP_FULL})"
    _text_lines(ImageDraw.Draw(img), (0, 0), [(legend, (255, 200, 80), size)])
    return img


BACKENDS = ("torch", "onnx", "onnx-int8")


def load_predictor(checkpoint_path: str, device: torch.device, backend_name: str = "torch"):
    """(callable (uint8 N x 1 x S x S, batch size, tta) -> logits N x C x S x S, metadata)."""
    from model import load_checkpoint
    model, meta = load_checkpoint(checkpoint_path, device)
    if backend_name == "onnx":
        from export_onnx import onnx_predictor
        return onnx_predictor(checkpoint_path, meta), meta
    if backend_name == "onnx-int8":
        from quantize import int8_predictor
        return int8_predictor(checkpoint_path, meta), meta
    if backend_name != "torch":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend_name!r}")
    model = model.to(memory_format=torch.channels_last)
    return (lambda imgs, bs, tta_: predict_logits(model, imgs, device, bs, tta_)), meta


def _network_probs(predictor, meta: dict, grey: np.ndarray, tta_: bool):
    """(lesion probabilities C x S x S at the network's size, image-label probabilities or None) of one image."""
    seg, cls = split_output(predictor(resize_image(grey, int(meta["image_size"]))[None, None], 1, tta_))
    return torch.sigmoid(seg[0].float()), (None if cls is None else torch.softmax(cls[0].float(), 0))


def _decide_at(meta: dict, shape: tuple[int, int], probs: torch.Tensor, cls_probs, threshold_: float,
               normal_gate_: float) -> Decision:
    """decide_full on network-size probabilities for an image of this shape (its minimum area scaled; the gate's
    keep level from the checkpoint)."""
    return decide_full(probs, shape, threshold_, min_area_at(meta, shape), cls_probs, normal_gate_,
                       float(meta.get("gate_keep", 1.0)))


def _lesion_at(meta: dict, shape: tuple[int, int], probs: torch.Tensor, cls_probs, threshold_: float,
               normal_gate_: float) -> np.ndarray:
    """_decide_at(...).lesion alone (lesion_full)."""
    return lesion_full(probs, shape, threshold_, min_area_at(meta, shape), cls_probs, normal_gate_,
                       float(meta.get("gate_keep", 1.0)))


def predict_img(predictor, meta: dict, grey: np.ndarray, threshold_: float, tta_: bool = False,
                normal_gate_: float | None = None) -> Decision:
    """Predict one uint8 greyscale image at its original resolution (minimum lesion area from the checkpoint;
    normal_gate None: the checkpoint's)."""
    if normal_gate_ is None:
        normal_gate_ = float(meta.get("normal_gate", 1.0))
    with one_thread() as n:
        probs, cls_probs = _network_probs(on_threads(predictor, n), meta, grey, tta_)
        return _decide_at(meta, grey.shape, probs, cls_probs, threshold_, normal_gate_)


@contextlib.contextmanager
def one_thread():
    """torch on one thread (yields the number it had) around the pre- and post-processing of an image: its
    tensors are small enough that a second thread costs more in synchronisation than it saves, and far more
    (ten times the work's own time, measured) when another process or ONNX Runtime's threads, still spinning
    after a run, hold the other core. The network itself runs on all threads (on_threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


def on_threads(predictor, n: int):
    """predictor running with torch on n threads, inside one_thread."""
    def run(*args, **kwargs):
        torch.set_num_threads(n)
        try:
            return predictor(*args, **kwargs)
        finally:
            torch.set_num_threads(1)
    return run


def predict_uncertain(predictor, meta: dict, grey: np.ndarray, threshold_: float, tta_: bool = False,
                      normal_gate_: float | None = None, batch_size_: int = 8) -> tuple[Decision, float, np.ndarray]:
    """predict_img, plus the test-time-augmentation uncertainty (uncertainty.py): (decision, score, per-pixel
    map H x W). The decision is predict_img's (the image and its views go through the network as one batch)."""
    from uncertainty import image_score, pixel_map, predict_with_views
    if normal_gate_ is None:
        normal_gate_ = float(meta.get("normal_gate", 1.0))
    with one_thread() as n:
        seg, cls, views = predict_with_views(on_threads(predictor, n),
                                             resize_image(grey, int(meta["image_size"]))[None, None], batch_size_, tta_)
        probs, cls_probs = torch.sigmoid(seg[0]), (None if cls is None else torch.softmax(cls[0], 0))
        d = _decide_at(meta, grey.shape, probs, cls_probs, threshold_, normal_gate_)
        views = [(p[0], None if c is None else c[0]) for p, c in views]
        score = image_score(d.lesion, views,
                            lambda p, c: _lesion_at(meta, grey.shape, p, c, threshold_, normal_gate_))
        umap = to_original(pixel_map(probs, [p for p, _ in views])[None], grey.shape)[0]
    return d, score, umap.numpy()


def expand_inputs(spec: str) -> list[Path]:
    """'a.png;folder;*.jpg' -> image files. Mask files (*_mask*.png) inside folders are skipped; DICOM files
    in folders are found by their content (the 'DICM' preamble), with or without an extension."""
    files: list[Path] = []
    for item in [s for s in spec.split(";") if s.strip()]:
        p = Path(item)
        if p.is_dir():  # images by extension, and DICOM files whatever their name (often none, or a UID)
            files += sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                            and (q.suffix.lower() in IMAGE_EXTENSIONS or has_dicom_magic(q))
                            and not _MASK_RE.match(q.stem))
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matched:
                raise DataError(f"{item}: no file matches this pattern")
            files += [m for m in matched if m.is_file()]
        else:
            files.append(p)  # a missing file is reported per file, like any other bad input
    return files


def _unique_stem(path: Path, used: set[str], suffix: str = "") -> str:
    base = path.stem + suffix
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}_{n}"
    used.add(stem)
    return stem


# The measurements of the largest lesion in predictions.csv: column -> (group, key) in measure.py's lesion dict.
LESION_COLUMNS = {"long_diameter_px": ("long_diameter", "px"),
                  "perpendicular_diameter_px": ("perpendicular_diameter", "px"),
                  "long_diameter_mm": ("long_diameter", "mm"),
                  "perpendicular_diameter_mm": ("perpendicular_diameter", "mm"),
                  "area_mm2": ("area", "mm2"), "orientation": ("orientation", "term"),
                  "height_width_ratio": ("orientation", "height_width_ratio"), "shape": ("shape", "term"),
                  "axis_ratio": ("shape", "axis_ratio"), "ellipse_iou": ("shape", "ellipse_iou"),
                  "solidity": ("shape", "solidity"), "margin": ("margin", "term"),
                  "convexity": ("margin", "convexity"), "concavity_depth": ("margin", "concavity_depth")}
CSV_FIELDS = ["file", "frame", "label", "confidence", "malignancy_probability", "normal_probability", "lesion_area_px",
              "lesion_area_fraction", "mean_lesion_probability", "width", "height", "n_lesions", *LESION_COLUMNS,
              "pixel_mm_row", "pixel_mm_col", "pixel_size_source", "uncertainty", "review", "mask", "overlay",
              "lesions_json", "dicom_seg", "dicom_sr", "note", "error"]


def _fmt(v: float) -> str:
    return "" if v != v else f"{v:.4f}"  # NaN (not known without a head) -> empty cell


@dataclass
class Frame:
    """One image to segment: a file, or one frame of a multi-frame DICOM. It is segmented, measured and drawn at
    the working resolution of grey; sizes, points, boxes and the mask file are those of the full-size image."""
    path: Path
    index: int | None   # the frame of a multi-frame DICOM; None for a single image
    grey: np.ndarray    # uint8, the whole frame at the working resolution (dataset.shrink)
    geometry: Geometry  # full size, ultrasound regions, pixel size (dicom_io)
    box: tuple[int, int, int, int] | None = None  # dicom_crop: (row0, row1, col0, col1) segmented, full-size pixels

    @property
    def shape(self) -> tuple[int, int]:
        """The image's full size (rows, cols)."""
        return self.geometry.rows, self.geometry.cols

    def to_work(self, values, axes: str) -> list[float]:
        """Full-size pixel coordinates on the axes named ('r' row, 'c' column, one letter per value) in pixels of
        grey."""
        k = {"r": self.grey.shape[0] / self.shape[0], "c": self.grey.shape[1] / self.shape[1]}
        return [float(v) * k[a] for v, a in zip(values, axes)]


@dataclass
class Readout:
    """What predict.py reports for one frame."""
    decision: Decision
    lesions: list[dict]          # measure.measure_lesions, the largest first
    uncertainty: float = float("nan")
    umap: np.ndarray | None = None
    review: bool | None = None   # None: no uncertainty, or no cut-off
    box: tuple | None = None     # (x0, y0, x1, y1) whose box-prompted mask replaced the network's (box_readout)


def read_inputs(path: Path, cfg: dict, size_of) -> Iterator[Frame]:
    """The frames of one input file (DICOM: each frame, or cfg['frame']); size_of(path): the pixel_mm setting."""
    if not is_dicom(path):
        grey, shape = load_working_image(path)
        yield Frame(path, None, grey, Geometry(*shape, pixel_spacing=size_of(path)))
        return
    from dicom_io import read_frames
    geometry, frames = read_frames(path, cfg["frame"], max_pixels=MAX_IMAGE_PIXELS)
    geometry = geometry.with_fallback(size_of(path))
    box = geometry.tissue_box() if cfg["dicom_crop"] else None
    if cfg["dicom_crop"] and box is None:
        log.info("%s: no 2D ultrasound region in the header: the whole frame is segmented", path)
    for i, grey in frames:
        fr = Frame(path, i if geometry.n_frames > 1 else None, shrink(grey), geometry, box)
        del grey  # only the working resolution is kept while the frame is segmented
        yield fr


def read_out(fr: Frame, predictor, meta: dict, thr: float, cfg: dict, cutoff: float | None) -> Readout:
    """Segment a frame (inside its crop box), put the mask back into the full frame, measure every lesion."""
    from dicom_io import crop, uncrop
    from measure import measure_lesions
    box = work_crop_box(fr)
    part = crop(fr.grey, box)
    score, umap = float("nan"), None
    if cfg["uncertainty"]:
        d, score, umap = predict_uncertain(predictor, meta, part, thr, cfg["tta"], batch_size_=cfg["batch_size"])
    else:
        d = predict_img(predictor, meta, part, thr, cfg["tta"])
    if box is not None:
        full = fr.grey.shape
        d = replace(d, lesion=uncrop(d.lesion, box, full), class_masks=uncrop(d.class_masks, box, full))
        umap = None if umap is None else uncrop(umap, box, full)
    review = None if cutoff is None or score != score else bool(score > cutoff)
    if d.gate_conflict:  # the head called it normal but the mask was kept: always a case for review
        review = True
    ro = Readout(d, measure_lesions(d.lesion, fr.geometry.pixel_size_at, fr.shape), score, umap, review)
    if cfg.get("box"):
        from box_prompt import clip_box, parse_box, shared_prompter
        b = clip_box(parse_box(cfg["box"]), fr.shape)
        prompter = shared_prompter(str(pick_device(cfg.get("device", "auto"))))
        ro = box_readout(fr, ro, prompter.probabilities(prompter.embed(fr.grey), work_box(fr, b)), b)
    return ro


def work_crop_box(fr: Frame) -> tuple[int, int, int, int] | None:
    """fr.box (row0, row1, col0, col1, full-size pixels) in pixels of fr.grey, covering at least the same part."""
    if fr.box is None:
        return None
    r0, r1, c0, c1 = fr.to_work(fr.box, "rrcc")
    return math.floor(r0), math.ceil(r1), math.floor(c0), math.ceil(c1)


def work_box(fr: Frame, box) -> tuple[float, float, float, float]:
    """A box prompt (x0, y0, x1, y1 in full-size pixels) in pixels of fr.grey, for LiteMedSAM."""
    from box_prompt import clip_box
    return clip_box(fr.to_work(box, "crcr"), fr.grey.shape)


def full_readout(fr: Frame, ro: Readout) -> Readout:
    """ro with its masks drawn back at the frame's full size (dataset.to_full): the mask file, DICOM SEG."""
    d = ro.decision
    return replace(ro, decision=replace(d, lesion=to_full(d.lesion, fr.shape),
                                        class_masks=to_full(d.class_masks, fr.shape)))


def mask_source(ro: Readout) -> str:
    """'network', or the box whose LiteMedSAM mask is reported (CSV note, lesions JSON, the page)."""
    return "network" if ro.box is None else f"LiteMedSAM box prompt x0,y0,x1,y1 = {','.join(f'{v:g}' for v in ro.box)}"


def box_readout(fr: Frame, ro: Readout, probs: np.ndarray, box: tuple) -> Readout:
    """ro with the lesion mask replaced by a box-prompted one (probs: LiteMedSAM's probability for the box at the
    size of fr.grey, box_prompt.py; box: full-size pixels), measured anew. The label, confidence and malignancy stay the network's for the whole
    image; the uncertainty (of the network's mask) is dropped; mean_lesion_prob becomes LiteMedSAM's."""
    from box_prompt import PROB_THRESHOLD
    from measure import measure_lesions
    probs = np.asarray(probs, np.float32)
    lesion = probs > PROB_THRESHOLD
    d = ro.decision
    class_masks = np.zeros_like(d.class_masks)
    if d.label in LESION_CLASSES:
        class_masks[LESION_CLASSES.index(d.label)] = lesion
    d = replace(d, lesion=lesion, class_masks=class_masks,
                mean_lesion_prob=float(probs[lesion].mean()) if lesion.any() else 0.0)
    return Readout(d, measure_lesions(lesion, fr.geometry.pixel_size_at, fr.shape),
                   box=tuple(round(float(v), 1) for v in box))


def _image_pixel_size(fr: Frame, lesions: list[dict]) -> dict | None:
    """The pixel size reported for the image: the largest lesion's, else the one at the image's centre."""
    if lesions:
        return lesions[0]["pixel_size"]
    size = fr.geometry.pixel_size_at(fr.shape[0] / 2, fr.shape[1] / 2)
    return size.to_json() if size else None


def _cell(v) -> str:
    return "" if v is None else str(v)


def csv_row(fr: Frame, ro: Readout, names: dict[str, str]) -> dict:
    """The predictions.csv row of one frame."""
    from measure import NOTE
    d, area = ro.decision, full_area(ro.decision.lesion, fr.shape)
    size = _image_pixel_size(fr, ro.lesions)
    largest = ro.lesions[0] if ro.lesions else None
    return {"file": str(fr.path), "frame": _cell(fr.index), "label": d.label, "confidence": f"{d.confidence:.4f}",
            "malignancy_probability": _fmt(d.malignancy), "normal_probability": _fmt(d.p_normal),
            "lesion_area_px": area, "lesion_area_fraction": f"{area / (fr.shape[0] * fr.shape[1]):.6f}",
            "mean_lesion_probability": f"{d.mean_lesion_prob:.4f}", "width": fr.shape[1],
            "height": fr.shape[0], "n_lesions": len(ro.lesions),
            **{c: _cell(largest[g][k] if largest else None) for c, (g, k) in LESION_COLUMNS.items()},
            "pixel_mm_row": _cell(size and size["row_mm"]), "pixel_mm_col": _cell(size and size["col_mm"]),
            "pixel_size_source": size["source"] if size else "unknown", "uncertainty": _fmt(ro.uncertainty),
            "review": "" if ro.review is None else ("yes" if ro.review else "no"), **names,
            "note": NOTE if ro.box is None else f"{NOTE}; mask: {mask_source(ro)}", "error": ""}


def lesion_report(fr: Frame, ro: Readout, cutoff: float | None, names: dict[str, str]) -> dict:
    """The <name>_lesions.json of one frame: geometry only from the header, every lesion's measurements."""
    from measure import NOTE, REFERENCE
    from uncertainty import METHOD
    d = ro.decision
    unc = None if ro.uncertainty != ro.uncertainty else {"score": round(ro.uncertainty, 4), "cutoff": cutoff,
                                                          "review": ro.review, "method": METHOD}
    return {"note": NOTE, "terms": REFERENCE, "file": str(fr.path), "frame": fr.index, "label": d.label,
            "confidence": round(d.confidence, 4), "malignancy_probability": None if d.malignancy != d.malignancy
            else round(d.malignancy, 4), "image": fr.geometry.to_json(), "segmented_box_row0_row1_col0_col1": fr.box,
            "uncertainty": unc, "outputs": names, "mask_source": mask_source(ro), "n_lesions": len(ro.lesions),
            "lesions": ro.lesions}


def mask_picture(fr: Frame, ro: Readout) -> np.ndarray:
    """The lesion mask at the image's full size as uint8 0 / 255 (the mask PNG)."""
    return to_full(ro.decision.lesion.astype(np.uint8) * 255, fr.shape)  # one full-size array, not three


def write_readout(fr: Frame, ro: Readout, out: Path, stem: str, cutoff: float | None,
                  written: dict[str, str] | None = None) -> dict:
    """Mask, overlay, uncertainty picture and JSON of one frame into out; returns its CSV row. written: the names
    of files already written for it (dicom_seg, dicom_sr), listed in the JSON and the CSV."""
    names = {"mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png", "lesions_json": f"{stem}_lesions.json",
             **(written or {})}
    Image.fromarray(mask_picture(fr, ro)).save(out / names["mask"])
    extra = "  mask: box prompt" if ro.box is not None else ""
    if ro.uncertainty == ro.uncertainty:
        extra = f"  uncertainty {ro.uncertainty:.2f}" + {True: " REVIEW", False: "", None: ""}[ro.review]
    overlay(fr.grey, ro.decision, ro.lesions, extra, fr.shape).save(out / names["overlay"])
    if ro.umap is not None:
        uncertainty_image(fr.grey, ro.umap).save(out / f"{stem}_uncertainty.png")
    save_json_atomic(out / names["lesions_json"], lesion_report(fr, ro, cutoff, names))
    return csv_row(fr, ro, names)


def review_cutoff(cfg: dict, meta: dict) -> float | None:
    """The uncertainty cut-off for the review flag: the setting, else the checkpoint's (stored by
    ship_checkpoint.py --uncertainty_cutoff for the same uncertainty method), else None (no flag)."""
    from uncertainty import stored_cutoff
    if not cfg["uncertainty"]:
        return None
    if cfg["uncertainty_cutoff"] >= 0:
        return float(cfg["uncertainty_cutoff"])
    stored = stored_cutoff(meta)
    if stored is None:
        log.warning("no uncertainty cut-off for this method in %s: the review column stays empty (choose one with "
                    "evaluate.py --uncertainty on validation images; store it with ship_checkpoint.py "
                    "--uncertainty_cutoff, or give --uncertainty_cutoff)", cfg["checkpoint"])
    return stored


@dataclass
class _Job:
    cfg: dict
    predictor: object
    meta: dict
    threshold: float
    cutoff: float | None
    size_of: object
    out: Path
    model: object = None      # dicom_out.ModelInfo with --dicom_out
    numbering: object = None  # dicom_out.Numbering with --dicom_out: the run's SEG and SR series


def predict_file(job: _Job, path: Path, writer: csv.DictWriter, used: set[str]) -> int:
    """Every frame of one input into out and the CSV; a bad file is an error row. Returns 1 if it failed."""
    from measure import size_text
    header = None  # --dicom_out: what the SEG and SR take from the source (dicom_out.source_header)
    try:
        for fr in read_inputs(path, job.cfg, job.size_of):  # a bad file fails here first, with dicom_io's message
            if job.model is not None and header is None and is_dicom(path):
                from dicom_out import source_header
                try:
                    header = source_header(path)
                except DicomError as e:
                    raise DicomError(f"{e}; without --dicom_out it gets its masks, CSV and JSON") from None
            ro = read_out(fr, job.predictor, job.meta, job.threshold, job.cfg, job.cutoff)
            stem = _unique_stem(path, used, "" if fr.index is None else f"_f{fr.index:03d}")
            written = {}
            if header is not None:
                from dicom_out import write_dicom_out
                written = write_dicom_out(fr, full_readout(fr, ro), header, job.model, job.out, stem, mask_source(ro),
                                          job.numbering)
            writer.writerow(write_readout(fr, ro, job.out, stem, job.cutoff, written))
            log.info("%s%s: %s (%.2f), %d lesion(s)%s", path, "" if fr.index is None else f" frame {fr.index}",
                     ro.decision.label, ro.decision.confidence, len(ro.lesions),
                     f", largest {size_text(ro.lesions[0])}" if ro.lesions else "")
        return 0
    except (DataError, DicomError) as e:
        log.error("%s", e)
        writer.writerow({"file": str(path), "label": "", "error": str(e)})
        return 1


def run(cfg: dict) -> int:
    """Predict every input; returns the number of files that failed."""
    if not cfg["path_to_image"]:
        raise SystemExit("predict.py: give an image, a folder or a glob (positional, or --path_to_image)")
    size_of = pixel_mm_lookup(cfg["pixel_mm"])
    dev = pick_device(cfg["device"])
    predictor, meta = load_predictor(cfg["checkpoint"], dev, cfg["backend"])
    thr = cfg["threshold"] if cfg["threshold"] >= 0 else float(meta.get("threshold", 0.5))
    files = expand_inputs(cfg["path_to_image"])
    if not files:
        raise SystemExit(f"predict.py: no images found in {cfg['path_to_image']}")
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(cfg, predictor, meta, thr, review_cutoff(cfg, meta), size_of, out)
    if cfg["dicom_out"]:
        from dicom_out import ModelInfo, Numbering
        job.model, job.numbering = ModelInfo.of(cfg["checkpoint"], thr), Numbering()
        plain = sum(not is_dicom(f) for f in files)
        if plain:
            log.info("--dicom_out: %d input(s) are not DICOM and get no SEG/SR (no DICOM study to attach them to)",
                     plain)
    csv_path = out / "predictions.csv"
    failures, used = 0, set()
    from tqdm import tqdm
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for path in tqdm(files, desc="predicting", unit="img", disable=len(files) < 2):
            failures += predict_file(job, path, writer, used)
            f.flush()
    log.info("wrote %s (%d file(s), %d failed)", csv_path, len(files), failures)
    return failures


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from model import CheckpointError
    cfg = parse(argv)
    try:
        failures = run(cfg)
    except (DataError, DicomError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    return 1 if failures else 0


def parse(argv: list[str] | None = None) -> dict:
    from cli import parse_settings
    return parse_settings(__file__, argv, __doc__, positional="path_to_image")


if __name__ == "__main__":
    sys.exit(main())
