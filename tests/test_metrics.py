"""metrics.py: the metric functions on hand-computed cases and against independent implementations
(scikit-learn, SMP, a brute-force HD95, a pairwise AUC), the new image-level figures (ROC-AUC, sensitivity and
specificity, calibration), the bootstrap intervals (plain and by patient) and the complete-miss rule."""
from __future__ import annotations

import math

import numpy as np
import pytest

import metrics as m
from dataset import CLASS_NAMES

nan = float("nan")


def isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def square(shape=(64, 64), top=10, left=10, side=20) -> np.ndarray:
    s = np.zeros(shape, bool)
    s[top:top + side, left:left + side] = True
    return s


# ---------------------------------------------------------------------------------------------------------
# Dice, IoU, precision, recall, confusion
# ---------------------------------------------------------------------------------------------------------

def test_dice_iou_hand_computed():
    pred = np.zeros((4, 4), bool)
    true = np.zeros((4, 4), bool)
    pred[0, 0:4] = True            # 4 pixels
    true[0, 1:4] = True            # 6 pixels, 3 of them shared with pred
    true[1, 1:4] = True
    d, j = m.dice_iou(pred, true)
    assert d == pytest.approx(2 * 3 / (4 + 6))
    assert j == pytest.approx(3 / 7)
    p, r = m.precision_recall(pred, true)
    assert p == pytest.approx(3 / 4) and r == pytest.approx(3 / 6)
    assert m.dice_iou(true, true) == (1.0, 1.0)
    assert m.dice_iou(pred, ~pred) == (0.0, 0.0)


def test_dice_iou_empty_cases():
    e, full = np.zeros((5, 5), bool), square((5, 5), 1, 1, 2)
    assert m.dice_iou(e, e) == (1.0, 1.0)                    # convention b: empty/empty scores 1
    assert all(isnan(v) for v in m.dice_iou(e, e, empty_score=nan))
    assert m.dice_iou(e, full) == (0.0, 0.0)                 # nothing predicted on a lesion
    assert m.dice_iou(full, e) == (0.0, 0.0)                 # something predicted on an empty mask
    p, r = m.precision_recall(e, full)
    assert isnan(p) and r == 0.0
    p, r = m.precision_recall(full, e)
    assert p == 0.0 and isnan(r)


def random_masks(rng, n=40, shape=(24, 30)):
    """Blobs of many sizes, some masks empty, some full."""
    out = []
    for i in range(n):
        if i % 10 == 0:
            out.append(np.zeros(shape, bool))
        elif i % 10 == 1:
            out.append(np.ones(shape, bool))
        else:
            out.append(rng.random(shape) < rng.uniform(0.02, 0.6))
    return out


def test_dice_iou_agree_with_sklearn():
    from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score
    rng = np.random.default_rng(0)
    preds, trues = random_masks(rng), random_masks(rng)[::-1]
    for pred, true in zip(preds, trues):
        d, j = m.dice_iou(pred, true)
        t, p = true.ravel(), pred.ravel()
        assert d == pytest.approx(f1_score(t, p, zero_division=1.0), abs=1e-12)
        assert j == pytest.approx(jaccard_score(t, p, zero_division=1.0), abs=1e-12)
        prec, rec = m.precision_recall(pred, true)
        if pred.any():
            assert prec == pytest.approx(precision_score(t, p, zero_division=0), abs=1e-12)
        if true.any():
            assert rec == pytest.approx(recall_score(t, p, zero_division=0), abs=1e-12)


def test_dice_iou_agree_with_smp():
    import torch
    import segmentation_models_pytorch as smp
    rng = np.random.default_rng(1)
    preds, trues = random_masks(rng, 20), random_masks(rng, 20)
    p = torch.as_tensor(np.stack(preds)[:, None].astype(np.int64))
    t = torch.as_tensor(np.stack(trues)[:, None].astype(np.int64))
    tp, fp, fn, tn = smp.metrics.get_stats(p, t, mode="binary")
    f1 = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)[:, 0]
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)[:, 0]
    for i in range(len(preds)):
        d, j = m.dice_iou(preds[i], trues[i])
        assert d == pytest.approx(float(f1[i]), abs=1e-6) and j == pytest.approx(float(iou[i]), abs=1e-6)


def test_classification_summary_agrees_with_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score
    rng = np.random.default_rng(2)
    true = [CLASS_NAMES[i] for i in rng.integers(0, 3, 60)]
    pred = [CLASS_NAMES[i] for i in rng.integers(0, 3, 60)]
    cm = m.confusion(true, pred)
    assert cm.tolist() == confusion_matrix(true, pred, labels=list(CLASS_NAMES)).tolist()
    s = m.classification_summary(cm)
    assert s["accuracy"] == pytest.approx(accuracy_score(true, pred))
    sens = recall_score(true, pred, labels=list(CLASS_NAMES), average=None)
    for c, v in zip(CLASS_NAMES, sens):
        assert s[f"sensitivity_{c}"] == pytest.approx(v)
        # specificity of c: the recall of "not c" when c is the positive class
        tt, pp = [x != c for x in true], [x != c for x in pred]
        assert s[f"specificity_{c}"] == pytest.approx(recall_score(tt, pp))


def test_classification_hand_computed():
    # true normal x2 (one called benign), benign x2 (correct), malignant x1 (called benign)
    s = m.classification_summary(m.confusion(["normal", "normal", "benign", "benign", "malignant"],
                                               ["normal", "benign", "benign", "benign", "benign"]))
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["sensitivity_normal"] == pytest.approx(1 / 2) and s["specificity_normal"] == 1.0
    assert s["sensitivity_benign"] == 1.0 and s["specificity_benign"] == pytest.approx(1 / 3)
    assert s["sensitivity_malignant"] == 0.0 and s["specificity_malignant"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# HD95
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [0, 1, 3, 7, 15])
@pytest.mark.parametrize("axis", [0, 1])
def test_hd95_squares_offset_by_d(d, axis):
    """Two 20x20 squares offset by d pixels along one axis: every boundary pixel lies at most d from the other
    boundary and the two leading edges (a quarter of all boundary pixels) exactly d, so HD95 = d."""
    a = square((80, 80), 20, 20, 20)
    b = np.roll(a, d, axis=axis)
    assert m.hd95(a, b) == pytest.approx(d)
    assert m.hd95(b, a) == pytest.approx(d)


def test_hd95_hand_computed_and_empty():
    a, b = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    a[10, 10] = True
    b[13, 14] = True                                           # a 3-4-5 triangle
    assert m.hd95(a, b) == pytest.approx(5.0)
    assert isnan(m.hd95(a, np.zeros_like(a))) and isnan(m.hd95(np.zeros_like(a), a))
    # a 9x9 square against its centre pixel: boundary pixels lie 4 (edge middles) to 4*sqrt(2) (corners) away;
    # pooled with the centre's distance 4 to the nearest boundary pixel
    sq, c = square((30, 30), 5, 5, 9), np.zeros((30, 30), bool)
    c[9, 9] = True
    border = np.array([[y, x] for y in range(5, 14) for x in range(5, 14) if y in (5, 13) or x in (5, 13)])
    dist = np.hypot(*(border - [9, 9]).T)
    assert m.hd95(sq, c) == pytest.approx(np.percentile(np.hstack([dist, [4.0]]), 95))


def test_hd95_matches_brute_force():
    """Against an independent implementation: boundaries from scikit-image, all pairwise distances."""
    from scipy.spatial.distance import cdist
    from skimage.segmentation import find_boundaries
    from scipy import ndimage
    rng = np.random.default_rng(3)
    for _ in range(12):
        a = ndimage.binary_opening(rng.random((60, 70)) < 0.5, iterations=2)
        b = ndimage.binary_opening(rng.random((60, 70)) < 0.5, iterations=2)
        a[:3], a[-3:], a[:, :3], a[:, -3:] = False, False, False, False  # away from the image edge
        b[:3], b[-3:], b[:, :3], b[:, -3:] = False, False, False, False
        if not a.any() or not b.any():
            continue
        pa = np.argwhere(find_boundaries(a, connectivity=1, mode="inner"))
        pb = np.argwhere(find_boundaries(b, connectivity=1, mode="inner"))
        dd = cdist(pa, pb)
        expected = np.percentile(np.hstack([dd.min(1), dd.min(0)]), 95)
        assert m.hd95(a, b) == pytest.approx(expected)


def test_hd95_boundary_at_the_image_edge():
    """A mask touching the image edge has its boundary there (the edge counts as outside)."""
    a = np.zeros((10, 10), bool)
    a[:, :4] = True                                            # columns 0..3, touching three edges
    assert m.surface(a)[:, 0].all() and m.surface(a)[:, 3].all() and not m.surface(a)[5, 1:3].any()
    assert m.hd95(a, a) == 0.0


def test_dice_iou_counts_vectorised_equals_masks():
    rng = np.random.default_rng(4)
    preds, trues = random_masks(rng, 15), random_masks(rng, 15)[::-1]
    inter = [int((p & t).sum()) for p, t in zip(preds, trues)]
    d, j = m.dice_iou_counts(inter, [p.sum() for p in preds], [t.sum() for t in trues])
    assert d.shape == j.shape == (15,)
    for k, (p, t) in enumerate(zip(preds, trues)):
        assert (d[k], j[k]) == m.dice_iou(p, t)
    d, j = m.dice_iou_counts(0, 0, 0, empty_score=nan)
    assert np.isnan(d) and np.isnan(j)


# ---------------------------------------------------------------------------------------------------------
# Complete miss, sensitivity and specificity, ROC-AUC
# ---------------------------------------------------------------------------------------------------------

def test_complete_miss():
    lesion, e = square((20, 20), 5, 5, 6), np.zeros((20, 20), bool)
    assert m.complete_miss(e, lesion)                          # nothing predicted
    assert m.complete_miss(square((20, 20), 0, 14, 4), lesion)  # something, but elsewhere
    assert not m.complete_miss(square((20, 20), 10, 10, 4), lesion)  # one pixel of overlap is enough
    assert not m.complete_miss(lesion, lesion)
    assert not m.complete_miss(e, e) and not m.complete_miss(lesion, e)  # no lesion: never a miss


def test_sens_spec_hand_computed():
    # 3 positives (2 called), 4 negatives (1 called)
    sens, spec = m.sens_spec([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0])
    assert sens == pytest.approx(2 / 3) and spec == pytest.approx(3 / 4)
    sens, spec = m.sens_spec([True, True], [True, False])
    assert sens == 0.5 and isnan(spec)                          # no negatives
    assert all(isnan(v) for v in m.sens_spec([], []))


def test_roc_auc_hand_computed():
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert m.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # pairs (positive, negative): (0.8 vs 0.1) 1, (0.8 vs 0.4) 1, (0.35 vs 0.1) 1, (0.35 vs 0.4) 0 -> 3/4
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # ties count one half: every pair tied -> 0.5; one tie among four pairs -> (3 + 0.5) / 4
    assert m.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)
    assert isnan(m.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])) and isnan(m.roc_auc([0, 0], [0.1, 0.2]))
    assert isnan(m.roc_auc([], []))


def test_roc_auc_agrees_with_sklearn_and_pairs():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(5)
    for _ in range(10):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        s = np.round(rng.random(40) + 0.3 * y, 1)                 # rounded: many ties
        pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
        assert m.roc_auc(y, s) == pytest.approx(np.mean(pairs))
        assert m.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------

def test_expected_calibration_error_hand_computed():
    # bin [0.1, 0.2): 0.1, 0.1 with outcomes 0, 1 -> mean 0.1, observed 0.5, gap 0.4, weight 2/5
    # bin [0.9, 1.0]: 0.9, 0.95, 1.0 with outcomes 1, 1, 1 -> mean 0.95, observed 1, gap 0.05, weight 3/5
    ece, table = m.expected_calibration_error([0, 1, 1, 1, 1], [0.1, 0.1, 0.9, 0.95, 1.0], bins=10)
    assert ece == pytest.approx(2 / 5 * 0.4 + 3 / 5 * 0.05)
    assert len(table) == 10 and [b["count"] for b in table] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 3]
    assert table[1] == {"lower": 0.1, "upper": 0.2, "count": 2, "mean_prob": pytest.approx(0.1), "observed": 0.5}
    assert table[9]["mean_prob"] == pytest.approx(0.95) and table[9]["observed"] == 1.0 and table[9]["upper"] == 1.0
    assert isnan(table[0]["mean_prob"]) and isnan(table[0]["observed"])


def test_expected_calibration_error_edges_and_perfect_calibration():
    _, table = m.expected_calibration_error([0, 0, 0, 0], [0.0, 0.3, 0.5, 0.7], bins=10)
    assert [b["count"] for b in table][:8] == [1, 0, 0, 1, 0, 1, 0, 1]  # an edge value opens its bin
    ece, _ = m.expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], bins=4)
    assert ece == 0.0                                          # 0.5 predicted, half of them positive
    ece, table = m.expected_calibration_error([1, 1], [0.0, 0.0], bins=2)
    assert ece == 1.0 and table[0]["count"] == 2
    ece, table = m.expected_calibration_error([], [], bins=5)
    assert isnan(ece) and len(table) == 5 and all(b["count"] == 0 for b in table)


# ---------------------------------------------------------------------------------------------------------
# Summaries and the bootstrap
# ---------------------------------------------------------------------------------------------------------

def test_stats_ignores_undefined_values():
    s = m.stats([1.0, nan, 3.0, None, 2.0])
    assert s == {"mean": 2.0, "std": pytest.approx(np.std([1, 2, 3])), "median": 2.0, "n": 3}
    assert isnan(m.stats([nan])["mean"]) and m.stats([])["n"] == 0
    assert m.nanmean([1.0, nan, 2.0]) == 1.5 and isnan(m.nanmean([])) and isnan(m.nanmean([nan]))


def test_bootstrap_constant_and_deterministic():
    assert m.bootstrap_ci([0.7] * 10, np.mean, n_boot=50) == (pytest.approx(0.7), pytest.approx(0.7))
    x = list(np.random.default_rng(6).random(30))
    a = m.bootstrap_ci(x, np.mean, n_boot=200, seed=3)
    assert a == m.bootstrap_ci(x, np.mean, n_boot=200, seed=3)   # same seed, same interval
    assert a != m.bootstrap_ci(x, np.mean, n_boot=200, seed=4)
    assert a[0] < np.mean(x) < a[1]
    assert all(isnan(v) for v in m.bootstrap_ci([], np.mean))
    assert all(isnan(v) for v in m.bootstrap_ci(x, np.mean, n_boot=0))


def test_bootstrap_percentiles_of_a_known_resampling():
    """Two rows: a resample of the mean is 0 (1/4), 0.5 (1/2) or 1 (1/4); the 95% interval is (0, 1), the
    50% interval (alpha 0.5: 25th and 75th percentiles) lies inside [0, 1] around 0.5."""
    lo, hi = m.bootstrap_ci([0.0, 1.0], np.mean, n_boot=2000, seed=0)
    assert (lo, hi) == (0.0, 1.0)
    lo, hi = m.bootstrap_ci([0.0, 1.0], np.mean, n_boot=2000, seed=0, alpha=0.5)
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_bootstrap_width_matches_the_normal_approximation():
    x = np.random.default_rng(7).normal(10.0, 2.0, 400)
    lo, hi = m.bootstrap_ci(x, np.mean, n_boot=2000, seed=1)   # an array: indexed by index arrays
    half = 1.96 * x.std() / np.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def test_bootstrap_by_group_keeps_groups_whole():
    """Patient a has three rows, b one: a resample by patient draws two whole patients, so it holds 2 (b b),
    4 (a b) or 6 (a a) rows; a resample of single rows always holds 4."""
    sizes: list[int] = []

    def record(rows) -> float:
        sizes.append(len(rows))
        return float(np.mean(rows))
    m.bootstrap_ci([1.0, 1.0, 1.0, 0.0], record, groups=["a", "a", "a", "b"], n_boot=300, seed=0)
    assert set(sizes) == {2, 4, 6}
    sizes.clear()
    m.bootstrap_ci([1.0, 1.0, 1.0, 0.0], record, n_boot=300, seed=0)
    assert set(sizes) == {4}
    # by patient the mean is 0 (b b), 0.75 (a b) or 1 (a a): the interval ends are two of those
    lo, hi = m.bootstrap_ci([1.0, 1.0, 1.0, 0.0], np.mean, groups=["a", "a", "a", "b"], n_boot=500, seed=0)
    assert (lo, hi) == (0.0, 1.0)
    with pytest.raises(ValueError):
        m.bootstrap_ci([1.0, 2.0], np.mean, groups=["a"])


def test_bootstrap_skips_undefined_resamples():
    """An AUC is undefined when a resample holds one class only: such resamples are left out."""
    y, s = np.array([0, 1, 0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8, 0.6, 0.4])
    rows = np.arange(6)
    lo, hi = m.bootstrap_ci(rows, lambda i: m.roc_auc(y[i], s[i]), n_boot=300, seed=0)
    assert 0.0 <= lo <= m.roc_auc(y, s) <= hi <= 1.0
    assert all(isnan(v) for v in m.bootstrap_ci(rows[:3:2], lambda i: m.roc_auc(y[i], s[i]), n_boot=20))


# ---------------------------------------------------------------------------------------------------------
# Bland-Altman, risk-coverage, Youden cut-off
# ---------------------------------------------------------------------------------------------------------

def test_bland_altman_hand_computed():
    ref = np.array([10.0, 20.0, 30.0, 40.0])
    got = m.bland_altman(ref + np.array([1.0, 3.0, 1.0, 3.0]), ref)
    assert got["n"] == 4 and got["bias"] == pytest.approx(2.0)
    assert got["sd"] == pytest.approx(np.std([1, 3, 1, 3], ddof=1))
    assert got["lower"] == pytest.approx(2.0 - 1.96 * got["sd"]) and got["upper"] == pytest.approx(2.0 + 1.96 * got["sd"])
    assert got["mean_reference"] == pytest.approx(25.0)
    partial = m.bland_altman([1.0, nan, 5.0], [0.0, 2.0, nan])  # pairs with a NaN are left out
    assert partial["n"] == 1 and partial["bias"] == 1.0 and isnan(partial["sd"])
    assert m.bland_altman([], [])["n"] == 0 and isnan(m.bland_altman([], [])["bias"])


def test_risk_coverage_drops_the_most_uncertain_first():
    score = [0.9, 0.1, 0.5, 0.5, nan]
    quality = [0.0, 1.0, 0.6, 0.8, 0.3]
    cov, q = m.risk_coverage(score, quality)
    assert cov.tolist() == pytest.approx([0.25, 0.75, 1.0])  # the two tied scores are kept together
    assert q.tolist() == pytest.approx([1.0, (1.0 + 0.6 + 0.8) / 3, 2.4 / 4])
    assert m.risk_coverage([], [])[0].size == 0


def test_youden_cutoff_separates_a_clean_split():
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    positive = np.array([0, 0, 0, 1, 1, 1], bool)
    cut, sens, spec = m.youden_cutoff(score, positive)
    assert cut == pytest.approx(0.45) and sens == 1.0 and spec == 1.0
    cut, sens, spec = m.youden_cutoff([0.1, 0.8, 0.3, 0.9], [0, 0, 1, 1])  # best: 0.2 (sens 1, spec 0.5)
    assert (cut, sens, spec) == (pytest.approx(0.2), 1.0, 0.5)
    assert all(isnan(v) for v in m.youden_cutoff([0.1, 0.2], [1, 1]))
