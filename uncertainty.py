"""Test-time-augmentation uncertainty: how much the predicted lesion changes when the image is mirrored or
rescaled a little, changes that should not change a good answer.

    views = view_predictions(predictor, images, ref_probs)          # VIEWS, mapped back onto the image
    seg, cls, views = predict_with_views(predictor, images)        # the reported prediction too, one call
    score = agreement_score(reported_mask, [mask of each view])      # one number per image, 0 = stable
    umap = pixel_map(ref_probs, [probabilities of each view])        # per pixel, for the overlay

The network sees the image in VIEWS (mirrored; shrunk to 90% with a black border; enlarged to 110% with the
border cropped; mirrored and enlarged). Each view's lesion probabilities are mapped back onto the image (where
an enlarged view saw nothing, the reported prediction stands in) and turned into a mask by the same
post-processing as the reported one (predict.decide: threshold, minimum area, normal gate).

  per-pixel map   standard deviation, over the reported prediction and the views, of the lesion probability
                  (the largest lesion channel): 0 where all agree, at most 0.5.
  score           1 - mean Dice between each view's mask and the reported mask (both empty: Dice 1): 0 when
                  every view gives the same mask, 1 when none overlaps it. On the scale of the Dice it predicts.

Why this method: it needs no retraining and works for every checkpoint and both backends (MC dropout needs
dropout layers the UNet has not; ensembles need several trainings); test-time augmentation estimates the
aleatoric, input-dependent uncertainty of a segmentation (Wang G, Li W, Aertsen M, Deprest J, Ourselin S,
Vercauteren T. Neurocomputing 338:34-45, 2019), and the Dice agreement of the sampled masks is the
structure-wise score that tracked the real Dice in Roy AG, Conjeti S, Navab N, Wachinger C. NeuroImage
195:11-22, 2019. The mirror and the +-10% zoom lie inside the training augmentation's ranges (augment.py:
mirror, zoom 0.85-1.2), so the network has learnt that they should not change the answer. Cost: len(VIEWS)
extra images per forward pass (predict_with_views sends the image and its views as one batch). evaluate.py
--uncertainty measures whether the score tracks the Dice (risk-coverage curve, Dice of flagged vs unflagged
images) and chooses the review cut-off.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from backends import split_output
from metrics import dice_iou

VIEWS = ((True, 1.0), (False, 0.9), (False, 1.1), (True, 1.1))  # (mirrored, zoom factor)
METHOD = "tta-v1: mirror, zoom 0.9, zoom 1.1, mirror+zoom 1.1; score = 1 - mean Dice(view mask, reported mask)"


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """N x C x S x S scaled by `scale` about the centre, same size: a black border when shrunk (scale < 1),
    the border cropped when enlarged."""
    size = x.shape[-1]
    n = max(1, round(size * scale))
    y = F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False)
    if n >= size:
        o = (n - size) // 2
        return y[..., o:o + size, o:o + size]
    out = x.new_zeros(x.shape)
    o = (size - n) // 2
    out[..., o:o + n, o:o + n] = y
    return out


def unzoom(p: torch.Tensor, scale: float, ref: torch.Tensor) -> torch.Tensor:
    """The inverse of zoom for predictions: p (of a zoomed view) back onto the image's grid; where the view
    did not see the image (the cropped border of an enlarged view), ref's values."""
    size = p.shape[-1]
    n = max(1, round(size * scale))
    o = abs(n - size) // 2
    if n <= size:
        return F.interpolate(p[..., o:o + n, o:o + n], size=(size, size), mode="bilinear", align_corners=False)
    canvas = F.interpolate(ref, size=(n, n), mode="bilinear", align_corners=False)
    canvas[..., o:o + size, o:o + size] = p
    return F.interpolate(canvas, size=(size, size), mode="bilinear", align_corners=False)


def _view(images: torch.Tensor, mirror: bool, scale: float) -> np.ndarray:
    x = zoom(images.float(), scale) if scale != 1.0 else images.float()
    x = x.flip(-1) if mirror else x
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _views_back(seg: torch.Tensor, cls: torch.Tensor | None, ref_probs: torch.Tensor
                ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The network's outputs for VIEWS (view-major: all images of the first view, then of the second, ...) as
    probabilities mapped back onto the image's grid."""
    n = ref_probs.shape[0]
    out = []
    for v, (mirror, scale) in enumerate(VIEWS):
        p = torch.sigmoid(seg[v * n:(v + 1) * n].float())
        p = p.flip(-1) if mirror else p
        p = unzoom(p, scale, ref_probs.float()) if scale != 1.0 else p
        out.append((p, None if cls is None else torch.softmax(cls[v * n:(v + 1) * n].float(), -1)))
    return out


def view_predictions(predictor, images, ref_probs: torch.Tensor, batch_size: int = 8
                     ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """For each of VIEWS: (lesion probabilities N x C x S x S on the image's grid, image-label probabilities
    N x K or None). images: uint8 N x 1 x S x S; ref_probs: the reported probabilities (for unseen borders).
    All views go to the predictor in one call (batches of batch_size)."""
    images = torch.as_tensor(np.array(images))  # a copy: arrays from PIL are read-only
    seg, cls = split_output(predictor(np.concatenate([_view(images, m, s) for m, s in VIEWS]), batch_size, False))
    return _views_back(seg, cls, ref_probs)


def predict_with_views(predictor, images, batch_size: int = 8, tta: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """The reported prediction and view_predictions' views from one predictor call (the image and its VIEWS in
    batches of batch_size: one forward pass for a single image): (lesion logits N x C x S x S, label logits
    N x K or None, views). With tta the reported logits average the image's and the mirror view's, as the
    predictors' own tta does."""
    images = torch.as_tensor(np.array(images))
    n = images.shape[0]
    batch = np.concatenate([images.numpy()] + [_view(images, m, s) for m, s in VIEWS])
    seg, cls = split_output(predictor(batch, batch_size, False))
    ref, ref_cls = seg[:n].float(), None if cls is None else cls[:n].float()
    if tta:
        mirror = VIEWS.index((True, 1.0)) + 1
        ref = (ref + seg[mirror * n:(mirror + 1) * n].float().flip(-1)) / 2
        ref_cls = None if cls is None else (ref_cls + cls[mirror * n:(mirror + 1) * n].float()) / 2
    views = _views_back(seg[n:], None if cls is None else cls[n:], torch.sigmoid(ref))
    return ref, ref_cls, views


def agreement_score(reported: np.ndarray, view_masks: list[np.ndarray]) -> float:
    """1 - mean Dice of each view's mask with the reported mask (two empty masks agree: Dice 1)."""
    if not view_masks:
        return float("nan")
    return float(1.0 - np.mean([dice_iou(m, reported, empty_score=1.0)[0] for m in view_masks]))


def image_score(reported: np.ndarray, views: list[tuple[torch.Tensor, torch.Tensor | None]],
                to_mask: Callable[[torch.Tensor, torch.Tensor | None], np.ndarray]) -> float:
    """agreement_score of one image; views: its (probabilities C x S x S, label probabilities or None) per view;
    to_mask: the post-processing that made the reported mask (probabilities, label probabilities) -> bool H x W."""
    return agreement_score(reported, [to_mask(p, c) for p, c in views])


def pixel_map(ref_probs: torch.Tensor, view_probs: list[torch.Tensor]) -> torch.Tensor:
    """Per-pixel standard deviation (S x S) of the lesion probability (largest channel) over the reported
    prediction and the views; each argument C x S x S."""
    stack = torch.stack([ref_probs.float().amax(0)] + [p.float().amax(0) for p in view_probs])
    return ((stack - stack.mean(0)) ** 2).mean(0).sqrt()  # = std(0, unbiased=False), 25x quicker on the CPU


def stored_cutoff(meta: dict) -> float | None:
    """A checkpoint's review cut-off (ship_checkpoint.py --uncertainty_cutoff) when it was chosen for this METHOD
    (a checkpoint that names no method is taken as this one), else None."""
    if meta.get("uncertainty_cutoff") is None or meta.get("uncertainty_method", METHOD) != METHOD:
        return None
    return float(meta["uncertainty_cutoff"])
