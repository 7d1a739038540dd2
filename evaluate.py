"""Evaluate a checkpoint with the metrics the BUSI literature reports, at each image's original resolution.

    python evaluate.py --checkpoint runs/resnet18/best.safetensors            # its stored validation split
    python evaluate.py --checkpoint ck.safetensors --data_dir data/BUSI --split all
    python evaluate.py --manifest external.csv --checkpoint ck.safetensors
    python evaluate.py --gather "runs/fold*/eval/summary.json"               # mean +/- std over K folds

Metrics: lesion Dice and IoU (union of the lesion channels against the union of the masks), per-class Dice and
IoU, precision, recall, HD95 in pixels, and image-level normal/benign/malignant classification (confusion
matrix, accuracy, per-class sensitivity and specificity).

Empty masks (normal images), both conventions, since papers differ:
  (a) "dice_a": an image with an empty true mask is left out of the Dice/IoU mean and judged at image level
      only (empty prediction = true negative), as nnU-Net does;
  (b) "dice_b": an empty prediction on an empty mask scores 1, anything else on an empty mask scores 0.
Summaries are given for benign+malignant images ("lesion", the usual protocol) and for all images.

train.py's per-epoch validation calls evaluate_set() below, so its logged Dice is this module's number.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dataset import CLASS_NAMES, LESION_CLASSES, DataError, LoadedSet, save_json_atomic
from predict import decide, to_original

log = logging.getLogger("evaluate")

# ---- settings (edit here, or override on the command line: --split all)
checkpoint = "checkpoints/busi_unet_resnet18.safetensors"  # the model to evaluate
data_dir = ""                # BUSI-layout folder; empty: the data folder stored in the checkpoint
path_to_images = ""          # or: a folder of images ...
path_to_masks = ""           # ... and a folder of masks matched by file name
manifest = ""                # or: a CSV with columns image,mask,label
default_label = ""           # label for two-folder data whose file names hold no class name
split_file = ""              # split JSON; empty: the one stored in the checkpoint
split = "val"                # which images: val (the split's validation images), train, or all
fold = -1                    # with a K-fold split file: the validation fold (-1: the checkpoint's)
out_dir = ""                 # where CSV, JSON and plots go; empty: <checkpoint folder>/eval
gallery_dir = ""             # best/worst gallery (holds data pixels: keep out of git); empty: out_dir/gallery
gallery = 6                  # number of best and of worst cases in the gallery (0: none)
threshold = -1.0             # lesion probability threshold; < 0 uses the checkpoint's
tta = False                  # average with the mirrored image
device = "auto"              # auto, cpu, cuda, mps
batch_size = 8               # images per forward pass
gather = ""                  # glob of summary.json files (one per fold) to combine into mean +/- std
# ---- end of settings

METRICS = ("dice", "iou", "precision", "recall", "hd95")


# ---------------------------------------------------------------------------------------------------------
# Metric functions (numpy bool masks)
# ---------------------------------------------------------------------------------------------------------

def dice_iou(pred: np.ndarray, true: np.ndarray, empty_score: float = 1.0) -> tuple[float, float]:
    """Dice and IoU of two bool masks; both empty scores empty_score (convention b: 1.0)."""
    inter = np.logical_and(pred, true).sum()
    total = pred.sum() + true.sum()
    if total == 0:
        return empty_score, empty_score
    union = total - inter
    return float(2 * inter / total), float(inter / union)


def precision_recall(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pixel precision and recall; NaN where undefined (no predicted / no true pixels)."""
    tp = np.logical_and(pred, true).sum()
    p, t = pred.sum(), true.sum()
    return (float(tp / p) if p else float("nan")), (float(tp / t) if t else float("nan"))


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th percentile of the symmetric surface distance in pixels (as MedPy's hd95); NaN if either is empty."""
    from scipy import ndimage
    if not pred.any() or not true.any():
        return float("nan")
    sp, st = _surface(pred), _surface(true)
    d_to_true = ndimage.distance_transform_edt(~st)
    d_to_pred = ndimage.distance_transform_edt(~sp)
    return float(np.percentile(np.hstack([d_to_true[sp], d_to_pred[st]]), 95))


def confusion(true_labels: list[str], pred_labels: list[str], classes=CLASS_NAMES) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true_labels, pred_labels):
        m[classes.index(t), classes.index(p)] += 1
    return m


def classification_summary(cm: np.ndarray, classes=CLASS_NAMES) -> dict:
    total = cm.sum()
    out = {"accuracy": float(np.trace(cm) / total) if total else float("nan"), "confusion_matrix": cm.tolist(),
           "classes": list(classes)}
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
    """Every per-image number for one prediction against its ground truth."""
    pred = decision.lesion
    dice_b, iou_b = dice_iou(pred, true_mask, empty_score=1.0)
    has_lesion = bool(true_mask.any())
    prec, rec = precision_recall(pred, true_mask)
    row = {"true_label": true_label, "pred_label": decision.label, "confidence": decision.confidence,
           "dice_b": dice_b, "iou_b": iou_b,
           "dice_a": dice_b if has_lesion else float("nan"), "iou_a": iou_b if has_lesion else float("nan"),
           "precision": prec, "recall": rec,
           "hd95": hd95(pred, true_mask) if with_hd95 else float("nan"),
           "true_area": int(true_mask.sum()), "pred_area": int(pred.sum())}
    for c, name in enumerate(LESION_CLASSES):
        t = true_mask if true_label == name else np.zeros_like(true_mask)
        d, j = dice_iou(decision.class_masks[c], t)
        row[f"dice_{name}"] = d if true_label == name else float("nan")
        row[f"iou_{name}"] = j if true_label == name else float("nan")
    return row


def _stats(values) -> dict:
    a = np.asarray([v for v in values if v == v], dtype=float)  # NaN-free
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size)}


def summarize(rows: list[dict]) -> dict:
    """Mean/std/median of every metric for the lesion subset (benign+malignant) and for all images."""
    out = {}
    subsets = {"lesion": [r for r in rows if r["true_label"] in LESION_CLASSES], "all": rows}
    for name, rs in subsets.items():
        s = {"n_images": len(rs)}
        for key in ("dice_a", "iou_a", "dice_b", "iou_b", "precision", "recall", "hd95",
                    *[f"{m}_{c}" for c in LESION_CLASSES for m in ("dice", "iou")]):
            s[key] = _stats(r[key] for r in rs)
        empty = [r for r in rs if r["true_area"] == 0]
        s["empty_masks"] = {"n": len(empty), "predicted_empty": sum(r["pred_area"] == 0 for r in empty)}
        out[name] = s
    out["classification"] = classification_summary(confusion([r["true_label"] for r in rows],
                                                             [r["pred_label"] for r in rows]))
    return out


def evaluate_set(predictor, data: LoadedSet, threshold: float, batch_size: int = 8, tta: bool = False,
                 with_hd95: bool = True) -> tuple[list[dict], dict]:
    """Predict every image of a loaded set and score it at its original resolution.

    predictor: callable (uint8 N x 1 x S x S, batch size, tta) -> logits N x C x S x S.
    Returns (per-image rows, summary). The summary's "val_loss" is the pixel-wise BCE at network resolution.
    """
    rows, bce_sum = [], 0.0
    for i in range(0, len(data), batch_size):
        logits = predictor(data.images[i:i + batch_size], batch_size, tta)
        target = torch.as_tensor(data.targets[i:i + batch_size]).float()
        bce_sum += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum"))
        probs = torch.sigmoid(logits)
        for j in range(logits.shape[0]):
            s = data.samples[i + j]
            full = data.full_masks[i + j]
            d = decide(to_original(probs[j], full.shape), threshold)
            rows.append({"file": s.key, **image_metrics(d, full, s.label, with_hd95)})
    summary = summarize(rows)
    summary["val_loss"] = bce_sum / max(1, data.targets.size)
    return rows, summary


def headline(summary: dict) -> dict:
    """The few numbers logged every epoch and shown first."""
    return {"dice": summary["lesion"]["dice_a"]["mean"], "iou": summary["lesion"]["iou_a"]["mean"],
            "dice_all_b": summary["all"]["dice_b"]["mean"], "accuracy": summary["classification"]["accuracy"]}


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------

def format_table(summary: dict) -> str:
    lines = [f"{'metric':<22}{'subset':<8}{'mean':>8}{'std':>8}{'median':>8}{'n':>6}"]
    for subset in ("lesion", "all"):
        for key, st in summary[subset].items():
            if isinstance(st, dict) and "mean" in st:
                lines.append(f"{key:<22}{subset:<8}{st['mean']:>8.4f}{st['std']:>8.4f}{st['median']:>8.4f}{st['n']:>6}")
    c = summary["classification"]
    lines.append(f"image-level accuracy {c['accuracy']:.4f}   confusion (rows true, cols pred: "
                 f"{', '.join(c['classes'])}): {c['confusion_matrix']}")
    for name in c["classes"]:
        lines.append(f"  {name:<10} sensitivity {c['sensitivity_' + name]:.4f}  specificity {c['specificity_' + name]:.4f}")
    if "val_loss" in summary:
        lines.append(f"validation loss (BCE) {summary['val_loss']:.5f}")
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict]) -> None:
    fields = ["file", "true_label", "pred_label", "confidence", "dice_a", "iou_a", "dice_b", "iou_b",
              "precision", "recall", "hd95", *[f"{m}_{c}" for c in LESION_CLASSES for m in ("dice", "iou")],
              "true_area", "pred_area"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_confusion(path: Path, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = summary["classification"]
    cm = np.asarray(c["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v < cm.max() / 2 else "white")
    ax.set_xticks(range(len(c["classes"])), c["classes"])
    ax.set_yticks(range(len(c["classes"])), c["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {c['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dice_distribution(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    data = [[r["dice_b"] for r in rows if r["true_label"] == c] for c in CLASS_NAMES]
    labels = [f"{c}\n(n={len(d)})" for c, d in zip(CLASS_NAMES, data)]
    ax.boxplot([d if d else [np.nan] for d in data], tick_labels=labels, showmeans=True)
    ax.set_ylabel("Dice (convention b)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Dice per image, by true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gallery(path: Path, rows: list[dict], data: LoadedSet, decisions: dict, k: int) -> None:
    """Best and worst lesion images by Dice: image, true outline (green) and predicted outline (red)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dataset import load_image
    lesion = sorted((r for r in rows if r["true_area"] > 0), key=lambda r: r["dice_b"])
    picks = [("worst", r) for r in lesion[:k]] + [("best", r) for r in lesion[::-1][:k]]
    if not picks:
        return
    index = {s.key: i for i, s in enumerate(data.samples)}
    cols = min(k, 6) or 1
    nrows = -(-len(picks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (kind, r) in zip(axes.flat, picks):
        i = index[r["file"]]
        ax.imshow(load_image(data.samples[i].image), cmap="gray")
        ax.contour(data.full_masks[i], levels=[0.5], colors="lime", linewidths=1)
        if decisions[r["file"]].any():
            ax.contour(decisions[r["file"]], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{kind}: {Path(r['file']).name}\nDice {r['dice_b']:.2f} ({r['pred_label']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gather_folds(pattern: str) -> dict:
    """Combine per-fold summary.json files into mean +/- std over folds of each headline metric."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"{pattern}: no summary files match")
    per_fold = []
    for f in files:
        s = json.loads(Path(f).read_text(encoding="utf-8"))
        per_fold.append({"file": f, "lesion_dice": s["lesion"]["dice_a"]["mean"], "lesion_iou": s["lesion"]["iou_a"]["mean"],
                         "all_dice_b": s["all"]["dice_b"]["mean"], "hd95": s["lesion"]["hd95"]["mean"],
                         "accuracy": s["classification"]["accuracy"]})
    keys = [k for k in per_fold[0] if k != "file"]
    combined = {k: {"mean": float(np.nanmean([p[k] for p in per_fold])),
                    "std": float(np.nanstd([p[k] for p in per_fold]))} for k in keys}
    return {"folds": per_fold, "combined": combined, "n_folds": len(per_fold)}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def load_eval_set(cfg: dict, meta: dict) -> LoadedSet:
    """The images to evaluate: the chosen data, restricted to the chosen part of the stored split."""
    from dataset import discover, load_set, resolve_duplicates, select_fold
    tcfg = meta.get("train_config", {})
    has_own_data = cfg["data_dir"] or cfg["path_to_images"] or cfg["manifest"]
    src = cfg if has_own_data else tcfg
    samples = discover(src.get("data_dir", ""), src.get("path_to_images", ""), src.get("path_to_masks", ""),
                       src.get("manifest", ""), src.get("default_label", ""))
    if cfg["split"] != "all":
        split_path = cfg["split_file"] or meta.get("split_file", "")
        if not split_path or not Path(split_path).is_file():
            raise DataError(f"{split_path or '(none)'}: split file not found; give --split_file or --split all")
        split_obj = json.loads(Path(split_path).read_text(encoding="utf-8"))
        fold_ = cfg["fold"] if cfg["fold"] >= 0 else int(meta.get("fold", 0))
        train_keys, val_keys = select_fold(split_obj, fold_)
        wanted = set(val_keys if cfg["split"] == "val" else train_keys)
        samples = [s for s in samples if s.key in wanted]
        log.info("%s split of %s: %d images", cfg["split"], split_path, len(samples))
    loaded = load_set(samples, int(meta["image_size"]), progress=True)
    if cfg["split"] == "all":
        keep, _ = resolve_duplicates(loaded.samples, loaded.hashes)
        loaded = loaded.subset(keep)
    return loaded


def run(cfg: dict) -> dict:
    from predict import load_predictor, pick_device
    if cfg["gather"]:
        result = gather_folds(cfg["gather"])
        for k, v in result["combined"].items():
            print(f"{k:<14} {v['mean']:.4f} +/- {v['std']:.4f}  ({result['n_folds']} folds)")
        return result
    dev = pick_device(cfg["device"])
    predictor, meta = load_predictor(cfg["checkpoint"], dev)
    thr = cfg["threshold"] if cfg["threshold"] >= 0 else float(meta.get("threshold", 0.5))
    data = load_eval_set(cfg, meta)
    if len(data) == 0:
        raise DataError("no images to evaluate")
    rows, summary = evaluate_set(predictor, data, thr, cfg["batch_size"], cfg["tta"])
    summary.update(checkpoint=str(cfg["checkpoint"]), threshold=thr, split=cfg["split"], tta=cfg["tta"])
    out = Path(cfg["out_dir"] or Path(cfg["checkpoint"]).parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "per_image.csv", rows)
    save_json_atomic(out / "summary.json", summary)
    plot_confusion(out / "confusion_matrix.png", summary)
    plot_dice_distribution(out / "dice_per_class.png", rows)
    if cfg["gallery"] > 0:
        gdir = Path(cfg["gallery_dir"] or out / "gallery")
        gdir.mkdir(parents=True, exist_ok=True)
        predictor_masks = {}
        lesion_rows = sorted((r for r in rows if r["true_area"] > 0), key=lambda r: r["dice_b"])
        chosen = {r["file"] for r in lesion_rows[:cfg["gallery"]] + lesion_rows[::-1][:cfg["gallery"]]}
        for i, s in enumerate(data.samples):
            if s.key in chosen:
                logits = predictor(data.images[i:i + 1], 1, cfg["tta"])[0]
                predictor_masks[s.key] = decide(to_original(torch.sigmoid(logits), data.full_masks[i].shape), thr).lesion
        plot_gallery(gdir / "best_worst.png", rows, data, predictor_masks, cfg["gallery"])
    print(format_table(summary))
    print(f"wrote {out}/per_image.csv, summary.json, confusion_matrix.png, dice_per_class.png")
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
