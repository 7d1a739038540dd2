"""Evaluate a checkpoint with the metrics the BUSI literature reports, at each image's original resolution.

    python evaluate.py --checkpoint runs/resnet18/last.safetensors           # its stored validation split
    python evaluate.py --checkpoint ck.safetensors --data_dir data/BUSI --split all
    python evaluate.py --manifest external.csv --checkpoint ck.safetensors   # every image of the manifest
    python evaluate.py --gather "runs/fold*/eval/summary.json"               # mean +/- std over K folds

Every number is computed at the image's ORIGINAL resolution: the predicted probabilities are resized back
(bilinear) before the threshold, and compared with the union of the image's mask files.

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
  labels          image-level class from the prediction: normal when no pixel passes the threshold, else the
                  lesion class holding the most probability (predict.decide).

Empty masks (normal images): both conventions are reported, since papers differ:
  (a) "_a": an image whose true mask (or, per class, whose channel's true mask) is empty is left out of the
      Dice/IoU mean and judged at image level only: an empty prediction is a true negative, anything else a
      false positive (summary "empty_masks"), as nnU-Net does;
  (b) "_b": an empty prediction on an empty mask scores 1, a non-empty prediction on an empty mask scores 0.
Summaries (mean, population std, median, n) are given for benign+malignant images ("lesion", the usual
protocol; its dice_a is THE lesion Dice) and for all images ("all"). Image-level classification: confusion
matrix (rows true, columns predicted), accuracy, per-class sensitivity and specificity.

Written to out_dir: per_image.csv, summary.json, confusion_matrix.png, dice_per_class.png; the best/worst
gallery (it holds image pixels) goes to gallery_dir, by default a git-ignored folder (out_dir/gallery when
out_dir is itself ignored or outside the repository, else private/eval_gallery/...).

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

from dataset import CLASS_NAMES, LESION_CLASSES, DataError, LoadedSet, save_json_atomic
from predict import decide, to_original

log = logging.getLogger("evaluate")

# ---- settings (edit here, or override on the command line: --split all)
checkpoint = "checkpoints/busi_unet_resnet18.safetensors"  # the model to evaluate
data_dir = ""                # BUSI-layout folder; empty: the data stored in the checkpoint's training settings
path_to_images = ""          # or: a folder of images ...
path_to_masks = ""           # ... and a folder of masks matched by file name
manifest = ""                # or: a CSV with columns image,mask,label
default_label = ""           # label for two-folder data whose file names hold no class name
split_file = ""              # split JSON; empty: the one stored in the checkpoint (or beside it)
split = "auto"               # val, train or all; auto: val for the checkpoint's own data (at any path) or with split_file, else all
fold = -1                    # with a K-fold split file: the validation fold (-1: the checkpoint's)
out_dir = ""                 # where CSV, JSON and plots go; empty: <checkpoint folder>/eval (eval_<data>_<split> for other data)
gallery_dir = ""             # best/worst gallery (holds image pixels: keep out of git); empty: a git-ignored folder
gallery = 6                  # number of best and of worst cases in the gallery (0: none)
threshold = -1.0             # lesion probability threshold; < 0 uses the checkpoint's
tune_threshold = False       # sweep thresholds on these images, report each, evaluate at the best (validation only!)
tta = False                  # average with the mirrored image
device = "auto"              # auto, cpu, cuda, mps
batch_size = 8               # images per forward pass
gather = ""                  # glob of summary.json files (one per fold) to combine into mean +/- std
# ---- end of settings

REPO = Path(__file__).resolve().parent
# Folders of this repository that .gitignore keeps out of git (tests check that it still does).
IGNORED_DIRS = ("runs", "private", "data", "sample_predictions/busi")

# Per-image metric columns, in the order of the CSV and the printed table.
METRIC_KEYS = ("dice_a", "iou_a", "dice_b", "iou_b", "precision", "recall", "hd95",
               *[f"{m}_{c}_{conv}" for c in LESION_CLASSES for conv in ("a", "b") for m in ("dice", "iou")])
CSV_FIELDS = ["file", "true_label", "pred_label", "confidence", *METRIC_KEYS, "true_area", "pred_area",
              *[f"pred_area_{c}" for c in LESION_CLASSES], "height", "width"]


# ---------------------------------------------------------------------------------------------------------
# Metric functions (numpy bool masks)
# ---------------------------------------------------------------------------------------------------------

def dice_iou(pred: np.ndarray, true: np.ndarray, empty_score: float = 1.0) -> tuple[float, float]:
    """Dice and IoU of two bool masks. Both empty: empty_score (convention b: 1.0; NaN to leave it out)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    inter = int(np.logical_and(pred, true).sum())
    total = int(pred.sum()) + int(true.sum())
    if total == 0:
        return float(empty_score), float(empty_score)
    return 2.0 * inter / total, inter / (total - inter)


def precision_recall(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pixel precision and recall; NaN where undefined (no predicted / no true pixels)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    tp = int(np.logical_and(pred, true).sum())
    p, t = int(pred.sum()), int(true.sum())
    return (tp / p if p else float("nan")), (tp / t if t else float("nan"))


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask: mask pixels with a 4-neighbour outside it (the image edge counts as
    outside), i.e. mask XOR its erosion by the cross-shaped element, as MedPy's surface distances use."""
    from scipy import ndimage
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)


def surface_distances(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance of each boundary pixel of pred to true's boundary, and of each of true's to pred's), pixels."""
    from scipy import ndimage
    sp, st = surface(pred), surface(true)
    return ndimage.distance_transform_edt(~st)[sp], ndimage.distance_transform_edt(~sp)[st]


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th percentile of the symmetric surface distance in pixels (MedPy's hd95: both directions pooled,
    numpy's linear percentile). NaN when either mask is empty."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if not pred.any() or not true.any():
        return float("nan")
    a, b = surface_distances(pred, true)
    return float(np.percentile(np.hstack([a, b]), 95))


def confusion(true_labels: list[str], pred_labels: list[str], classes=CLASS_NAMES) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true_labels, pred_labels):
        m[classes.index(t), classes.index(p)] += 1
    return m


def classification_summary(cm: np.ndarray, classes=CLASS_NAMES) -> dict:
    """Accuracy and one-vs-rest sensitivity (recall) and specificity of each class from a confusion matrix."""
    cm = np.asarray(cm)
    total = int(cm.sum())
    out = {"accuracy": float(np.trace(cm) / total) if total else float("nan"), "confusion_matrix": cm.tolist(),
           "classes": list(classes), "n_images": total}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        out[f"sensitivity_{c}"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out[f"specificity_{c}"] = float(tn / (tn + fp)) if tn + fp else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------
# Evaluating a loaded set
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
           "height": int(true_mask.shape[0]), "width": int(true_mask.shape[1])}
    empty = np.zeros_like(true_mask, dtype=bool)
    for c, name in enumerate(LESION_CLASSES):
        t = true_mask if true_label == name else empty
        d, j = dice_iou(decision.class_masks[c], t, empty_score=1.0)
        row[f"dice_{name}_b"], row[f"iou_{name}_b"] = d, j
        present = true_label == name and has_lesion
        row[f"dice_{name}_a"], row[f"iou_{name}_a"] = (d, j) if present else (nan, nan)
        row[f"pred_area_{name}"] = int(decision.class_masks[c].sum())
    return row


def _stats(values) -> dict:
    """mean, population std (ddof 0), median and count of the defined (non-NaN) values."""
    a = np.asarray([v for v in values if v is not None and v == v], dtype=float)
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size)}


def summarize(rows: list[dict]) -> dict:
    """Mean/std/median of every metric for the lesion subset (benign+malignant) and for all images, the
    image-level judgement of empty masks (convention a), and the image-level classification."""
    out = {}
    subsets = {"lesion": [r for r in rows if r["true_label"] in LESION_CLASSES], "all": rows}
    for name, rs in subsets.items():
        s: dict = {"n_images": len(rs)}
        for key in METRIC_KEYS:
            s[key] = _stats(r[key] for r in rs)
        empty = [r for r in rs if r["true_area"] == 0]
        tn = sum(r["pred_area"] == 0 for r in empty)
        s["empty_masks"] = {"n": len(empty), "true_negative": tn, "false_positive": len(empty) - tn,
                            "true_negative_rate": tn / len(empty) if empty else float("nan")}
        out[name] = s
    out["classification"] = classification_summary(confusion([r["true_label"] for r in rows],
                                                             [r["pred_label"] for r in rows]))
    return out


def evaluate_set(predictor, data: LoadedSet, threshold: float, batch_size: int = 8, tta: bool = False,
                 with_hd95: bool = True, masks: dict | None = None) -> tuple[list[dict], dict]:
    """Predict every image of a loaded set and score it at its original resolution.

    predictor: callable (uint8 N x 1 x S x S, batch size, tta) -> logits N x C x S x S.
    masks: if a dict is given, each image's predicted lesion mask is stored in it (packed bits, see unpack_mask).
    Returns (per-image rows, summary). The summary's "val_loss" is the pixel-wise BCE at network resolution.
    """
    rows, bce_sum = [], 0.0
    for i, logits in _predicted_batches(predictor, data, batch_size, tta):
        target = torch.as_tensor(data.targets[i:i + batch_size]).float()
        bce_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum"))
        probs = torch.sigmoid(logits)
        for j in range(logits.shape[0]):
            s = data.samples[i + j]
            full = data.full_masks[i + j]
            d = decide(to_original(probs[j], full.shape), threshold)
            rows.append({"file": s.key, **image_metrics(d, full, s.label, with_hd95)})
            if masks is not None:
                masks[s.key] = (np.packbits(d.lesion), d.lesion.shape)
    summary = summarize(rows)
    summary["val_loss"] = bce_sum / max(1, data.targets.size)
    return rows, summary


def _predicted_batches(predictor, data: LoadedSet, batch_size: int, tta: bool):
    """(index of the batch's first image, its logits as float32) for every batch of the set, in order."""
    for i in range(0, len(data), batch_size):
        yield i, predictor(data.images[i:i + batch_size], batch_size, tta).float()


THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(2, 19))  # 0.10, 0.15, ..., 0.90


def threshold_sweep(predictor, data: LoadedSet, grid=THRESHOLD_GRID, batch_size: int = 8,
                    tta: bool = False) -> list[dict]:
    """The headline numbers (lesion Dice/IoU, all-image Dice (b), accuracy) at every threshold of the grid.

    The network runs once; its probabilities, resized to each image's original size, are kept (fp16) and
    thresholded again for each value. Choose with choose_threshold() on validation images only.
    """
    probs_full = []
    for i, logits in _predicted_batches(predictor, data, batch_size, tta):
        probs = torch.sigmoid(logits)
        for j in range(probs.shape[0]):
            probs_full.append(to_original(probs[j], data.full_masks[i + j].shape).half())
    out = []
    for t in grid:
        rows = [image_metrics(decide(p, t), data.full_masks[k], data.samples[k].label, with_hd95=False)
                for k, p in enumerate(probs_full)]
        out.append({"threshold": float(t), **headline(summarize(rows))})
    return out


def choose_threshold(sweep: list[dict]) -> float:
    """The threshold with the highest mean Dice (b) over ALL images: it rewards lesion overlap and empty
    predictions on normal images alike, so it cannot buy lesion Dice with false positives. Ties: the one
    nearest 0.5."""
    best = max(sweep, key=lambda r: (round(r["dice_all_b"], 6), -abs(r["threshold"] - 0.5)))
    return best["threshold"]


def unpack_mask(packed) -> np.ndarray:
    bits, shape = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def headline(summary: dict) -> dict:
    """The few numbers logged every epoch and shown first."""
    return {"dice": summary["lesion"]["dice_a"]["mean"], "iou": summary["lesion"]["iou_a"]["mean"],
            "dice_all_b": summary["all"]["dice_b"]["mean"], "accuracy": summary["classification"]["accuracy"]}


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
    return "\n".join(lines)


def format_sweep(sweep: list[dict]) -> str:
    lines = [f"{'threshold':>9}{'lesion Dice':>13}{'lesion IoU':>12}{'Dice (b) all':>14}{'accuracy':>10}"]
    for r in sweep:
        lines.append(f"{r['threshold']:>9.2f}{_num(r['dice'], 13)}{_num(r['iou'], 12)}{_num(r['dice_all_b'], 14)}"
                     f"{_num(r['accuracy'], 10)}")
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict]) -> None:
    """The per-image CSV; undefined values (NaN) are written as empty cells."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
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
                elif k in METRIC_KEYS or k == "confidence":
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
    return bool(cfg["data_dir"] or cfg["path_to_images"] or cfg["manifest"])


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


def read_split(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: split file is not valid JSON ({e})") from None


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
    from dataset import discover, load_set, resolve_duplicates, select_fold
    tcfg = meta.get("train_config", {})
    src = cfg if _own_data(cfg) else tcfg
    samples = discover(src.get("data_dir", ""), src.get("path_to_images", ""), src.get("path_to_masks", ""),
                       src.get("manifest", ""), src.get("default_label", ""))
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
    its own data; eval_<data name>_<split> for data given on the command line."""
    parent = Path(cfg["checkpoint"]).parent
    if not _own_data(cfg):
        return parent / ("eval" if split_ == "val" else f"eval_{split_}")
    data = Path(cfg["manifest"] or cfg["data_dir"] or cfg["path_to_images"])
    name = data.stem if cfg["manifest"] else data.resolve().name
    return parent / f"eval_{name or 'data'}_{split_}"


def run(cfg: dict) -> dict:
    from predict import load_predictor, pick_device
    if cfg["gather"]:
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
    dev = pick_device(cfg["device"])
    predictor, meta = load_predictor(cfg["checkpoint"], dev)
    thr = cfg["threshold"] if cfg["threshold"] >= 0 else float(meta.get("threshold", 0.5))
    data, info = load_eval_set(cfg, meta)
    if len(data) == 0:
        raise DataError("no images to evaluate")
    sweep = None
    if cfg["tune_threshold"]:
        if info["split"] != "val":
            log.warning("--tune_threshold on the %s images: choose a threshold on validation images only",
                        info["split"])
        sweep = threshold_sweep(predictor, data, batch_size=cfg["batch_size"], tta=cfg["tta"])
        print(format_sweep(sweep))
        thr = choose_threshold(sweep)
        print(f"chosen threshold {thr} (highest mean Dice (b) over all images); store it with "
              f"ship_checkpoint.py --threshold {thr}")
    want_gallery = cfg["gallery"] > 0
    masks: dict | None = {} if want_gallery else None
    rows, summary = evaluate_set(predictor, data, thr, cfg["batch_size"], cfg["tta"], masks=masks)
    if sweep is not None:
        summary["threshold_sweep"] = sweep
    summary.update(checkpoint=str(cfg["checkpoint"]), epoch=meta.get("epoch"), threshold=thr, tta=cfg["tta"],
                   **info, conventions={
                       "a": "empty true mask: left out of the Dice/IoU mean, judged at image level (empty_masks)",
                       "b": "empty true mask: empty prediction scores 1, non-empty prediction scores 0"})
    out = Path(cfg["out_dir"]) if cfg["out_dir"] else default_out_dir(cfg, info["split"])
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "per_image.csv", rows)
    save_json_atomic(out / "summary.json", json_safe(summary))
    plot_confusion(out / "confusion_matrix.png", summary)
    plot_dice_distribution(out / "dice_per_class.png", rows)
    written = ["per_image.csv", "summary.json", "confusion_matrix.png", "dice_per_class.png"]
    print(format_table(summary))
    print(f"wrote {out}: {', '.join(written)}")
    if want_gallery:
        gdir = Path(cfg["gallery_dir"]) if cfg["gallery_dir"] else default_gallery_dir(out)
        if not is_git_ignored_location(gdir):
            log.warning("%s: the gallery holds image pixels and this folder is tracked by git; do not commit "
                        "pictures of BUSI images", gdir)
        gdir.mkdir(parents=True, exist_ok=True)
        if plot_gallery(gdir / "best_worst.png", rows, data, masks, cfg["gallery"]):
            print(f"wrote {gdir / 'best_worst.png'} (holds image pixels; kept out of git)")
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
