"""Segment breast ultrasound images with a trained checkpoint.

    python predict.py "scan 1.png"                       # one file
    python predict.py scans/ --tta                         # a folder (mask files *_mask*.png are skipped)
    python predict.py --path_to_image 'scans/*.png' --checkpoint runs/resnet18/best.safetensors

For each image it writes, into out_dir: <name>_mask.png (binary lesion mask at the original resolution),
<name>_overlay.png (lesion outline over the image, with label and confidence), and one row of
predictions.csv (file, label, confidence, malignancy probability P(malignant | lesion), the head's probability
that the image is normal (models with a classification head), lesion area in pixels and as a fraction, mean
lesion probability). Threshold, minimum lesion area and the head's normal gate come from the checkpoint.
Image size, normalization, classes and threshold come from the checkpoint, never from flags that could
disagree with training. A bad file is reported and skipped; the others are still written; the exit code
is then 1.
"""
from __future__ import annotations

import csv
import glob
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from dataset import (CLASS_NAMES, IMAGE_EXTENSIONS, LESION_CLASSES, DataError, _MASK_RE, load_image,
                     normalize, resize_image)

log = logging.getLogger("predict")

# ---- settings (edit here, or override on the command line: --threshold 0.4)
path_to_image = "samples"                                   # image file, folder or glob; several joined by ";" (default: the phantom samples)
checkpoint = "checkpoints/busi_unet_resnet18.safetensors"   # trained model (.safetensors) to use
out_dir = "sample_predictions"                              # where masks, overlays and predictions.csv go
threshold = -1.0                                            # lesion probability threshold; < 0 uses the checkpoint's
tta = False                                                 # also predict the mirrored image and average
device = "auto"                                             # auto (cuda, then mps, then cpu), cpu, cuda, mps
batch_size = 8                                              # images per forward pass
backend = "torch"                                           # torch, or onnx (ONNX Runtime on the CPU; <checkpoint>.onnx is exported beside it if missing or stale)
# ---- end of settings

OUTLINE_COLOURS = {"benign": (60, 220, 60), "malignant": (240, 50, 50)}


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
                   batch_size: int = 8, tta: bool = False, channels_last: bool = True):
    """Lesion logits at network resolution for uint8 images N x 1 x S x S: N x C x S x S (float32, on CPU);
    for a model with a classification head, the tuple (lesion logits, image-label logits N x K).
    With tta, the logits of the image and of its mirror image are averaged."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # arrays straight from PIL are read-only
    images = torch.as_tensor(images)
    segs, clss = [], []
    for i in range(0, images.shape[0], batch_size):
        x = normalize(images[i:i + batch_size].to(device, non_blocking=True).float())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z, c = split_output(model(x))
        z = z.float()
        if tta:
            z2, c2 = split_output(model(x.flip(-1)))
            z = (z + z2.float().flip(-1)) / 2
            c = None if c is None else (c.float() + c2.float()) / 2
        segs.append(z.cpu())
        if c is not None:
            clss.append(c.float().cpu())
    seg = torch.cat(segs) if segs else torch.zeros(0)
    return (seg, torch.cat(clss)) if clss else seg


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


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network's output as (lesion logits N x C x S x S, image-label logits N x K or None): models with a
    classification head return both, models without one only the lesion logits."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def remove_small(lesion: torch.Tensor, min_area: float) -> torch.Tensor:
    """Drop connected lesion components (8-connectivity) smaller than min_area pixels."""
    if min_area <= 0 or not bool(lesion.any()):
        return lesion
    from skimage.measure import label
    components = label(lesion.numpy(), connectivity=2)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_area
    keep[0] = False  # background
    return torch.from_numpy(keep[components])


def decide(probs: torch.Tensor, threshold: float, min_area: float = 0.0, cls_probs: torch.Tensor | None = None,
           normal_gate: float = 1.0) -> Decision:
    """Turn per-class probabilities C x H x W into a mask and an image label.

    min_area: lesion components smaller than this many pixels (at this resolution) are removed.
    Without a head (cls_probs None): the label is normal when no pixel survives, otherwise the lesion class
    whose channel holds the most probability inside the lesion; malignancy = the malignant share of that
    probability.
    With a head (cls_probs: probabilities of CLASS_NAMES): the mask is cleared when the head's P(normal) is
    at least normal_gate; an image with a lesion left is labelled benign or malignant by the head's
    P(malignant) / (P(benign) + P(malignant)) against 0.5, and normal otherwise.
    """
    p = probs.float()
    top, arg = p.max(0)
    lesion = remove_small(top > threshold, min_area)
    head = None
    if cls_probs is not None:
        head = {c: float(v) for c, v in zip(CLASS_NAMES, cls_probs.float().tolist())}
        lesion_mass = head["benign"] + head["malignant"]
        malignancy = head["malignant"] / lesion_mass if lesion_mass > 0 else 0.5
        if head["normal"] >= normal_gate:
            lesion = torch.zeros_like(lesion)
    class_masks = torch.stack([lesion & (arg == c) for c in range(p.shape[0])])
    if not lesion.any():
        if head is not None:
            return Decision(lesion.numpy(), class_masks.numpy(), "normal", head["normal"], 0.0, malignancy,
                            head["normal"])
        return Decision(lesion.numpy(), class_masks.numpy(), "normal", float(1 - top.max()), 0.0)
    mass = (p * lesion).sum(dim=(1, 2))
    n = lesion.sum()
    mean_prob = float(top[lesion].mean())
    if head is not None:
        label = "malignant" if malignancy >= 0.5 else "benign"
        return Decision(lesion.numpy(), class_masks.numpy(), label, head[label], mean_prob, malignancy,
                        head["normal"])
    c = int(mass.argmax())
    mal = LESION_CLASSES.index("malignant")
    return Decision(lesion.numpy(), class_masks.numpy(), LESION_CLASSES[c], float(mass[c] / n), mean_prob,
                    float(mass[mal] / mass.sum()) if float(mass.sum()) > 0 else 0.5)


def min_area_at(meta: dict, shape: tuple[int, int]) -> float:
    """The checkpoint's minimum lesion-component area (stored in pixels of the network input, image_size x
    image_size) in pixels of an image of this shape."""
    size = int(meta["image_size"])
    return float(meta.get("min_area", 0) or 0) * shape[0] * shape[1] / (size * size)


def overlay(grey: np.ndarray, d: Decision) -> Image.Image:
    """The image in grey with the lesion outline in the class colour and 'label confidence' written on it."""
    from skimage.segmentation import find_boundaries
    rgb = np.repeat(grey[..., None], 3, axis=2).copy()
    edge = find_boundaries(d.lesion, mode="thick")
    if edge.any():
        edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # 2-3 px wide, visible on large scans
        rgb[edge] = OUTLINE_COLOURS.get(d.label, (255, 255, 0))
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    size = max(12, grey.shape[0] // 22)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    text = f"{d.label} {d.confidence:.2f}"
    draw.rectangle([0, 0, int(size * 0.62 * len(text)) + 8, size + 8], fill=(0, 0, 0))
    draw.text((4, 3), text, fill=OUTLINE_COLOURS.get(d.label, (255, 255, 255)), font=font)
    return img


def load_predictor(checkpoint_path: str, device: torch.device, backend_name: str = "torch"):
    """(callable (uint8 N x 1 x S x S, batch size, tta) -> logits N x C x S x S, metadata)."""
    from model import load_checkpoint
    model, meta = load_checkpoint(checkpoint_path, device)
    if backend_name == "onnx":
        from export_onnx import onnx_predictor
        return onnx_predictor(checkpoint_path, meta), meta
    if backend_name != "torch":
        raise ValueError(f"backend must be torch or onnx, got {backend_name!r}")
    model = model.to(memory_format=torch.channels_last)
    return (lambda imgs, bs, tta_: predict_logits(model, imgs, device, bs, tta_)), meta


def predict_img(predictor, meta: dict, grey: np.ndarray, threshold_: float, tta_: bool = False,
                normal_gate_: float | None = None) -> Decision:
    """Predict one uint8 greyscale image at its original resolution (minimum lesion area from the checkpoint;
    normal_gate None: the checkpoint's)."""
    if normal_gate_ is None:
        normal_gate_ = float(meta.get("normal_gate", 1.0))
    size = int(meta["image_size"])
    seg, cls = split_output(predictor(resize_image(grey, size)[None, None], 1, tta_))
    cls_probs = None if cls is None else torch.softmax(cls[0].float(), 0)
    return decide(to_original(torch.sigmoid(seg[0]), grey.shape), threshold_, min_area_at(meta, grey.shape),
                  cls_probs, normal_gate_)


def expand_inputs(spec: str) -> list[Path]:
    """'a.png;folder;*.jpg' -> image files. Mask files (*_mask*.png) inside folders are skipped."""
    files: list[Path] = []
    for item in [s for s in spec.split(";") if s.strip()]:
        p = Path(item)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                            and not _MASK_RE.match(q.stem))
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matched:
                raise DataError(f"{item}: no file matches this pattern")
            files += [m for m in matched if m.is_file()]
        else:
            files.append(p)  # a missing file is reported per file, like any other bad input
    return files


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


CSV_FIELDS = ["file", "label", "confidence", "malignancy_probability", "normal_probability", "lesion_area_px",
              "lesion_area_fraction", "mean_lesion_probability", "width", "height", "mask", "overlay", "error"]


def _fmt(v: float) -> str:
    return "" if v != v else f"{v:.4f}"  # NaN (not known without a head) -> empty cell


def run(cfg: dict) -> int:
    """Predict every input; returns the number of files that failed."""
    if not cfg["path_to_image"]:
        raise SystemExit("predict.py: give an image, a folder or a glob (positional, or --path_to_image)")
    dev = pick_device(cfg["device"])
    predictor, meta = load_predictor(cfg["checkpoint"], dev, cfg["backend"])
    thr = cfg["threshold"] if cfg["threshold"] >= 0 else float(meta.get("threshold", 0.5))
    files = expand_inputs(cfg["path_to_image"])
    if not files:
        raise SystemExit(f"predict.py: no images found in {cfg['path_to_image']}")
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "predictions.csv"
    failures, used = 0, set()
    from tqdm import tqdm
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for path in tqdm(files, desc="predicting", unit="img", disable=len(files) < 2):
            try:
                grey = load_image(path)
                d = predict_img(predictor, meta, grey, thr, cfg["tta"])
                stem = _unique_stem(path, used)
                mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
                Image.fromarray(d.lesion.astype(np.uint8) * 255).save(mask_path)
                overlay(grey, d).save(overlay_path)
                area = int(d.lesion.sum())
                writer.writerow({"file": str(path), "label": d.label, "confidence": f"{d.confidence:.4f}",
                                 "malignancy_probability": _fmt(d.malignancy), "normal_probability": _fmt(d.p_normal),
                                 "lesion_area_px": area, "lesion_area_fraction": f"{area / d.lesion.size:.6f}",
                                 "mean_lesion_probability": f"{d.mean_lesion_prob:.4f}", "width": grey.shape[1],
                                 "height": grey.shape[0], "mask": mask_path.name, "overlay": overlay_path.name,
                                 "error": ""})
                log.info("%s: %s (%.2f), lesion %d px", path, d.label, d.confidence, area)
            except DataError as e:
                failures += 1
                log.error("%s", e)
                writer.writerow({"file": str(path), "label": "", "error": str(e)})
            f.flush()
    log.info("wrote %s (%d image(s), %d failed)", csv_path, len(files), failures)
    return failures


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from model import CheckpointError
    cfg = parse(argv)
    try:
        failures = run(cfg)
    except (DataError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    return 1 if failures else 0


def parse(argv: list[str] | None = None) -> dict:
    from cli import parse_settings
    return parse_settings(__file__, argv, __doc__, positional="path_to_image")


if __name__ == "__main__":
    sys.exit(main())
