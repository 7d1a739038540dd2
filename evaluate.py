"""Evaluate a checkpoint with the metrics the BUSI literature reports, at each image's original resolution.

    python evaluate.py --checkpoint runs/resnet18/last.safetensors           # its stored validation split
    python evaluate.py --checkpoint ck.safetensors --data_dir data/BUSI --split all
    python evaluate.py --manifest external.csv --checkpoint ck.safetensors   # every image of the manifest
    python evaluate.py --manifest BUS-UCLM.csv --subgroups doppler,marks     # with per-subgroup rows
    python evaluate.py --checkpoint runs/r18/best.safetensors --tune_threshold   # choose the post-processing
    python evaluate.py --gather "runs/fold*/eval/summary.json"               # mean +/- std over K folds

Every number is computed at the image's ORIGINAL resolution: the predicted probabilities are resized back
(bilinear) before the threshold, and compared with the union of the image's mask files. The metric
mathematics lives in metrics.py; this file is the command-line tool around it.

Post-processing (predict.decide), each setting from the command line or, when negative, from the checkpoint:
threshold on the lesion probability; min_area, the smallest lesion component kept (pixels at the network's
input size, scaled to each image's size); normal_gate, for a checkpoint with a classification head: the
mask is cleared when the head's P(normal) is at least this (1.0: only at certainty).

Per image (per_image.csv):
  dice / iou      lesion Dice and IoU: the union of the lesion channels against the union of the masks (the
                  number published BUSI results use), under two conventions for empty true masks (below);
  precision,      pixel precision TP/(TP+FP) and recall TP/(TP+FN) of the lesion; undefined (empty cell) when
  recall          nothing is predicted, resp. when the mask is empty;
  hd95            95th percentile of the symmetric surface distance in pixels, MedPy's definition: the
                  distances from every boundary pixel of the prediction to the mask's boundary and from every
                  boundary pixel of the mask to the prediction's boundary, pooled, then the 95th percentile
                  (boundary = pixels with a 4-neighbour outside); undefined when either is empty;
  dice_<class>    per-class Dice/IoU of one output channel (benign, malignant): the channel's pixels (each
                  lesion pixel goes to its most probable class) against the mask when the image is of that
                  class, against an empty mask otherwise;
  labels          image-level class from the prediction (predict.decide): without a head, normal when no
                  pixel passes, else the lesion class holding the most probability; with a head, from it;
  malignancy      P(malignant | lesion): from the head, else the malignant share of the lesion's probability
                  (empty when nothing is predicted by a model without a head); p_normal: the head's P(normal);
  complete_miss   lesion images: 1 when nothing predicted touches the lesion (nothing at all, or only
                  elsewhere), else 0; false_positive: normal images: 1 when any lesion is predicted;
  patient         the manifest's patient id ("" if none); then one column per --subgroups column.

Empty masks (normal images): both conventions are reported, since papers differ:
  (a) "_a": an image whose true mask (or, per class, whose channel's true mask) is empty is left out of the
      Dice/IoU mean and judged at image level only: an empty prediction is a true negative, anything else a
      false positive (summary "empty_masks"), as nnU-Net does;
  (b) "_b": an empty prediction on an empty mask scores 1, a non-empty prediction on an empty mask scores 0.
Summaries (mean, population std, median, n) are given for benign+malignant images ("lesion", the usual
protocol; its dice_a is THE lesion Dice) and for all images ("all"). Image-level classification: confusion
matrix (rows true, columns predicted), accuracy, per-class sensitivity and specificity.

The figures that matter on another scanner's images (summary "figures", printed after the table): lesion
Dice and IoU (lesion images), the complete-miss rate (lesion images), the share of normal images given a
lesion, benign-vs-malignant ROC-AUC of the malignancy over lesion images (an image with no malignancy counts
0.5: no opinion), sensitivity and specificity for malignant with malignancy >= 0.5 called malignant (no
malignancy: not called), and the expected calibration error of the malignancy (10 equal-width bins; table in
"reliability", picture reliability.png). "intervals": 95% percentile bootstrap intervals (--bootstrap
resamples, seed 0) of lesion Dice, IoU, miss rate, normal false-positive share and AUC, drawing whole
patients when the data has patient ids, else images. "subgroups": those figures for every value of every
--subgroups manifest column.

--tune_threshold runs the network once and sweeps threshold x min_area (x normal_gate for a checkpoint with a
head) on these images (validation images only!), choosing the highest mean Dice (b) over all images (ties:
threshold nearest 0.5, then the smaller min_area, then the higher gate), then evaluates at that setting.

Clinical read-out (evaluate_readout.py; summary "readout", columns pred_* / true_*, uncertainty, review):
--measure (on by default) measures the largest predicted and reference lesion of every image (measure.py): the
Bland-Altman agreement of the longest diameter (px, and mm where DICOM headers or --pixel_mm give the pixel size)
and the benign-vs-malignant ROC-AUC of each numeric shape cue; --uncertainty scores every image as predict.py
--uncertainty does and reports the risk-coverage curve, the Dice of flagged vs unflagged images and the review
cut-off chosen on these images (run it on the validation split; ship_checkpoint.py --uncertainty_cutoff stores it).

--box_prompt (summary "box_prompt"): what a box drawn around the lesion buys (the web page, predict.py --box):
LiteMedSAM's masks for a box around each lesion of the reference mask (its bounding box, widened as MedSAM's own
evaluation does), lesion Dice and IoU over the images with a lesion, per class and per image (box_prompt.py).

Written to out_dir: per_image.csv, summary.json, confusion_matrix.png, dice_per_class.png, reliability.png,
bland_altman.png, risk_coverage.png (--uncertainty);
the best/worst gallery (it holds image pixels) goes to gallery_dir, by default a git-ignored folder
(out_dir/gallery when out_dir is itself ignored or outside the repository, else private/eval_gallery/...).

K-fold: a split file made with train.py --folds K holds all folds; --fold i (default: the checkpoint's own
fold) evaluates fold i's validation images. --gather "runs/fold*/eval/summary.json" combines the per-fold
summaries into mean +/- std over folds (and, where per_image.csv files lie beside them, the pooled
out-of-fold numbers); with --out_dir it also writes folds_summary.json and folds.csv there.

train.py's per-epoch validation calls evaluate_set() below, so its logged val_dice is this module's lesion
Dice (convention a, benign+malignant images) for the same checkpoint and validation split.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from dataset import CLASS_NAMES, LESION_CLASSES, DataError, LoadedSet, parse_sources, read_split, save_json_atomic
from evaluate_readout import (add_measurements, add_uncertainty, format_readout, measurement_summary,
                              readout_columns, uncertainty_summary, write_readout_plots)
from metrics import (bootstrap_ci, classification_summary, complete_miss, confusion, dice_iou, dice_iou_counts,
                     expected_calibration_error, hd95, nanmean, precision_recall, roc_auc, sens_spec, stats)
from predict import decide, decide_full, scale_min_area, split_output, to_original

log = logging.getLogger("evaluate")

# ---- settings (edit here, or override on the command line: --split all)
checkpoint = "checkpoints/all_unet_efficientnet_lite0.safetensors"  # the model to evaluate
data_dir = ""                # BUSI-layout folder; empty: the data stored in the checkpoint's training settings
path_to_images = ""          # or: a folder of images ...
path_to_masks = ""           # ... and a folder of masks matched by file name
manifest = ""                # or: a CSV with columns image,mask,label (optional: patient and any other column)
default_label = ""           # label for two-folder data whose file names hold no class name
sources = ""                 # or named sources as in train.py ("busi=data/BUSI;uclm=x.csv"): keys "name/...", so a multi-source split applies
split_file = ""              # split JSON; empty: the one stored in the checkpoint (or beside it)
split = "auto"               # val, train or all; auto: val for the checkpoint's own data (at any path) or with split_file, else all
fold = -1                    # with a K-fold split file: the validation fold (-1: the checkpoint's)
out_dir = ""                 # where CSV, JSON and plots go; empty: <checkpoint folder>/eval (eval_<data>_<split> for other data)
gallery_dir = ""             # best/worst gallery (holds image pixels: keep out of git); empty: a git-ignored folder
gallery = 6                  # number of best and of worst cases in the gallery (0: none)
threshold = -1.0             # lesion probability threshold; < 0 uses the checkpoint's
min_area = -1.0              # smallest lesion component kept, in pixels at the network's input size; < 0 uses the checkpoint's (0 if none)
normal_gate = -1.0           # with a classification head: clear the mask when P(normal) >= this; < 0 uses the checkpoint's (1.0 if none)
tune_threshold = False       # sweep threshold, min_area (and normal_gate) on these images, report each, evaluate at the best (validation only!)
tune_gate = True             # tuning sweeps the normal gate too (models with a head); False: no gate (1.0) whatever validation says
recall_floor = 0.02          # tuning: the setting may leave empty at most this share of the lesion images that threshold 0.5 alone finds (< 0: no floor)
gate_keep = -1.0             # the normal gate never erases a mask whose mean lesion probability is at least this; < 0 uses the checkpoint's (1.0 if none)
subgroups = ""               # manifest columns for per-subgroup rows, comma-separated, e.g. doppler,marks
bootstrap = 1000             # bootstrap resamples for the 95% intervals (by patient where the data has patient ids; 0: none)
tta = False                  # average with the mirrored image
measure = True               # lesion measurements: Bland-Altman of the longest diameter vs the reference mask's, AUC of each shape cue (benign vs malignant)
pixel_mm = ""                # pixel size where the image gives none (DICOM headers are read): mm per pixel, or a CSV file,mm; empty: px only
uncertainty = False          # TTA uncertainty score per image: risk-coverage curve, Dice of flagged vs unflagged, the review cut-off (choose it on validation images)
uncertainty_cutoff = -1.0    # review flag above this score; < 0 uses the checkpoint's, else the one chosen on these images (Youden J for Dice < 0.5)
box_prompt = False           # also LiteMedSAM's masks for a box around each reference lesion (box_prompt.py): lesion Dice/IoU, what a drawn box buys
device = "auto"              # auto, cpu, cuda, mps
backend = "torch"            # torch, onnx (ONNX Runtime fp32) or onnx-int8 (INT8 model, quantize.py), as predict.py --backend
batch_size = 8               # images per forward pass
gather = ""                  # glob of summary.json files (one per fold) to combine into mean +/- std
# ---- end of settings

REPO = Path(__file__).resolve().parent
# Folders of this repository that .gitignore keeps out of git (tests check that it still does).
IGNORED_DIRS = ("runs", "private", "data", "sample_predictions/busi")

# Per-image metric columns, in the order of the CSV and the printed table.
METRIC_KEYS = ("dice_a", "iou_a", "dice_b", "iou_b", "precision", "recall", "hd95",
               *[f"{m}_{c}_{conv}" for c in LESION_CLASSES for conv in ("a", "b") for m in ("dice", "iou")])
# Per-image numbers beside the metrics (NaN where they do not apply: see the module docstring).
IMAGE_KEYS = ("malignancy", "p_normal", "complete_miss", "false_positive", "gate_cleared", "gate_conflict")
CSV_FIELDS = ["file", "true_label", "pred_label", "confidence", *METRIC_KEYS, "true_area", "pred_area",
              *[f"pred_area_{c}" for c in LESION_CLASSES], "height", "width", *IMAGE_KEYS, "patient"]

MALIGNANCY_CUTOFF = 0.5  # malignancy at or above it calls an image malignant (as predict.decide does with a head)
NO_MALIGNANCY = 0.5      # the score a lesion image with no malignancy gets in the AUC and the calibration
FIGURE_KEYS = ("lesion_dice", "lesion_iou", "miss_rate", "normal_fp_share", "auc")  # with intervals, per subgroup


# ---------------------------------------------------------------------------------------------------------
# Scoring one image
# ---------------------------------------------------------------------------------------------------------

def image_metrics(decision, true_mask: np.ndarray, true_label: str, with_hd95: bool = True) -> dict:
    """Every per-image number for one prediction (a predict.Decision at original resolution) against its
    ground truth (the union of the masks, bool H x W, and the image's label)."""
    nan = float("nan")
    pred = decision.lesion
    has_lesion = bool(true_mask.any())
    dice_b, iou_b = dice_iou(pred, true_mask, empty_score=1.0)
    prec, rec = precision_recall(pred, true_mask)
    row = {"true_label": true_label, "pred_label": decision.label, "confidence": float(decision.confidence),
           "dice_a": dice_b if has_lesion else nan, "iou_a": iou_b if has_lesion else nan,
           "dice_b": dice_b, "iou_b": iou_b, "precision": prec, "recall": rec,
           "hd95": hd95(pred, true_mask) if with_hd95 else nan,
           "true_area": int(true_mask.sum()), "pred_area": int(pred.sum()),
           "height": int(true_mask.shape[0]), "width": int(true_mask.shape[1]),
           "malignancy": float(decision.malignancy), "p_normal": float(decision.p_normal),
           "complete_miss": int(complete_miss(pred, true_mask)) if true_label in LESION_CLASSES else nan,
           "false_positive": int(pred.any()) if true_label == "normal" else nan,
           "gate_cleared": int(decision.gated), "gate_conflict": int(decision.gate_conflict)}
    empty = np.zeros_like(true_mask, dtype=bool)
    for c, name in enumerate(LESION_CLASSES):
        t = true_mask if true_label == name else empty
        d, j = dice_iou(decision.class_masks[c], t, empty_score=1.0)
        row[f"dice_{name}_b"], row[f"iou_{name}_b"] = d, j
        present = true_label == name and has_lesion
        row[f"dice_{name}_a"], row[f"iou_{name}_a"] = (d, j) if present else (nan, nan)
        row[f"pred_area_{name}"] = int(decision.class_masks[c].sum())
    return row


def sample_row(sample, decision, true_mask: np.ndarray, with_hd95: bool = True, subgroups=()) -> dict:
    """The per-image row of one dataset.Sample: file key, patient, metrics and its subgroup values. The
    patient is prefixed with the sample's source in multi-source data, like the file key."""
    patient, source = getattr(sample, "patient", ""), getattr(sample, "source", "")
    attrs = dict(getattr(sample, "attrs", ()))
    return {"file": sample.key, **image_metrics(decision, true_mask, sample.label, with_hd95),
            "patient": f"{source}/{patient}" if source and patient else patient,
            **{c: attrs.get(c, "") for c in subgroups}}


# ---------------------------------------------------------------------------------------------------------
# Summaries of per-image rows
# ---------------------------------------------------------------------------------------------------------

def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """The per-image numbers the figures need, as arrays over the rows (missing or empty cells: NaN)."""
    def col(key: str) -> np.ndarray:
        return np.asarray([float("nan") if r.get(key) in (None, "") else float(r[key]) for r in rows], dtype=float)
    label = np.asarray([r["true_label"] for r in rows], dtype=str)
    mal = col("malignancy")
    return {"lesion": np.isin(label, LESION_CLASSES), "normal": label == "normal", "malignant": label == "malignant",
            "dice": col("dice_a"), "iou": col("iou_a"), "miss": col("complete_miss"), "fp": col("false_positive"),
            "gated": np.nan_to_num(col("gate_cleared")), "conflict": np.nan_to_num(col("gate_conflict")),
            "true_area": col("true_area"), "pred_area": col("pred_area"), "image_area": col("height") * col("width"),
            "score": np.where(np.isnan(mal), NO_MALIGNANCY, mal), "called": mal >= MALIGNANCY_CUTOFF,
            "unscored": np.isnan(mal)}


def _take(cols: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in cols.items()}


FIGURES = {  # name: function of _columns(rows)
    "lesion_dice": lambda c: nanmean(c["dice"][c["lesion"]]),
    "lesion_iou": lambda c: nanmean(c["iou"][c["lesion"]]),
    "miss_rate": lambda c: nanmean(c["miss"][c["lesion"]]),
    "normal_fp_share": lambda c: nanmean(c["fp"][c["normal"]]),
    "auc": lambda c: roc_auc(c["malignant"][c["lesion"]], c["score"][c["lesion"]]),
}


SMALL_LESION = 0.05  # a lesion under this share of the image counts as small in the breakdown of the misses


def lesion_breakdown(c: dict[str, np.ndarray]) -> dict:
    """What the mean lesion Dice mixes: the Dice of the lesions found (not complete misses), the pooled Dice
    (twice the summed overlap over the summed areas: the figure papers often report, weighted to big lesions) and
    the share of complete misses whose lesion is under SMALL_LESION of the image."""
    les = c["lesion"]
    found = les & (c["miss"] == 0)
    areas = c["true_area"][les] + c["pred_area"][les]
    pooled = float(np.nansum(c["dice"][les] * areas) / areas.sum()) if les.any() and areas.sum() > 0 else float("nan")
    missed = les & (c["miss"] == 1)
    small = c["true_area"][missed] / c["image_area"][missed] < SMALL_LESION
    return {"found_lesion_dice": nanmean(c["dice"][found]), "n_found": int(found.sum()),
            "pooled_lesion_dice": pooled, "n_missed": int(missed.sum()),
            "small_miss_share": float(small.mean()) if missed.any() and not np.isnan(c["image_area"][missed]).any()
            else float("nan")}


def figures(rows: list[dict]) -> tuple[dict, list[dict]]:
    """(the off-domain figures, the reliability table of the malignancy on lesion images)."""
    c = _columns(rows)
    les = c["lesion"]
    sens, spec = sens_spec(c["malignant"][les], c["called"][les])
    ece, table = expected_calibration_error(c["malignant"][les], c["score"][les], bins=10)
    return {"n_lesion": int(les.sum()), "n_normal": int(c["normal"].sum()),
            **{k: FIGURES[k](c) for k in FIGURE_KEYS}, **lesion_breakdown(c),
            "sensitivity_malignant": sens, "specificity_malignant": spec, "malignancy_cutoff": MALIGNANCY_CUTOFF,
            "ece": ece, "n_lesion_without_malignancy": int(c["unscored"][les].sum()),
            "gate_cleared_lesion": int(c["gated"][les].sum()), "gate_cleared_normal": int(c["gated"][c["normal"]].sum()),
            "gate_kept_for_review": int(c["conflict"].sum())}, table


def intervals(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """95% percentile bootstrap intervals [low, high] of FIGURE_KEYS: whole patients are drawn when any row
    has a patient id (a row without one is its own unit), else single images."""
    c = _columns(rows)
    patients = [r.get("patient") or "" for r in rows]
    groups = [p or f"\0image {i}" for i, p in enumerate(patients)] if any(patients) else None
    out: dict = {"n_boot": n_boot, "seed": seed, "level": 0.95, "resampled_by": "patient" if groups else "image",
                 "n_units": len(set(groups)) if groups else len(rows)}
    index = np.arange(len(rows))
    for k in FIGURE_KEYS:
        out[k] = list(bootstrap_ci(index, lambda i, f=FIGURES[k]: f(_take(c, i)), groups, n_boot, seed))
    return out


def subgroup_rows(rows: list[dict], columns) -> list[dict]:
    """FIGURE_KEYS and counts for every value of every subgroup column."""
    c = _columns(rows)
    out = []
    for col in columns:
        values = np.asarray([str(r.get(col, "")) for r in rows], dtype=str)
        for v in sorted(set(values.tolist())):
            sub = _take(c, values == v)
            out.append({"column": col, "value": v, "n": int((values == v).sum()), "n_lesion": int(sub["lesion"].sum()),
                        "n_normal": int(sub["normal"].sum()), **{k: FIGURES[k](sub) for k in FIGURE_KEYS}})
    return out


def summarize(rows: list[dict], subgroups=(), n_boot: int = 0) -> dict:
    """Mean/std/median of every metric for the lesion subset (benign+malignant) and for all images, the
    image-level judgement of empty masks (convention a), the image-level classification, the off-domain
    figures with the reliability table, per-subgroup rows (when columns are given) and bootstrap intervals
    (when n_boot > 0)."""
    out = {}
    subsets = {"lesion": [r for r in rows if r["true_label"] in LESION_CLASSES], "all": rows}
    for name, rs in subsets.items():
        s: dict = {"n_images": len(rs)}
        for key in METRIC_KEYS:
            s[key] = stats(r[key] for r in rs)
        empty = [r for r in rs if r["true_area"] == 0]
        tn = sum(r["pred_area"] == 0 for r in empty)
        s["empty_masks"] = {"n": len(empty), "true_negative": tn, "false_positive": len(empty) - tn,
                            "true_negative_rate": tn / len(empty) if empty else float("nan")}
        out[name] = s
    out["classification"] = classification_summary(confusion([r["true_label"] for r in rows],
                                                             [r["pred_label"] for r in rows]))
    out["figures"], out["reliability"] = figures(rows)
    if subgroups:
        out["subgroups"] = subgroup_rows(rows, subgroups)
    if n_boot > 0:
        out["intervals"] = intervals(rows, n_boot)
    return out


def headline(summary: dict) -> dict:
    """The few numbers logged every epoch and shown first."""
    f = summary.get("figures", {})
    return {"dice": summary["lesion"]["dice_a"]["mean"], "iou": summary["lesion"]["iou_a"]["mean"],
            "dice_all_b": summary["all"]["dice_b"]["mean"], "accuracy": summary["classification"]["accuracy"],
            **{k: f.get(k, float("nan")) for k in ("miss_rate", "normal_fp_share", "auc")}}


# ---------------------------------------------------------------------------------------------------------
# Evaluating a loaded set
# ---------------------------------------------------------------------------------------------------------

def _predicted_batches(predictor, data: LoadedSet, batch_size: int, tta: bool):
    """(index of the batch's first image, lesion logits float32, image-label logits float32 or None) for
    every batch of the set, in order. The predictor returns lesion logits, or (lesion, label) logits."""
    for i in range(0, len(data), batch_size):
        seg, cls = split_output(predictor(data.images[i:i + batch_size], batch_size, tta))
        yield i, seg.float(), (None if cls is None else cls.float())


def _probabilities(seg: torch.Tensor, cls: torch.Tensor | None):
    """(lesion probabilities C x S x S, class probabilities over CLASS_NAMES or None) for each image."""
    if cls is not None and cls.shape[-1] != len(CLASS_NAMES):
        raise DataError(f"the classification head gives {cls.shape[-1]} classes, expected {len(CLASS_NAMES)} "
                        f"({', '.join(CLASS_NAMES)})")
    probs = torch.sigmoid(seg)
    cls_probs = None if cls is None else torch.softmax(cls, dim=-1)
    for j in range(seg.shape[0]):
        yield probs[j], (None if cls_probs is None else cls_probs[j])


def _area_px(min_area: float, data: LoadedSet, shape: tuple[int, int]) -> float:
    """A minimum area in pixels of the network input, in pixels of an image of this shape."""
    return scale_min_area(min_area, data.images.shape[-1], shape)


def evaluate_set(predictor, data: LoadedSet, threshold: float, batch_size: int = 8, tta: bool = False,
                 with_hd95: bool = True, masks: dict | None = None, *, min_area: float = 0.0,
                 normal_gate: float = 1.0, gate_keep: float = 1.0, subgroups=(), n_boot: int = 0
                 ) -> tuple[list[dict], dict]:
    """Predict every image of a loaded set and score it at its original resolution.

    predictor: callable (uint8 N x 1 x S x S, batch size, tta) -> lesion logits N x C x S x S, or a tuple
    (lesion logits, image-label logits N x 3 over CLASS_NAMES) for a model with a classification head.
    min_area (pixels at the network's input size), normal_gate and gate_keep: predict.decide's post-processing.
    masks: if a dict is given, each image's predicted lesion mask is stored in it (packed bits, see unpack_mask).
    subgroups: manifest columns copied into the rows and summarised per value; n_boot: bootstrap resamples.
    Returns (per-image rows, summary). The summary's "val_loss" is the pixel-wise BCE at network resolution.
    """
    rows, bce_sum = [], 0.0
    for i, seg, cls in _predicted_batches(predictor, data, batch_size, tta):
        target = torch.as_tensor(data.targets[i:i + batch_size]).float()
        if seg.shape[1] == 1 < target.shape[1]:  # a class-agnostic model: scored against the union of the classes
            target = target.amax(1, keepdim=True)
        bce_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(seg, target, reduction="sum"))
        for j, (probs, cls_probs) in enumerate(_probabilities(seg, cls)):
            s, full = data.samples[i + j], data.full_masks[i + j]
            d = decide_full(probs, full.shape, threshold, _area_px(min_area, data, full.shape), cls_probs,
                            normal_gate, gate_keep)
            rows.append(sample_row(s, d, full, with_hd95, subgroups))
            if masks is not None:
                masks[s.key] = (np.packbits(d.lesion), d.lesion.shape)
    summary = summarize(rows, subgroups, n_boot)
    summary["val_loss"] = bce_sum / max(1, data.targets.size)
    return rows, summary


def unpack_mask(packed) -> np.ndarray:
    bits, shape = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


# ---------------------------------------------------------------------------------------------------------
# Choosing the post-processing: threshold x minimum area (x normal gate)
# ---------------------------------------------------------------------------------------------------------

THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(2, 19))  # 0.10, 0.15, ..., 0.90
MIN_AREA_GRID = (0.0, 10.0, 20.0, 40.0, 80.0, 160.0)              # pixels at the network's input size
GATE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)              # only for checkpoints with a head


def _component_counts(probs: torch.Tensor, true: np.ndarray, thresholds, areas_px) -> tuple[np.ndarray, ...]:
    """predict.decide_full's mask for many settings at once, reduced to what the sweep needs: for each threshold
    x minimum area (pixels of this image), the overlap with the true mask, the predicted area, the lesion
    class holding the most probability (index into LESION_CLASSES), the summed top probability of the kept
    pixels (the gate's keep rule reads its mean), and per threshold the area before the minimum area. Each
    threshold's connected components (8-connectivity) are labelled once; a minimum area keeps those of at
    least that many pixels. probs: network-size probabilities; the components are found at the image's working
    resolution (dataset.working_size) and counted in full-size pixels."""
    from scipy import ndimage

    from dataset import block_edges, working_size
    work = working_size(true.shape)
    p = to_original(probs, work).float().numpy()
    top = p.max(0)
    weight, mass_p, mass_top = None, p, top  # full-size pixels per working pixel (None: the image is its own)
    if work != true.shape:
        rows, cols = block_edges(true.shape[0], work[0]), block_edges(true.shape[1], work[1])
        weight = np.outer(np.diff(rows), np.diff(cols)).astype(np.float32)
        true = np.add.reduceat(np.add.reduceat(true, rows[:-1], axis=0, dtype=np.int32), cols[:-1], axis=1)
        mass_p, mass_top = p * weight, top * weight  # probability summed over full-size pixels
    shape = (len(thresholds), len(areas_px))
    inter, area, cls, top_mass = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=int), np.zeros(shape)
    raw = np.zeros((len(thresholds), 1))
    for ti, t in enumerate(thresholds):
        lab, n = ndimage.label(top > np.float32(t), structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        flat = lab.ravel()
        size = np.bincount(flat, weights=None if weight is None else weight.ravel(), minlength=n + 1)[1:]
        over = np.bincount(flat, weights=true.ravel(), minlength=n + 1)[1:]
        mass = np.stack([np.bincount(flat, weights=ch.ravel(), minlength=n + 1)[1:] for ch in mass_p])
        tmass = np.bincount(flat, weights=mass_top.ravel(), minlength=n + 1)[1:]
        raw[ti] = size.sum()
        for ai, a in enumerate(areas_px):
            keep = size >= a
            inter[ti, ai], area[ti, ai], top_mass[ti, ai] = over[keep].sum(), size[keep].sum(), tmass[keep].sum()
            cls[ti, ai] = int(mass[:, keep].sum(1).argmax())
    return inter, area, cls, top_mass, np.broadcast_to(raw, shape)


def _head_view(cls_probs: torch.Tensor | None) -> tuple[float, float]:
    """(P(normal), malignancy) of the head as predict.decide reads them; (NaN, NaN) without a head."""
    if cls_probs is None:
        return float("nan"), float("nan")
    d = decide(torch.zeros(len(LESION_CLASSES), 1, 1), 1.0, cls_probs=cls_probs)  # nothing passes 1.0
    return d.p_normal, d.malignancy


def _sweep_figures(inter, area, true_area, labels, pred_idx) -> dict[str, np.ndarray]:
    """The sweep's headline numbers, each an array over the settings, from per-image counts (arrays images x
    thresholds x minimum areas; true_area images x 1 x 1) and the predicted class index of each."""
    dice_b, iou_b = dice_iou_counts(inter, area, true_area)
    lesion, normal = np.isin(labels, LESION_CLASSES), labels == "normal"
    measured = lesion & (true_area[:, 0, 0] > 0)
    true_idx = np.asarray([CLASS_NAMES.index(t) for t in labels])
    shape = inter.shape[1:]

    def mean(v, sel):
        return v[sel].mean(0) if sel.any() else np.full(shape, np.nan)
    return {"dice": mean(dice_b, measured), "iou": mean(iou_b, measured), "dice_all_b": dice_b.mean(0),
            "accuracy": (pred_idx == true_idx[:, None, None]).mean(0),
            "miss_rate": mean((true_area > 0) & (inter == 0), lesion), "normal_fp_share": mean(area > 0, normal)}


def _sweep_rows(counts, data: LoadedSet, heads, thresholds, min_areas, gates, gate_keep: float = 1.0) -> list[dict]:
    """One row per threshold x min_area x gate from the per-image counts of _component_counts. cleared_share:
    the share of lesion images that the neutral setting found (the grid's threshold nearest 0.5, no minimum
    area, no gate) but this setting leaves empty (a higher threshold, min_area or the gate erased them)."""
    inter, area, cls, top_mass, raw = (np.stack([c[k] for c in counts]) for k in range(5))
    neutral = int(np.argmin([abs(t - 0.5) for t in thresholds]))
    found = raw[:, neutral:neutral + 1, :1] > 0  # images x 1 x 1
    true_area = np.asarray([m.sum() for m in data.full_masks], dtype=float)[:, None, None]
    labels = np.asarray([s.label for s in data.samples], dtype=str)
    lesion = np.isin(labels, LESION_CLASSES)
    p_normal, malignancy = (np.asarray([h[k] for h in heads], dtype=float)[:, None, None] for k in range(2))
    lesion_idx = np.asarray([CLASS_NAMES.index(c) for c in LESION_CLASSES])
    confident = top_mass >= gate_keep * np.maximum(area, 1e-9)  # mean top probability of the kept mask
    by_gate = []
    for g in gates:
        gated = (p_normal >= g) & ~confident  # NaN (no head): never
        a, i_ = np.where(gated, 0.0, area), np.where(gated, 0.0, inter)
        called = np.where(np.isnan(malignancy), lesion_idx[cls],
                          np.where(malignancy >= MALIGNANCY_CUTOFF, CLASS_NAMES.index("malignant"),
                                   CLASS_NAMES.index("benign")))
        pred_idx = np.where(a > 0, called, CLASS_NAMES.index("normal"))
        figs = _sweep_figures(i_, a, true_area, labels, pred_idx)
        cleared = found & (a == 0)
        figs["cleared_share"] = cleared[lesion].mean(0) if lesion.any() else np.zeros(a.shape[1:])
        by_gate.append(figs)
    return [{"threshold": float(t), "min_area": float(m), "normal_gate": float(g),
             **{k: float(v[ti, ai]) for k, v in by_gate[gi].items()}}
            for ti, t in enumerate(thresholds) for ai, m in enumerate(min_areas) for gi, g in enumerate(gates)]


def threshold_sweep(predictor, data: LoadedSet, grid=THRESHOLD_GRID, batch_size: int = 8, tta: bool = False,
                    min_areas=(0.0,), gates=(1.0,), gate_keep: float = 1.0) -> list[dict]:
    """The headline numbers (lesion Dice/IoU, all-image Dice (b), accuracy, miss rate, normal false-positive
    share) at every threshold x minimum area (pixels at the network's input size) x normal gate (used only
    when the predictor has a classification head; else 1.0 alone).

    The network runs once; each image's probabilities, resized to its original size, are reduced at once to
    the counts every setting needs (_component_counts), so nothing of full size is kept. Choose with
    choose_setting() on validation images only.
    """
    counts, heads = [], []
    for i, seg, cls in _predicted_batches(predictor, data, batch_size, tta):
        for j, (probs, cls_probs) in enumerate(_probabilities(seg, cls)):
            full = data.full_masks[i + j]
            areas = [_area_px(a, data, full.shape) for a in min_areas]
            counts.append(_component_counts(probs, full, grid, areas))
            heads.append(_head_view(cls_probs))
    if not counts:
        return []
    if any(np.isnan(h[0]) for h in heads):
        gates = (1.0,)
    return _sweep_rows(counts, data, heads, grid, min_areas, gates, gate_keep)


# Settings whose all-image Dice (b) is within this of the best are a tie: on a validation set of a few dozen
# normal images that is one image. Among them the one that clears the fewest masks wins (a missed lesion costs
# more than a second look at a normal scan, and off-domain an aggressive gate mostly adds misses).
TUNE_TOLERANCE = 0.005


def choose_setting(sweep: list[dict], tolerance: float = TUNE_TOLERANCE, recall_floor: float | None = None) -> dict:
    """The sweep row with the highest mean Dice (b) over ALL images: it rewards lesion overlap and empty
    predictions on normal images alike, so it cannot buy lesion Dice with false positives. Rows within
    `tolerance` of the best count as ties; among them: the higher normal_gate (1.0: no gate), then the threshold
    nearest 0.5, then the smaller min_area.
    recall_floor: only rows that leave empty at most this share of the lesion images the neutral setting found
    (cleared_share: threshold 0.5, no minimum area, no gate) are candidates; the neutral setting always qualifies."""
    if recall_floor is not None:
        sweep = [r for r in sweep if r.get("cleared_share", 0.0) <= recall_floor + 1e-12]
    best = max(round(r["dice_all_b"], 6) for r in sweep)
    near = [r for r in sweep if round(r["dice_all_b"], 6) >= best - tolerance]
    return max(near, key=lambda r: (r.get("normal_gate", 1.0), -abs(r["threshold"] - 0.5), -r.get("min_area", 0.0),
                                    round(r["dice_all_b"], 6)))


def choose_threshold(sweep: list[dict]) -> float:
    """The threshold of choose_setting(sweep)."""
    return choose_setting(sweep)["threshold"]

# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------

def _num(v, width: int = 8, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    return f"{v:>{width}.{digits}f}"


def format_table(summary: dict) -> str:
    lines = [f"{'metric':<20}{'subset':<8}{'mean':>10}{'std':>10}{'median':>10}{'n':>6}"]
    for subset in ("lesion", "all"):
        for key in METRIC_KEYS:
            st = summary[subset][key]
            lines.append(f"{key:<20}{subset:<8}{_num(st['mean'], 10)}{_num(st['std'], 10)}{_num(st['median'], 10)}"
                         f"{st['n']:>6}")
    for subset in ("lesion", "all"):
        e = summary[subset]["empty_masks"]
        if e["n"]:
            lines.append(f"empty masks ({subset}): {e['n']}, predicted empty (true negative) {e['true_negative']}, "
                         f"not empty (false positive) {e['false_positive']}")
    c = summary["classification"]
    lines.append(f"image-level accuracy {_num(c['accuracy'], 0)}   confusion (rows true, cols pred: "
                 f"{', '.join(c['classes'])}): {c['confusion_matrix']}")
    for name in c["classes"]:
        lines.append(f"  {name:<10} sensitivity {_num(c['sensitivity_' + name], 0)}  "
                     f"specificity {_num(c['specificity_' + name], 0)}")
    if "val_loss" in summary:
        lines.append(f"validation loss (BCE) {summary['val_loss']:.5f}")
    lines.append(f"lesion Dice (benign+malignant, convention a): {_num(summary['lesion']['dice_a']['mean'], 0)}  "
                 f"IoU {_num(summary['lesion']['iou_a']['mean'], 0)}  (n={summary['lesion']['dice_a']['n']})")
    return "\n".join(lines + format_figures(summary))


def format_figures(summary: dict) -> list[str]:
    """The off-domain figures, with their bootstrap intervals in brackets, and the subgroup rows."""
    f, ci = summary.get("figures"), summary.get("intervals", {})
    if not f:
        return []

    def v(key: str) -> str:
        text = _num(f[key], 0)
        return text + (f" [{_num(ci[key][0], 0)}, {_num(ci[key][1], 0)}]" if key in ci else "")
    lines = [f"lesion images ({f['n_lesion']}): Dice {v('lesion_dice')}  IoU {v('lesion_iou')}  "
             f"complete misses {v('miss_rate')}",
             f"  found lesions ({f['n_found']}): Dice {_num(f['found_lesion_dice'], 0)}  pooled Dice (all lesion images) "
             f"{_num(f['pooled_lesion_dice'], 0)}  misses under {SMALL_LESION:.0%} of the image: "
             f"{_num(f['small_miss_share'], 0)} of {f['n_missed']}",
             f"normal images ({f['n_normal']}): share given a lesion {v('normal_fp_share')}",
             f"benign vs malignant (malignancy, lesion images): ROC-AUC {v('auc')}  at {f['malignancy_cutoff']}: "
             f"sensitivity {_num(f['sensitivity_malignant'], 0)} specificity {_num(f['specificity_malignant'], 0)}  "
             f"ECE {_num(f['ece'], 0)}"]
    if ci:
        lines.append(f"[95% bootstrap intervals: {ci['n_boot']} resamples of {ci['n_units']} "
                     f"{'patients' if ci['resampled_by'] == 'patient' else 'images'}]")
    if summary.get("subgroups"):
        lines.append(f"{'subgroup':<24}{'n':>6}{'lesion':>8}{'normal':>8}{'Dice':>8}{'IoU':>8}{'miss':>8}"
                     f"{'normal FP':>10}{'AUC':>8}")
        for r in summary["subgroups"]:
            lines.append(f"{(r['column'] + '=' + r['value'])[:23]:<24}{r['n']:>6}{r['n_lesion']:>8}{r['n_normal']:>8}"
                         + "".join(_num(r[k], w) for k, w in zip(FIGURE_KEYS, (8, 8, 8, 10, 8))))
    return lines


def format_sweep(sweep: list[dict], chosen: dict | None = None) -> str:
    """Tables of the sweep at the chosen normal gate (rows: threshold, columns: min_area), and the chosen
    threshold and min_area across the gates when there are several."""
    chosen = chosen or choose_setting(sweep)
    gate = chosen.get("normal_gate", 1.0)
    at_gate = {(r["threshold"], r.get("min_area", 0.0)): r for r in sweep if r.get("normal_gate", 1.0) == gate}
    thresholds, areas = sorted({t for t, _ in at_gate}), sorted({a for _, a in at_gate})
    lines = []
    for key, title in (("dice_all_b", "Dice (b) over all images (the criterion)"), ("dice", "lesion Dice"),
                       ("normal_fp_share", "share of normal images given a lesion")):
        lines.append(f"{title}{f' at normal_gate {gate}' if gate < 1 else ''}; rows: threshold, "
                     f"columns: min_area (pixels at the network's input size)")
        lines.append(f"{'':>9}" + "".join(f"{a:>9g}" for a in areas))
        lines += [f"{t:>9.2f}" + "".join(_num(at_gate[(t, a)][key], 9) for a in areas) for t in thresholds]
    gates = [r for r in sweep if (r["threshold"], r.get("min_area", 0.0)) == (chosen["threshold"],
                                                                              chosen.get("min_area", 0.0))]
    if len(gates) > 1:
        lines.append(f"at threshold {chosen['threshold']}, min_area {chosen.get('min_area', 0.0):g}: "
                     + ", ".join(f"normal_gate {r['normal_gate']}: Dice (b) {_num(r['dice_all_b'], 0)}" for r in gates))
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict], extra_fields=()) -> None:
    """The per-image CSV (CSV_FIELDS, then extra_fields: the subgroup columns); undefined values (NaN) are
    written as empty cells."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *extra_fields], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6f}" if isinstance(v, float)
                            else v) for k, v in r.items()})


def read_rows(path: Path) -> list[dict]:
    """A per-image CSV back as rows (numbers as float/int, empty cells as NaN)."""
    ints = {"true_area", "pred_area", "height", "width", *[f"pred_area_{c}" for c in LESION_CLASSES]}
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            for k in list(r):
                if k in ints:
                    r[k] = int(r[k])
                elif k in METRIC_KEYS or k in IMAGE_KEYS or k == "confidence":
                    r[k] = float(r[k]) if r[k] != "" else float("nan")
            out.append(r)
    return out


def json_safe(obj):
    """NaN/inf -> None (null), numpy scalars -> Python numbers: strict JSON that any reader accepts."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_confusion(path: Path, summary: dict) -> None:
    plt = _plt()
    c = summary["classification"]
    cm = np.asarray(c["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v <= cm.max() / 2 else "white")
    ax.set_xticks(range(len(c["classes"])), c["classes"])
    ax.set_yticks(range(len(c["classes"])), c["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = c["accuracy"]
    ax.set_title(f"image-level accuracy {acc:.3f}" if acc is not None and acc == acc else "image-level")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(path: Path, summary: dict) -> None:
    """Reliability diagram of the malignancy on lesion images: the observed share of malignant images in
    each probability bin against the bin's mean malignancy (the diagonal is perfect calibration)."""
    plt = _plt()
    table = [b for b in summary["reliability"] if b["count"]]
    f = summary["figures"]
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="perfectly calibrated")
    width = summary["reliability"][0]["upper"] - summary["reliability"][0]["lower"]
    ax.bar([b["lower"] + width / 2 for b in table], [b["observed"] for b in table], width=0.9 * width, alpha=0.35,
           color="tab:blue", label="share malignant in the bin")
    ax.plot([b["mean_prob"] for b in table], [b["observed"] for b in table], "o-", ms=4, color="tab:red",
            label="at the bin's mean malignancy")
    for b in table:
        ax.text(b["lower"] + width / 2, min(1.0, b["observed"]) + 0.02, str(b["count"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("predicted malignancy")
    ax.set_ylabel("observed share malignant")
    ece = f["ece"]
    ax.set_title(f"lesion images (n={f['n_lesion']}): ECE {ece:.3f}" if ece == ece else "lesion images", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dice_distribution(path: Path, rows: list[dict]) -> None:
    """Box plot (with every image as a dot) of the per-image lesion Dice by true class (convention b, so
    normal images show 1 for an empty prediction and 0 otherwise)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    data = [[r["dice_b"] for r in rows if r["true_label"] == c] for c in CLASS_NAMES]
    ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        if d:
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=6, alpha=0.4, color="tab:blue")
    ax.set_xticks(range(1, len(CLASS_NAMES) + 1), [f"{c}\n(n={len(d)})" for c, d in zip(CLASS_NAMES, data)])
    ax.set_ylabel("lesion Dice per image (convention b)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Dice per image, by true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gallery_picks(rows: list[dict], k: int) -> list[tuple[str, dict]]:
    """The k worst and k best images with a lesion by Dice (an image is shown once)."""
    lesion = sorted((r for r in rows if r["true_area"] > 0), key=lambda r: r["dice_b"])
    worst = lesion[:k]
    shown = {r["file"] for r in worst}
    best = [r for r in lesion[::-1][:k] if r["file"] not in shown]
    return [("worst", r) for r in worst] + [("best", r) for r in best]


def plot_gallery(path: Path, rows: list[dict], data: LoadedSet, pred_masks: dict, k: int) -> bool:
    """Best and worst lesion images by Dice: image, true outline (green) and predicted outline (red).
    pred_masks: {file key: packed mask or bool mask}. Returns False when there is nothing to show."""
    from dataset import load_image
    picks = gallery_picks(rows, k)
    if not picks:
        return False
    plt = _plt()
    index = {s.key: i for i, s in enumerate(data.samples)}
    cols = min(max(k, 1), 6)
    nrows = -(-len(picks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (kind, r) in zip(axes.flat, picks):
        i = index[r["file"]]
        pred = pred_masks[r["file"]]
        pred = unpack_mask(pred) if isinstance(pred, tuple) else pred
        ax.imshow(load_image(data.samples[i].image), cmap="gray")
        ax.contour(data.full_masks[i], levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{kind}: {Path(r['file']).name}\nDice {r['dice_b']:.2f} "
                     f"({r['true_label']} -> {r['pred_label']})", fontsize=8)
    fig.suptitle("green: true outline, red: predicted outline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def is_git_ignored_location(path: Path) -> bool:
    """True when path lies outside this repository or inside one of the folders .gitignore excludes."""
    p = Path(path).resolve()
    try:
        rel = p.relative_to(REPO)
    except ValueError:
        return True
    return any(rel.parts[:len(Path(d).parts)] == Path(d).parts for d in IGNORED_DIRS)


def default_gallery_dir(out: Path) -> Path:
    """out/gallery when out is not tracked by git; otherwise (e.g. checkpoints/eval) a folder under private/,
    since the gallery holds image pixels (BUSI images must never be committed)."""
    out = Path(out)
    if is_git_ignored_location(out):
        return out / "gallery"
    rel = out.resolve().relative_to(REPO)
    return REPO / "private" / "eval_gallery" / ("_".join(rel.parts) or "eval")


# ---------------------------------------------------------------------------------------------------------
# K-fold: gathering per-fold summaries
# ---------------------------------------------------------------------------------------------------------

GATHER_KEYS = {  # name in the fold table: path in summary.json (a stats dict's mean, or a number)
    "lesion_dice": ("lesion", "dice_a"), "lesion_iou": ("lesion", "iou_a"),
    "lesion_precision": ("lesion", "precision"), "lesion_recall": ("lesion", "recall"),
    "lesion_hd95": ("lesion", "hd95"),
    **{f"dice_{c}": ("lesion", f"dice_{c}_a") for c in LESION_CLASSES},
    "all_dice_b": ("all", "dice_b"), "all_iou_b": ("all", "iou_b"),
    "accuracy": ("classification", "accuracy"),
    **{k: ("figures", k) for k in ("miss_rate", "normal_fp_share", "auc", "ece")},
    **{f"{m}_{c}": ("classification", f"{m}_{c}") for c in CLASS_NAMES for m in ("sensitivity", "specificity")},
}


def _get(summary: dict, path: tuple[str, ...]) -> float:
    v = summary
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
        if v is None:
            return float("nan")
    if isinstance(v, dict):
        v = v.get("mean")
    return float("nan") if v is None else float(v)


def gather_folds(pattern: str) -> dict:
    """Combine per-fold summary.json files (glob pattern; several joined by ';') into mean +/- std over folds
    (population std, ddof 0) of each headline metric. Where every summary has its per_image.csv beside it,
    also the pooled out-of-fold numbers (each image counted once over all folds)."""
    files = sorted({f for p in pattern.split(";") if p.strip() for f in glob.glob(p.strip(), recursive=True)})
    if not files:
        raise DataError(f"{pattern}: no summary files match")
    per_fold, seen = [], {}
    for f in files:
        try:
            s = json.loads(Path(f).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: not a readable summary.json ({e})") from None
        if "lesion" not in s or "classification" not in s:
            raise DataError(f"{f}: not a summary.json written by evaluate.py")
        ident = (s.get("split_file"), s.get("fold"), s.get("checkpoint"))
        if ident in seen:
            log.warning("%s and %s evaluate the same fold of the same split with the same checkpoint", seen[ident], f)
        seen[ident] = f
        per_fold.append({"file": f, "fold": s.get("fold"), "n_images": s.get("all", {}).get("n_images"),
                         **{k: _get(s, path) for k, path in GATHER_KEYS.items()}})
    combined = {}
    for k in GATHER_KEYS:
        vals = np.asarray([p[k] for p in per_fold], dtype=float)
        vals = vals[~np.isnan(vals)]
        combined[k] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                       "std": float(vals.std()) if vals.size else float("nan"), "n_folds": int(vals.size)}
    result = {"folds": per_fold, "combined": combined, "n_folds": len(per_fold)}
    csvs = [Path(f).parent / "per_image.csv" for f in files]
    if all(p.is_file() for p in csvs):
        rows = [r for p in csvs for r in read_rows(p)]
        keys = [r["file"] for r in rows]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            log.warning("%d image(s) appear in more than one fold (e.g. %s): the folds overlap", len(repeated),
                        repeated[:3])
        pooled = summarize(rows)
        result["pooled"] = {"n_images": len(rows), "repeated_images": len(repeated),
                            **{k: _get(pooled, path) for k, path in GATHER_KEYS.items()},
                            "confusion_matrix": pooled["classification"]["confusion_matrix"]}
    return result


def format_gather(result: dict) -> str:
    folds = result["folds"]
    names = [f"fold {p['fold']}" if p["fold"] is not None else f"#{i}" for i, p in enumerate(folds)]
    head = f"{'metric':<22}" + "".join(f"{n:>10}" for n in names) + f"{'mean':>10}{'std':>10}"
    if "pooled" in result:
        head += f"{'pooled':>10}"
    lines = [head]
    for k in GATHER_KEYS:
        c = result["combined"][k]
        line = f"{k:<22}" + "".join(_num(p[k], 10) for p in folds) + _num(c["mean"], 10) + _num(c["std"], 10)
        if "pooled" in result:
            line += _num(result["pooled"][k], 10)
        lines.append(line)
    lines.append(f"images per fold: {[p['n_images'] for p in folds]}; "
                 f"lesion Dice over {result['n_folds']} folds: {_num(result['combined']['lesion_dice']['mean'], 0)} "
                 f"+/- {_num(result['combined']['lesion_dice']['std'], 0)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def _own_data(cfg: dict) -> bool:
    return bool(cfg["data_dir"] or cfg["path_to_images"] or cfg["manifest"] or cfg.get("sources"))


def effective_split(cfg: dict) -> str:
    s = cfg["split"]
    if s == "auto":
        return "val" if (not _own_data(cfg) or cfg["split_file"]) else "all"
    if s not in ("val", "train", "all"):
        raise DataError(f"split must be auto, val, train or all, got {s!r}")
    return s


def find_split_file(cfg: dict, meta: dict) -> Path:
    """The split file: --split_file, else the one named in the checkpoint, else the same name beside it."""
    if cfg["split_file"]:
        p = Path(cfg["split_file"])
        if not p.is_file():
            raise DataError(f"{p}: split file not found")
        return p
    stored = meta.get("split_file", "")
    candidates = [Path(stored)] if stored else []
    candidates.append(Path(cfg["checkpoint"]).parent / (Path(stored).name if stored else "split.json"))
    for p in candidates:
        if p.is_file():
            return p
    raise DataError(f"split file not found (looked for {', '.join(str(c) for c in candidates)}); "
                    f"give --split_file, or --split all to evaluate every image")


def _holds_checkpoint_split(cfg: dict, meta: dict, samples: list) -> bool:
    """True when data given on the command line holds exactly the images of the checkpoint's own split (found
    as find_split_file finds it; duplicates the split dropped may be there too): then it is the checkpoint's
    data set under another path (data/BUSI here, ../shared/data/BUSI where it was trained), and scoring its
    training images would flatter the model."""
    from dataset import select_fold
    try:
        split_obj = read_split(find_split_file(cfg, meta))
        train_keys, val_keys = select_fold(split_obj, int(meta.get("fold", 0) or 0))
    except (DataError, OSError, ValueError, KeyError, TypeError):
        return False
    dropped = {k for kind in split_obj.get("duplicates", {}).values() for d in kind for k in d.get("dropped", [])}
    in_split = set(train_keys) | set(val_keys)
    keys = {s.key for s in samples}
    return bool(val_keys) and in_split <= keys <= in_split | dropped


def load_eval_set(cfg: dict, meta: dict) -> tuple[LoadedSet, dict]:
    """The images to evaluate: the chosen data, restricted to the chosen part of the stored split.

    Returns (loaded set, description: split, split_file, fold). Images follow the split's order, as in
    train.py, so the validation numbers are computed on exactly the same batches.
    """
    from dataset import discover_all, load_set, resolve_duplicates, select_fold
    tcfg = meta.get("train_config", {})
    src = cfg if _own_data(cfg) else tcfg
    samples = discover_all(src.get("sources", ""), data_dir=src.get("data_dir", ""),
                           path_to_images=src.get("path_to_images", ""), path_to_masks=src.get("path_to_masks", ""),
                           manifest=src.get("manifest", ""), default_label=src.get("default_label", ""))
    which = effective_split(cfg)
    if which == "all" and cfg["split"] == "auto" and _holds_checkpoint_split(cfg, meta, samples):
        which = "val"
        log.info("the given data is the checkpoint's own data set (the images of its split): evaluating "
                 "its validation images (--split all for every image)")
    info: dict = {"split": which, "split_file": None, "fold": None}
    if which != "all":
        split_path = find_split_file(cfg, meta)
        split_obj = read_split(split_path)
        fold_ = cfg["fold"] if cfg["fold"] >= 0 else int(meta.get("fold", 0) or 0)
        if "folds" not in split_obj and cfg["fold"] >= 0:
            raise DataError(f"{split_path}: holds one train/validation split, not folds; leave --fold unset")
        try:
            train_keys, val_keys = select_fold(split_obj, fold_)
        except (ValueError, KeyError) as e:
            raise DataError(f"{split_path}: {e}") from None
        wanted = val_keys if which == "val" else train_keys
        by_key = {s.key: s for s in samples}
        missing = [k for k in wanted if k not in by_key]
        if missing:
            log.warning("%d image(s) of the %s split are not in the data (e.g. %s)", len(missing), which, missing[:3])
        samples = [by_key[k] for k in wanted if k in by_key]
        info.update(split_file=str(split_path), fold=fold_ if "folds" in split_obj else None)
        log.info("%s images of %s%s: %d", which, split_path,
                 f" (fold {fold_} of {len(split_obj['folds'])})" if "folds" in split_obj else "", len(samples))
    loaded = load_set(samples, int(meta["image_size"]), progress=True)
    if which == "all":
        keep, _ = resolve_duplicates(loaded.samples, loaded.hashes)
        loaded = loaded.subset(keep)
    return loaded, info


def default_out_dir(cfg: dict, split_: str) -> Path:
    """<checkpoint folder>/eval for the checkpoint's own validation split; eval_<split> for another part of
    its own data; eval_<data name>_<split> for data given on the command line; _<backend> added for a backend
    other than torch."""
    parent = Path(cfg["checkpoint"]).parent
    tag = "" if cfg.get("backend", "torch") == "torch" else f"_{cfg['backend']}"
    if not _own_data(cfg):
        return parent / (("eval" if split_ == "val" else f"eval_{split_}") + tag)
    if cfg.get("sources"):
        return parent / f"eval_{'+'.join(n for n, _ in parse_sources(cfg['sources']))}_{split_}{tag}"
    data = Path(cfg["manifest"] or cfg["data_dir"] or cfg["path_to_images"])
    name = data.stem if cfg["manifest"] else data.resolve().name
    return parent / f"eval_{name or 'data'}_{split_}{tag}"


def post_processing(cfg: dict, meta: dict) -> dict:
    """threshold, min_area (pixels at the network's input size), normal_gate and gate_keep: each from the command
    line, or, when negative there, from the checkpoint (0.5, 0, 1.0 and 1.0 when it holds none)."""
    stored = {"threshold": 0.5, "min_area": 0.0, "normal_gate": 1.0, "gate_keep": 1.0}
    return {k: float(cfg[k]) if cfg[k] >= 0 else float(meta.get(k) if meta.get(k) is not None else default)
            for k, default in stored.items()}


def subgroup_columns(cfg: dict, meta: dict, samples: list) -> tuple[str, ...]:
    """The --subgroups columns, each checked against the columns of the data's manifest."""
    names = tuple(dict.fromkeys(n.strip() for n in cfg["subgroups"].split(",") if n.strip()))
    if not names:
        return ()
    src = cfg if _own_data(cfg) else meta.get("train_config", {})
    where = src.get("manifest") or f"{src.get('data_dir') or src.get('path_to_images') or 'the data'} (not a manifest)"
    have = sorted({k for s in samples for k, _ in getattr(s, "attrs", ())})
    for n in names:
        if n not in have:
            raise DataError(f"{where}: no column {n!r} for --subgroups (columns besides image, mask, label and "
                            f"patient: {', '.join(have) or 'none'})")
        if n in CSV_FIELDS:
            raise DataError(f"{where}: column {n!r} has the name of a per_image.csv column; rename it for --subgroups")
    return names


def tune(cfg: dict, predictor, data: LoadedSet, info: dict) -> tuple[list[dict], dict]:
    """--tune_threshold: the sweep over threshold x min_area (x normal_gate, with the gate's keep level
    --gate_keep or predict.GATE_KEEP) under --recall_floor, printed; returns it and the chosen setting."""
    from predict import GATE_KEEP
    if info["split"] != "val":
        log.warning("--tune_threshold on the %s images: choose the post-processing on validation images only",
                    info["split"])
    keep = cfg["gate_keep"] if cfg["gate_keep"] >= 0 else GATE_KEEP
    floor = cfg["recall_floor"] if cfg["recall_floor"] >= 0 else None
    sweep = threshold_sweep(predictor, data, batch_size=cfg["batch_size"], tta=cfg["tta"], min_areas=MIN_AREA_GRID,
                            gates=GATE_GRID if cfg["tune_gate"] else (1.0,), gate_keep=keep)
    best = choose_setting(sweep, recall_floor=floor)
    print(format_sweep(sweep, best))
    chosen = {"threshold": best["threshold"], "min_area": best["min_area"]}
    if len({r["normal_gate"] for r in sweep}) > 1:  # a head: the gate was swept too
        chosen.update(normal_gate=best["normal_gate"], gate_keep=keep)
    print(f"chosen {', '.join(f'{k} {v:g}' for k, v in chosen.items())} (highest mean Dice (b) over all images"
          f"{f'; at most {floor:.0%} of lesion images erased' if floor is not None else ''}); store them with "
          f"ship_checkpoint.py {' '.join(f'--{k} {v:g}' for k, v in chosen.items())}")
    return sweep, {"threshold": best["threshold"], "min_area": best["min_area"], "normal_gate": best["normal_gate"],
                   "gate_keep": keep if "gate_keep" in chosen else 1.0}


def write_outputs(out: Path, rows: list[dict], summary: dict, subgroups=()) -> list[str]:
    """per_image.csv, summary.json and the plots into out; returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "per_image.csv", rows, subgroups)
    save_json_atomic(out / "summary.json", json_safe(summary))
    plot_confusion(out / "confusion_matrix.png", summary)
    plot_dice_distribution(out / "dice_per_class.png", rows)
    written = ["per_image.csv", "summary.json", "confusion_matrix.png", "dice_per_class.png"]
    if summary["figures"]["n_lesion"]:
        plot_reliability(out / "reliability.png", summary)
        written.append("reliability.png")
    return written


def write_gallery(cfg: dict, out: Path, rows: list[dict], data: LoadedSet, masks: dict) -> None:
    gdir = Path(cfg["gallery_dir"]) if cfg["gallery_dir"] else default_gallery_dir(out)
    if not is_git_ignored_location(gdir):
        log.warning("%s: the gallery holds image pixels and this folder is tracked by git; do not commit "
                    "pictures of BUSI images", gdir)
    gdir.mkdir(parents=True, exist_ok=True)
    if plot_gallery(gdir / "best_worst.png", rows, data, masks, cfg["gallery"]):
        print(f"wrote {gdir / 'best_worst.png'} (holds image pixels; kept out of git)")


def run_gather(cfg: dict) -> dict:
    result = gather_folds(cfg["gather"])
    print(format_gather(result))
    if cfg["out_dir"]:
        out = Path(cfg["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        save_json_atomic(out / "folds_summary.json", json_safe(result))
        with open(out / "folds.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["file", "fold", "n_images", *GATHER_KEYS])
            w.writeheader()
            w.writerows(json_safe(result["folds"]))
        print(f"wrote {out}/folds_summary.json, folds.csv")
    return result


def pixel_sizes(cfg: dict):
    """The --pixel_mm setting as a function of the image file (dicom_io.pixel_mm_lookup), checked at once."""
    from dicom_io import DicomError, pixel_mm_lookup
    try:
        return pixel_mm_lookup(cfg["pixel_mm"])
    except DicomError as e:
        raise DataError(str(e)) from None


def review_cutoff_of(cfg: dict, meta: dict) -> tuple[float | None, str]:
    """(the uncertainty cut-off in use, where it comes from): the setting, else the checkpoint's (stored for the
    same uncertainty method), else (None, '') for the one chosen on the evaluated images."""
    from uncertainty import stored_cutoff
    if cfg["uncertainty_cutoff"] >= 0:
        return float(cfg["uncertainty_cutoff"]), "setting"
    stored = stored_cutoff(meta)
    return stored, ("checkpoint" if stored is not None else "")


def clinical_readout(cfg: dict, meta: dict, predictor, data: LoadedSet, rows: list[dict], setting: dict,
                     masks: dict | None, size_of) -> dict:
    """--measure and --uncertainty (evaluate_readout.py): adds their columns to rows, returns their summary."""
    out: dict = {}
    if cfg["measure"]:
        add_measurements(rows, data, lambda key: unpack_mask(masks[key]), size_of)
        out["measurements"] = measurement_summary(rows)
    if cfg["uncertainty"]:
        add_uncertainty(rows, _predicted_batches(predictor, data, cfg["batch_size"], cfg["tta"]), predictor, data,
                        setting, lambda key: unpack_mask(masks[key]), cfg["batch_size"])
        out["uncertainty"] = uncertainty_summary(rows, *review_cutoff_of(cfg, meta))
    return out


CONVENTIONS = {"a": "empty true mask: left out of the Dice/IoU mean, judged at image level (empty_masks)",
               "b": "empty true mask: empty prediction scores 1, non-empty prediction scores 0"}


def run(cfg: dict) -> dict:
    from predict import load_predictor, pick_device
    if cfg["gather"]:
        return run_gather(cfg)
    predictor, meta = load_predictor(cfg["checkpoint"], pick_device(cfg["device"]), cfg["backend"])
    setting = post_processing(cfg, meta)
    size_of = pixel_sizes(cfg)
    data, info = load_eval_set(cfg, meta)
    if len(data) == 0:
        raise DataError("no images to evaluate")
    groups = subgroup_columns(cfg, meta, data.samples)
    sweep = None
    if cfg["tune_threshold"]:
        sweep, setting = tune(cfg, predictor, data, info)
    masks: dict | None = {} if (cfg["gallery"] > 0 or cfg["measure"] or cfg["uncertainty"]) else None
    rows, summary = evaluate_set(predictor, data, setting["threshold"], cfg["batch_size"], cfg["tta"], masks=masks,
                                 min_area=setting["min_area"], normal_gate=setting["normal_gate"],
                                 gate_keep=setting["gate_keep"], subgroups=groups,
                                 n_boot=cfg["bootstrap"])
    if sweep is not None:
        summary["threshold_sweep"] = sweep
    summary.update(checkpoint=str(cfg["checkpoint"]), epoch=meta.get("epoch"), **setting, head=meta.get("head"),
                   tta=cfg["tta"], backend=cfg["backend"], **info, conventions=CONVENTIONS)
    summary["readout"] = clinical_readout(cfg, meta, predictor, data, rows, setting, masks, size_of)
    if cfg["box_prompt"]:
        from box_prompt import evaluate_boxes
        summary["box_prompt"] = evaluate_boxes(data.samples, data.full_masks, str(pick_device(cfg["device"])))
    out = Path(cfg["out_dir"]) if cfg["out_dir"] else default_out_dir(cfg, info["split"])
    written = write_outputs(out, rows, summary, (*groups, *readout_columns(rows)))
    written += write_readout_plots(out, rows, summary["readout"])
    print("\n".join([format_table(summary), *format_readout(summary["readout"])]))
    if "box_prompt" in summary:
        from box_prompt import format_boxes
        print(format_boxes(summary["box_prompt"]))
    print(f"wrote {out}: {', '.join(written)}")
    if cfg["gallery"] > 0:
        write_gallery(cfg, out, rows, data, masks)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cli import parse_settings
    from model import CheckpointError
    cfg = parse_settings(__file__, argv, __doc__)
    try:
        run(cfg)
    except (DataError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
