"""evaluate.py's part for the clinical read-out: are predict.py's measurements, shape cues and uncertainty worth
reading? evaluate.py calls these functions after it has scored the images (rows: its per-image rows).

  measurements (--measure, on by default)
    per image: the measurements of the largest predicted lesion and of the largest lesion of the reference mask
    (measure.py; mm where the pixel size is known: DICOM header or --pixel_mm), as pred_* and true_* columns.
    summary "readout.measurements":
      bland_altman_px / _mm   Bland-Altman agreement of the predicted longest diameter with the reference's
                              (bias = mean of predicted - reference, 95% limits of agreement), lesion images with
                              a predicted lesion; in mm over the images whose pixel size is known
      cue_auc                 for each numeric cue (measure.NUMERIC_CUES): ROC-AUC for benign vs malignant lesion
                              images (the probability that a malignant lesion's value is higher; < 0.5: lower in
                              malignant), from the predicted masks and, for comparison, from the reference masks
      terms                   how often each word (shape, orientation, margin) is given per true class
  uncertainty (--uncertainty)
    per image: the test-time-augmentation score of uncertainty.py (the same as predict.py --uncertainty) and the
    review flag. summary "readout.uncertainty":
      risk_coverage           mean Dice (b) of the images kept against the share kept, the most uncertain dropped
                              first, with the oracle (dropping the worst Dice first) and the mean over all images
      auc_failure             ROC-AUC of the score for telling failures (Dice (b) < FAILURE_DICE) from the rest
      spearman                rank correlation of the score with the Dice (b) (negative: higher score, lower Dice)
      chosen_cutoff           the cut-off with the largest Youden J for failures on these images: choose it on
                              validation images, store it with ship_checkpoint.py --uncertainty_cutoff
      flagged / unflagged     count and mean Dice of the images above / not above the cut-off in use (the setting,
                              else the checkpoint's, else the one chosen here)
Pictures: bland_altman.png, risk_coverage.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dataset import LESION_CLASSES, MAX_IMAGE_PIXELS, LoadedSet
from dicom_io import Geometry, PixelSize, is_dicom, read_frames
from measure import NUMERIC_CUES, cue_values, measure_lesions
from metrics import bland_altman, nanmean, risk_coverage, roc_auc, youden_cutoff
from predict import lesion_full, scale_min_area

FAILURE_DICE = 0.5     # an image whose Dice (b) is below this is a failure the review flag should catch
COVERAGES = (0.5, 0.8, 0.9, 1.0)  # shares kept reported in the table
TERM_GROUPS = ("shape", "orientation", "margin")


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------

def image_geometry(path: Path, shape: tuple[int, int], size_of: Callable[[Path], PixelSize | None]) -> Geometry:
    """The geometry of an evaluated image: its DICOM header (first frame, as the loader reads it), else its
    size with the pixel_mm setting's pixel size."""
    if is_dicom(path):
        geometry, _ = read_frames(path, 0, max_pixels=MAX_IMAGE_PIXELS)
        return geometry.with_fallback(size_of(path))
    return Geometry(*shape, pixel_spacing=size_of(path))


def _largest(mask: np.ndarray, geometry: Geometry) -> dict | None:
    lesions = measure_lesions(mask, geometry.pixel_size_at)
    return lesions[0] if lesions else None


def measurement_columns(pred: dict | None, true: dict | None) -> dict:
    """The per-image columns of the largest predicted and reference lesion (NaN / '' where there is none)."""
    nan = float("nan")
    row = {}
    for side, lesion in (("pred", pred), ("true", true)):
        row[f"{side}_long_mm"] = nan if lesion is None or lesion["long_diameter"]["mm"] is None \
            else lesion["long_diameter"]["mm"]
        row.update({f"{side}_{k}": v for k, v in cue_values(lesion).items()})
        row.update({f"{side}_{g}": lesion[g]["term"] if lesion else "" for g in TERM_GROUPS})
    return row


def add_measurements(rows: list[dict], data: LoadedSet, pred_mask: Callable[[str], np.ndarray],
                     size_of: Callable[[Path], PixelSize | None]) -> None:
    """Add measurement_columns to every row (rows in the order of data); pred_mask(key): the predicted mask."""
    for row, sample, true in zip(rows, data.samples, data.full_masks):
        geometry = image_geometry(sample.image, true.shape, size_of)
        row.update(measurement_columns(_largest(pred_mask(sample.key), geometry), _largest(true, geometry)))


def readout_columns(rows: list[dict]) -> list[str]:
    """The columns this module added to the rows, in a fixed order (for per_image.csv)."""
    names = [f"{side}_{k}" for side in ("pred", "true") for k in
             ("long_mm", *NUMERIC_CUES, *TERM_GROUPS)] + ["uncertainty", "review"]
    return [n for n in names if rows and n in rows[0]]


def measurement_summary(rows: list[dict]) -> dict:
    """Bland-Altman of the longest diameter (px, mm), AUC of each cue (benign vs malignant), word counts."""
    def col(key: str, sel) -> np.ndarray:
        return np.asarray([float(r.get(key, np.nan)) for r, s in zip(rows, sel) if s], dtype=float)
    lesion = [r["true_label"] in LESION_CLASSES for r in rows]
    both = [le and r["pred_area"] > 0 and r["true_area"] > 0 for le, r in zip(lesion, rows)]
    out = {"n_lesion_images": int(sum(lesion)), "n_with_prediction": int(sum(both)),
           "bland_altman_px": bland_altman(col("pred_long_diameter_px", both), col("true_long_diameter_px", both)),
           "bland_altman_mm": bland_altman(col("pred_long_mm", both), col("true_long_mm", both)), "cue_auc": {}}
    malignant = np.asarray([r["true_label"] == "malignant" for r, s in zip(rows, both) if s])
    for cue in NUMERIC_CUES:
        out["cue_auc"][cue] = {side: _auc(malignant, col(f"{side}_{cue}", both)) for side in ("pred", "true")}
    out["terms"] = {g: {c: _share([r.get(f"pred_{g}", "") for r, s in zip(rows, both) if s and r["true_label"] == c])
                        for c in LESION_CLASSES} for g in TERM_GROUPS}
    return out


def _auc(y: np.ndarray, v: np.ndarray) -> float:
    ok = ~np.isnan(v)
    return roc_auc(y[ok], v[ok]) if ok.any() else float("nan")


def _share(words: list[str]) -> dict[str, float]:
    return {w: words.count(w) / len(words) for w in sorted(set(words))} if words else {}


# ---------------------------------------------------------------------------------------------------------
# Uncertainty
# ---------------------------------------------------------------------------------------------------------

def add_uncertainty(rows: list[dict], batches, predictor, data: LoadedSet, setting: dict,
                    pred_mask: Callable[[str], np.ndarray], batch_size: int = 8) -> None:
    """Add the uncertainty score (uncertainty.py) to every row. batches: evaluate's (first index, lesion logits,
    label logits) of the reported predictions; setting: threshold, min_area, normal_gate; pred_mask(key): the
    reported mask."""
    from uncertainty import image_score, view_predictions
    size = data.images.shape[-1]
    for i, seg, _cls in batches:
        probs = torch.sigmoid(seg.float())
        views = view_predictions(predictor, data.images[i:i + len(seg)], probs, batch_size)
        for j in range(len(seg)):
            sample, shape = data.samples[i + j], data.full_masks[i + j].shape
            area = scale_min_area(setting["min_area"], size, shape)

            def to_mask(p, c, shape=shape, area=area) -> np.ndarray:
                return lesion_full(p, shape, setting["threshold"], area, c, setting["normal_gate"],
                                   setting.get("gate_keep", 1.0))
            rows[i + j]["uncertainty"] = image_score(pred_mask(sample.key),
                                                     [(p[j], None if c is None else c[j]) for p, c in views], to_mask)


def uncertainty_summary(rows: list[dict], cutoff: float | None, source: str) -> dict:
    """Risk-coverage, failure AUC, rank correlation, the chosen cut-off and flagged vs unflagged Dice; the rows
    get their review flag for the cut-off in use (cutoff, from `source`; None: the one chosen here)."""
    from scipy.stats import spearmanr
    score = np.asarray([r["uncertainty"] for r in rows], dtype=float)
    dice = np.asarray([r["dice_b"] for r in rows], dtype=float)
    failure = dice < FAILURE_DICE
    chosen, sens, spec = youden_cutoff(score, failure)
    if cutoff is None:
        cutoff, source = chosen, "chosen on these images"
    flagged = score > cutoff if cutoff == cutoff else np.zeros(score.shape, bool)
    for r, f in zip(rows, flagged):
        r["review"] = "yes" if f else "no"
    cov, kept = risk_coverage(score, dice)
    oracle_cov, oracle = risk_coverage(-dice, dice)
    rho = spearmanr(score, dice).statistic if len(rows) > 2 and np.ptp(score) > 0 else float("nan")
    return {"n": len(rows), "failure_dice": FAILURE_DICE, "n_failures": int(failure.sum()),
            "auc_failure": roc_auc(failure, score), "spearman": float(rho),
            "chosen_cutoff": chosen, "chosen_sensitivity": sens, "chosen_specificity": spec,
            "cutoff": cutoff, "cutoff_source": source,
            "flagged": {"n": int(flagged.sum()), "mean_dice_b": nanmean(dice[flagged])},
            "unflagged": {"n": int((~flagged).sum()), "mean_dice_b": nanmean(dice[~flagged])},
            "mean_dice_b": nanmean(dice),
            "risk_coverage": {"coverage": cov.tolist(), "mean_dice_b": kept.tolist(),
                              "oracle_coverage": oracle_cov.tolist(), "oracle_mean_dice_b": oracle.tolist()},
            "at_coverage": {f"{c:g}": _at(cov, kept, c) for c in COVERAGES}}


def _at(coverage: np.ndarray, kept: np.ndarray, share: float) -> float:
    """Mean quality at the largest coverage not above share (NaN when no point is)."""
    ok = coverage <= share + 1e-9
    return float(kept[ok][-1]) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Report and pictures
# ---------------------------------------------------------------------------------------------------------

def _n(v, digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def format_readout(readout: dict) -> list[str]:
    """The printed lines of the read-out summary."""
    lines = []
    m = readout.get("measurements")
    if m:
        for unit in ("px", "mm"):
            ba = m[f"bland_altman_{unit}"]
            if ba["n"]:
                lines.append(f"longest diameter, predicted - reference ({unit}, {ba['n']} lesion images): bias "
                             f"{_n(ba['bias'], 2)}, 95% limits of agreement {_n(ba['lower'], 2)} to {_n(ba['upper'], 2)}"
                             f" (mean reference {_n(ba['mean_reference'], 1)})")
        lines.append("benign vs malignant, ROC-AUC of each cue (predicted masks / reference masks; < 0.5: lower in "
                     "malignant):")
        lines += [f"  {cue:<20}{_n(v['pred'])} / {_n(v['true'])}" for cue, v in m["cue_auc"].items()]
    u = readout.get("uncertainty")
    if u:
        lines.append(f"uncertainty: ROC-AUC for failures (Dice (b) < {u['failure_dice']}, {u['n_failures']} of "
                     f"{u['n']}) {_n(u['auc_failure'])}, Spearman with Dice {_n(u['spearman'])}; mean Dice (b) kept "
                     + ", ".join(f"{float(c):.0%}: {_n(v)}" for c, v in u["at_coverage"].items()))
        lines.append(f"  review cut-off {_n(u['cutoff'], 4)} ({u['cutoff_source']}): flagged {u['flagged']['n']} "
                     f"(mean Dice (b) {_n(u['flagged']['mean_dice_b'])}), not flagged {u['unflagged']['n']} "
                     f"({_n(u['unflagged']['mean_dice_b'])})")
        lines.append(f"  cut-off chosen on these images (Youden J for failures): {_n(u['chosen_cutoff'], 4)}; on "
                     f"validation images store it with ship_checkpoint.py --uncertainty_cutoff {_n(u['chosen_cutoff'], 4)}")
    return lines


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_bland_altman(path: Path, rows: list[dict], ba: dict, unit: str = "px") -> None:
    """Difference (predicted - reference) of the longest diameter against the mean of the two, with the bias and
    the 95% limits of agreement."""
    plt = _plt()
    key = "long_diameter_px" if unit == "px" else "long_mm"
    pairs = np.asarray([(float(r[f"pred_{key}"]), float(r[f"true_{key}"])) for r in rows
                        if r.get("pred_area", 0) > 0 and r.get("true_area", 0) > 0], dtype=float).reshape(-1, 2)
    pairs = pairs[~np.isnan(pairs).any(1)]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(pairs.mean(1), pairs[:, 0] - pairs[:, 1], s=8, alpha=0.6)
    for v, style in ((ba["bias"], "-"), (ba["lower"], "--"), (ba["upper"], "--")):
        if v == v:
            ax.axhline(v, ls=style, color="tab:red", lw=1)
    ax.set_xlabel(f"mean of predicted and reference longest diameter ({unit})")
    ax.set_ylabel(f"predicted - reference ({unit})")
    ax.set_title(f"Bland-Altman, n={ba['n']}: bias {_n(ba['bias'], 1)}, limits {_n(ba['lower'], 1)} to "
                 f"{_n(ba['upper'], 1)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_risk_coverage(path: Path, u: dict) -> None:
    """Mean Dice (b) of the kept images against the share kept (most uncertain dropped first), the oracle and
    the mean over all images, with the review cut-off's point."""
    plt = _plt()
    rc = u["risk_coverage"]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot(rc["coverage"], rc["mean_dice_b"], "-", color="tab:blue", label="dropping the most uncertain first")
    ax.plot(rc["oracle_coverage"], rc["oracle_mean_dice_b"], ":", color="grey", label="oracle (worst Dice first)")
    ax.axhline(u["mean_dice_b"], ls="--", color="tab:orange", lw=1, label="no selection (random)")
    if u["unflagged"]["n"]:
        ax.plot([u["unflagged"]["n"] / u["n"]], [u["unflagged"]["mean_dice_b"]], "o", color="tab:red",
                label=f"review cut-off {_n(u['cutoff'], 3)}")
    ax.set_xlabel("share of images kept")
    ax.set_ylabel("mean Dice (b) of the kept images")
    ax.set_xlim(0, 1.02)
    ax.set_title(f"risk-coverage, n={u['n']}: failure AUC {_n(u['auc_failure'])}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readout_plots(out: Path, rows: list[dict], readout: dict) -> list[str]:
    """bland_altman.png and risk_coverage.png (those that have data) into out; returns the names written."""
    written = []
    m = readout.get("measurements")
    if m and m["bland_altman_px"]["n"]:
        unit = "mm" if m["bland_altman_mm"]["n"] else "px"
        plot_bland_altman(out / "bland_altman.png", rows, m[f"bland_altman_{unit}"], unit)
        written.append("bland_altman.png")
    if readout.get("uncertainty"):
        plot_risk_coverage(out / "risk_coverage.png", readout["uncertainty"])
        written.append("risk_coverage.png")
    return written
