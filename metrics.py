"""The metric mathematics of this project, as pure functions: numpy arrays in, numbers out.

Segmentation (bool masks H x W):
  dice_iou, dice_iou_counts   Dice and IoU (from masks, or from pixel counts, vectorised)
  precision_recall            pixel precision and recall
  surface, surface_distances  boundary pixels and boundary-to-boundary distances
  hd95                        95th percentile of the symmetric surface distance (MedPy's definition)
  complete_miss               a lesion with nothing predicted on it
Image level:
  confusion, classification_summary   confusion matrix, accuracy, one-vs-rest sensitivity and specificity
  sens_spec                   sensitivity and specificity of binary calls
  roc_auc                     binary ROC-AUC (Mann-Whitney, ties count one half)
  expected_calibration_error  ECE over equal-width bins, with the reliability table
Summaries:
  stats                       mean, population std, median and count of the defined values
  bootstrap_ci                percentile bootstrap interval, optionally resampling whole groups (patients)
Agreement and uncertainty:
  bland_altman                bias and 95% limits of agreement of a measurement against a reference
  risk_coverage               mean quality of the images kept vs the share kept, most uncertain dropped first
  youden_cutoff               the score cut-off that best separates positives (above) from negatives

Undefined results are NaN, never an exception: an empty denominator, a class that is absent.
evaluate.py (the command-line tool) and train.py's validation use these functions; nothing here reads files,
runs a network or knows about the data layout.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from dataset import CLASS_NAMES

NAN = float("nan")


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------

def dice_iou_counts(inter, pred_area, true_area, empty_score: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU from pixel counts: the overlap, the predicted and the true area (numbers or arrays of one
    shape). Where both areas are 0 the scores are empty_score (convention b: 1.0; NaN to leave it out)."""
    inter = np.asarray(inter, dtype=float)
    total = np.asarray(pred_area, dtype=float) + np.asarray(true_area, dtype=float)
    some = total > 0
    safe = np.where(some, total, 1.0)  # union = total - overlap > 0 wherever total > 0
    return np.where(some, 2.0 * inter / safe, empty_score), np.where(some, inter / (safe - inter), empty_score)


def dice_iou(pred: np.ndarray, true: np.ndarray, empty_score: float = 1.0) -> tuple[float, float]:
    """Dice and IoU of two bool masks. Both empty: empty_score (convention b: 1.0; NaN to leave it out)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    d, j = dice_iou_counts(np.logical_and(pred, true).sum(), pred.sum(), true.sum(), empty_score)
    return float(d), float(j)


def precision_recall(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pixel precision and recall; NaN where undefined (no predicted / no true pixels)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    tp = int(np.logical_and(pred, true).sum())
    p, t = int(pred.sum()), int(true.sum())
    return (tp / p if p else NAN), (tp / t if t else NAN)


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
        return NAN
    a, b = surface_distances(pred, true)
    return float(np.percentile(np.hstack([a, b]), 95))


def complete_miss(pred_mask: np.ndarray, true_mask: np.ndarray) -> bool:
    """True when the image has a lesion and the prediction does not touch it: nothing predicted, or only
    pixels outside the lesion. False for an image without a lesion."""
    pred, true = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    return bool(true.any()) and not bool(np.logical_and(pred, true).any())


# ---------------------------------------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------------------------------------

def confusion(true_labels: Sequence[str], pred_labels: Sequence[str],
              classes: Sequence[str] = CLASS_NAMES) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    classes = list(classes)
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true_labels, pred_labels):
        m[classes.index(t), classes.index(p)] += 1
    return m


def classification_summary(cm: np.ndarray, classes: Sequence[str] = CLASS_NAMES) -> dict:
    """Accuracy and one-vs-rest sensitivity (recall) and specificity of each class from a confusion matrix."""
    cm = np.asarray(cm)
    total = int(cm.sum())
    out = {"accuracy": float(np.trace(cm) / total) if total else NAN, "confusion_matrix": cm.tolist(),
           "classes": list(classes), "n_images": total}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        out[f"sensitivity_{c}"] = float(tp / (tp + fn)) if tp + fn else NAN
        out[f"specificity_{c}"] = float(tn / (tn + fp)) if tn + fp else NAN
    return out


def sens_spec(y_true, y_pred) -> tuple[float, float]:
    """Sensitivity TP/(TP+FN) and specificity TN/(TN+FP) of binary calls (truthy = positive); NaN when the
    positive, resp. negative, class is absent."""
    t, p = np.asarray(y_true, bool).ravel(), np.asarray(y_pred, bool).ravel()
    pos, neg = int(t.sum()), int((~t).sum())
    sens = int((t & p).sum()) / pos if pos else NAN
    spec = int((~t & ~p).sum()) / neg if neg else NAN
    return sens, spec


def roc_auc(y_true, score) -> float:
    """Area under the ROC curve of a binary score (higher = more likely positive): the probability that a
    random positive scores above a random negative, ties counting one half (Mann-Whitney U / (n1 n0), with
    average ranks). NaN when either class is absent. Scores must be finite."""
    from scipy.stats import rankdata
    t = np.asarray(y_true, bool).ravel()
    s = np.asarray(score, dtype=float).ravel()
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = rankdata(s)  # average ranks over ties
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(y_true, prob, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error of predicted probabilities against binary outcomes, over `bins` equal-width
    bins of [0, 1] (bin k holds k/bins <= p < (k+1)/bins; the last one also p = 1):
    ECE = sum over bins of (count / n) * |mean probability - observed frequency|.

    Returns (ece, table): one dict per bin with lower, upper, count, mean_prob and observed (NaN for an
    empty bin). ece is NaN when there are no values.
    """
    t = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    which = np.clip(np.floor(p * bins).astype(int), 0, bins - 1)
    table, ece = [], 0.0
    for k in range(bins):
        sel = which == k
        n = int(sel.sum())
        mean_p, observed = (float(p[sel].mean()), float(t[sel].mean())) if n else (NAN, NAN)
        table.append({"lower": k / bins, "upper": (k + 1) / bins, "count": n, "mean_prob": mean_p,
                      "observed": observed})
        if n:
            ece += n / p.size * abs(mean_p - observed)
    return (float(ece) if p.size else NAN), table


# ---------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------

def stats(values) -> dict:
    """mean, population std (ddof 0), median and count of the defined (non-None, non-NaN) values."""
    a = np.asarray([v for v in values if v is not None and v == v], dtype=float)
    if a.size == 0:
        return {"mean": NAN, "std": NAN, "median": NAN, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size)}


def _group_members(n: int, groups: Sequence[Hashable] | None) -> list[np.ndarray] | None:
    """Row indices of each group, groups in order of first appearance; None when every row is its own."""
    if groups is None:
        return None
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} rows")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return [np.asarray(m, dtype=int) for m in members.values()]


def bootstrap_ci(rows, statistic: Callable[[object], float], groups: Sequence[Hashable] | None = None,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval (default 95%) of statistic(rows).

    rows: a sequence (list, or numpy array, indexed by an index array) of the units measured; statistic gets
    a resample of the same kind (a list, or an array) and returns a number.
    groups: one id per row (e.g. the patient): whole groups are drawn with replacement, keeping each group's
    rows together (cluster bootstrap), so correlated images of one patient do not narrow the interval.
    Resamples whose statistic is NaN (e.g. an AUC with one class left out) are skipped. Deterministic for a
    seed. Returns (NaN, NaN) when there are no rows, n_boot is 0 or every resample is undefined.
    """
    n = len(rows)
    if n == 0 or n_boot <= 0:
        return NAN, NAN
    members = _group_members(n, groups)
    units = n if members is None else len(members)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, units, units)
        idx = pick if members is None else np.concatenate([members[g] for g in pick])
        take = rows[idx] if isinstance(rows, np.ndarray) else [rows[i] for i in idx]
        values[b] = statistic(take)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return NAN, NAN
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def nanmean(values) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    a = np.asarray(values, dtype=float).ravel()
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else NAN


# ---------------------------------------------------------------------------------------------------------
# Agreement of measurements, uncertainty scores
# ---------------------------------------------------------------------------------------------------------

def bland_altman(measured, reference) -> dict:
    """Bland-Altman agreement (Bland JM, Altman DG. Lancet 1986;i:307-310) of paired measurements: the
    differences measured - reference, their mean (bias), sample standard deviation (ddof 1) and the 95% limits
    of agreement bias -/+ 1.96 sd, with n and the mean of the reference. Pairs with a NaN are left out;
    sd and limits are NaN for fewer than 2 pairs, everything for none."""
    a, b = np.asarray(measured, dtype=float).ravel(), np.asarray(reference, dtype=float).ravel()
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = a[keep] - b[keep]
    n = int(diff.size)
    bias = float(diff.mean()) if n else NAN
    sd = float(diff.std(ddof=1)) if n >= 2 else NAN
    return {"n": n, "bias": bias, "sd": sd, "lower": bias - 1.96 * sd, "upper": bias + 1.96 * sd,
            "mean_reference": float(b[keep].mean()) if n else NAN}


def risk_coverage(score, quality) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, mean quality of the kept): images are kept from the lowest score (most certain) up, so the
    most uncertain are dropped first; one point per distinct score (tied images are kept or dropped together),
    ending at coverage 1. Images with a NaN score or quality are left out."""
    s, q = np.asarray(score, dtype=float).ravel(), np.asarray(quality, dtype=float).ravel()
    keep = ~(np.isnan(s) | np.isnan(q))
    s, q = s[keep], q[keep]
    if s.size == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(s, kind="stable")
    s, q = s[order], q[order]
    ends = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each group of equal scores
    kept = ends + 1
    return kept / s.size, np.cumsum(q)[ends] / kept


def youden_cutoff(score, positive) -> tuple[float, float, float]:
    """(cut-off, sensitivity, specificity) of the rule 'positive when score > cut-off' with the largest Youden J
    = sensitivity + specificity - 1; cut-offs halfway between distinct scores (ties: the lower cut-off). NaN
    scores are left out; (NaN, NaN, NaN) when either class is absent."""
    s, t = np.asarray(score, dtype=float).ravel(), np.asarray(positive, bool).ravel()
    keep = ~np.isnan(s)
    s, t = s[keep], t[keep]
    if not t.any() or t.all():
        return NAN, NAN, NAN
    u = np.unique(s)
    cuts = np.r_[u[0] - 1e-9, (u[:-1] + u[1:]) / 2] if u.size > 1 else u - 1e-9
    best = (-2.0, NAN, NAN, NAN)
    for c in cuts:
        sens, spec = sens_spec(t, s > c)
        if sens + spec - 1 > best[0] + 1e-12:
            best = (sens + spec - 1, float(c), sens, spec)
    return best[1], best[2], best[3]


__all__ = ["bland_altman", "bootstrap_ci", "classification_summary", "complete_miss", "confusion", "dice_iou",
           "dice_iou_counts", "expected_calibration_error", "hd95", "nanmean", "precision_recall", "risk_coverage",
           "roc_auc", "sens_spec", "stats", "surface", "surface_distances", "youden_cutoff"]
