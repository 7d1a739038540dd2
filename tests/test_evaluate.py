"""evaluate.py: the per-image rows and the empty-mask conventions, the off-domain figures (miss rate, normal
false positives, AUC, calibration, bootstrap intervals by patient, subgroups) from hand-made rows, fake
predictors with and without a classification head, the joint threshold x min_area (x gate) sweep, evaluate.py
end to end on phantoms (also through a manifest with patient and subgroup columns), its agreement with
train.py's validation log, K-fold splits through train.py and the gathering of per-fold results, and a run on a
few real BUSI images (skipped when the data is absent). The metric functions themselves: test_metrics.py."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate as ev
from conftest import BUSI, ROOT, needs_busi
from dataset import CLASS_NAMES, LESION_CLASSES
from metrics import expected_calibration_error
from predict import Decision
from test_metrics import isnan, nan, square


def decision(lesion: np.ndarray, label: str | None = None, channel: np.ndarray | None = None) -> Decision:
    """A Decision as predict.decide makes it: channel gives each lesion pixel's class index (default: all the
    label's class, or benign)."""
    lesion = np.asarray(lesion, bool)
    if label is None:
        label = "benign" if lesion.any() else "normal"
    if channel is None:
        channel = np.full(lesion.shape, LESION_CLASSES.index(label) if label in LESION_CLASSES else 0)
    class_masks = np.stack([lesion & (channel == c) for c in range(len(LESION_CLASSES))])
    return Decision(lesion, class_masks, label, 0.9, 0.9)


# ---------------------------------------------------------------------------------------------------------
# Metric functions
# ---------------------------------------------------------------------------------------------------------

def test_image_metrics_empty_mask_conventions():
    e, les = np.zeros((32, 32), bool), square((32, 32), 4, 4, 10)
    # (1) empty prediction on an empty mask: (a) left out of the mean, judged a true negative; (b) scores 1
    tn = ev.image_metrics(decision(e), e, "normal")
    assert isnan(tn["dice_a"]) and isnan(tn["iou_a"]) and tn["dice_b"] == 1.0 and tn["iou_b"] == 1.0
    assert isnan(tn["hd95"]) and tn["pred_label"] == "normal" and tn["true_area"] == 0
    # (2) non-empty prediction on an empty mask: (a) left out, a false positive; (b) scores 0
    fp = ev.image_metrics(decision(les, "malignant"), e, "normal")
    assert isnan(fp["dice_a"]) and fp["dice_b"] == 0.0 and fp["iou_b"] == 0.0 and fp["pred_area"] == 100
    # (3) empty prediction on a lesion: 0 under both conventions
    fn = ev.image_metrics(decision(e), les, "benign")
    assert fn["dice_a"] == 0.0 and fn["dice_b"] == 0.0 and isnan(fn["hd95"]) and fn["recall"] == 0.0
    # (4) perfect prediction
    ok = ev.image_metrics(decision(les, "benign"), les, "benign")
    assert ok["dice_a"] == ok["dice_b"] == ok["iou_a"] == 1.0 and ok["hd95"] == 0.0

    s = ev.summarize([{"file": str(i), **r} for i, r in enumerate([tn, fp, fn, ok])])
    # lesion subset (benign+malignant images): fn and ok
    assert s["lesion"]["n_images"] == 2
    assert s["lesion"]["dice_a"]["mean"] == pytest.approx(0.5) and s["lesion"]["dice_a"]["n"] == 2
    assert s["lesion"]["empty_masks"]["n"] == 0
    # all images: convention a still averages the 2 lesion images only; b averages all 4 (1, 0, 0, 1)
    assert s["all"]["dice_a"]["mean"] == pytest.approx(0.5) and s["all"]["dice_a"]["n"] == 2
    assert s["all"]["dice_b"]["mean"] == pytest.approx(0.5) and s["all"]["dice_b"]["n"] == 4
    assert s["all"]["dice_b"]["median"] == pytest.approx(0.5)
    assert s["all"]["empty_masks"] == {"n": 2, "true_negative": 1, "false_positive": 1, "true_negative_rate": 0.5}
    cm = np.array(s["classification"]["confusion_matrix"])
    assert cm.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]   # rows true normal/benign/malignant
    assert s["classification"]["accuracy"] == pytest.approx(0.5)


def test_per_class_dice_is_per_channel():
    """A benign image whose lesion is predicted half benign, half malignant."""
    true = square((40, 40), 10, 10, 10)                       # 100 pixels, rows 10..19
    channel = np.zeros((40, 40), int)
    channel[15:] = 1                                          # rows 15.. go to the malignant channel
    r = ev.image_metrics(decision(true, "benign", channel), true, "benign")
    assert r["dice_a"] == 1.0                                 # the union of the channels is perfect
    assert r["dice_benign_a"] == pytest.approx(2 * 50 / (50 + 100))
    assert r["iou_benign_a"] == pytest.approx(50 / 100)
    assert r["dice_benign_b"] == r["dice_benign_a"]
    assert isnan(r["dice_malignant_a"])                       # (a): no malignant lesion in this image
    assert r["dice_malignant_b"] == 0.0                       # (b): malignant pixels on an empty channel
    assert r["pred_area_benign"] == 50 and r["pred_area_malignant"] == 50
    # a normal image with nothing predicted: every channel is empty/empty
    e = np.zeros((40, 40), bool)
    r = ev.image_metrics(decision(e), e, "normal")
    assert all(r[f"dice_{c}_b"] == 1.0 and isnan(r[f"dice_{c}_a"]) for c in LESION_CLASSES)


def test_image_metrics_miss_and_false_positive_columns():
    e, les = np.zeros((32, 32), bool), square((32, 32), 4, 4, 10)
    elsewhere = square((32, 32), 20, 20, 5)
    assert ev.image_metrics(decision(e), les, "benign")["complete_miss"] == 1
    assert ev.image_metrics(decision(elsewhere), les, "malignant")["complete_miss"] == 1  # no overlap
    hit = ev.image_metrics(decision(les | elsewhere), les, "benign")
    assert hit["complete_miss"] == 0 and isnan(hit["false_positive"])
    fp = ev.image_metrics(decision(elsewhere, "benign"), e, "normal")
    assert fp["false_positive"] == 1 and isnan(fp["complete_miss"])
    assert ev.image_metrics(decision(e), e, "normal")["false_positive"] == 0
    assert isnan(hit["malignancy"]) and isnan(hit["p_normal"])  # decision() makes one without either


def hand_row(label: str, dice: float, miss=nan, fp=nan, malignancy=nan, patient: str = "", **extra) -> dict:
    """A per-image row with just what the figures read (and what summarize needs besides)."""
    return {"file": f"{label}{dice}{malignancy}", "true_label": label, "pred_label": label, "dice_a": dice,
            "iou_a": dice / 2 if dice == dice else nan, "complete_miss": miss, "false_positive": fp,
            "malignancy": malignancy, "true_area": 0 if label == "normal" else 10, "pred_area": 1, "patient": patient,
            **{k: nan for k in ev.METRIC_KEYS if k not in ("dice_a", "iou_a")}, **extra}


def hand_rows() -> list[dict]:
    """5 lesion images (two missed, one of them without a malignancy) and 4 normal images (one given a lesion)
    of 4 patients; a doppler column."""
    return [hand_row("benign", 0.8, 0, malignancy=0.2, patient="p1", doppler="no"),
            hand_row("benign", 0.0, 1, malignancy=0.6, patient="p1", doppler="yes"),
            hand_row("malignant", 0.9, 0, malignancy=0.9, patient="p2", doppler="no"),
            hand_row("malignant", 0.0, 1, malignancy=nan, patient="p2", doppler="no"),
            hand_row("malignant", 0.7, 0, malignancy=0.4, patient="p3", doppler="yes"),
            hand_row("normal", nan, fp=1, malignancy=0.7, patient="p3", doppler="yes"),
            hand_row("normal", nan, fp=0, patient="p4", doppler="no"),
            hand_row("normal", nan, fp=0, patient="p4", doppler="no"),
            hand_row("normal", nan, fp=0, patient="p4", doppler="yes")]


def test_figures_hand_computed():
    f, table = ev.figures(hand_rows())
    assert f["n_lesion"] == 5 and f["n_normal"] == 4
    assert f["lesion_dice"] == pytest.approx((0.8 + 0.9 + 0.7) / 5) and f["lesion_iou"] == pytest.approx(2.4 / 10)
    assert f["miss_rate"] == pytest.approx(2 / 5) and f["normal_fp_share"] == pytest.approx(1 / 4)
    # malignancy: benign 0.2, 0.6; malignant 0.9, none (-> 0.5), 0.4. Pairs (m, b): 0.9 beats both, 0.5 beats
    # 0.2, 0.4 beats 0.2: 4 of 6
    assert f["auc"] == pytest.approx(4 / 6)
    # called malignant at >= 0.5: 0.9 (malignant), 0.6 (benign); the image without a malignancy is not called
    assert f["sensitivity_malignant"] == pytest.approx(1 / 3) and f["specificity_malignant"] == pytest.approx(1 / 2)
    assert f["n_lesion_without_malignancy"] == 1 and f["malignancy_cutoff"] == 0.5
    ece, expected_table = expected_calibration_error([0, 0, 1, 1, 1], [0.2, 0.6, 0.9, 0.5, 0.4])
    assert f["ece"] == pytest.approx(ece) and table == expected_table


def test_intervals_resample_patients_and_subgroups():
    rows = hand_rows()
    s = ev.summarize(rows, subgroups=("doppler",), n_boot=200)
    ci = s["intervals"]
    assert ci["resampled_by"] == "patient" and ci["n_units"] == 4 and ci["n_boot"] == 200
    for k in ev.FIGURE_KEYS:
        lo, hi = ci[k]
        assert lo <= s["figures"][k] <= hi, k
    assert ci == ev.summarize(rows, n_boot=200)["intervals"]  # deterministic (seed 0)
    by_image = ev.intervals([{**r, "patient": ""} for r in rows], n_boot=200)
    assert by_image["resampled_by"] == "image" and by_image["n_units"] == 9
    groups = {r["value"]: r for r in s["subgroups"]}
    assert set(groups) == {"no", "yes"} and all(r["column"] == "doppler" for r in s["subgroups"])
    no, yes = groups["no"], groups["yes"]
    assert (no["n"], no["n_lesion"], no["n_normal"]) == (5, 3, 2)
    assert no["lesion_dice"] == pytest.approx((0.8 + 0.9) / 3) and no["miss_rate"] == pytest.approx(1 / 3)
    assert no["normal_fp_share"] == 0.0 and no["auc"] == pytest.approx(1.0)  # benign 0.2 against 0.9 and 0.5
    assert (yes["n"], yes["n_lesion"], yes["n_normal"]) == (4, 2, 2) and yes["normal_fp_share"] == 0.5
    assert yes["auc"] == 0.0                                   # benign 0.6 above malignant 0.4
    table = ev.format_table(s)
    assert "complete misses" in table and "ROC-AUC" in table and "doppler=yes" in table
    assert "resamples of 4 patients" in table
    assert "intervals" not in ev.summarize(rows) and "subgroups" not in ev.summarize(rows)


def test_headline_keeps_the_logged_keys():
    h = ev.headline(ev.summarize(hand_rows()))
    assert {"dice", "iou", "dice_all_b", "accuracy"} <= set(h)
    assert h["miss_rate"] == pytest.approx(0.4) and h["normal_fp_share"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------
# Fake predictors on a synthetic set: without and with a classification head
# ---------------------------------------------------------------------------------------------------------

NET, H, W = 32, 60, 72  # network input size and original image size (min_area scales by H * W / NET**2)


def block(top: int, left: int, side: int) -> tuple[slice, slice]:
    return slice(top, top + side), slice(left, left + side)


# (label, patient, doppler, predicted lesion block or None, its channel, single false pixel or None,
#  true lesion block (default: the predicted one), head probabilities over normal/benign/malignant)
SPECS = [("benign", "p1", "no", (8, 8, 8), 0, None, None, (0.05, 0.85, 0.10)),
         ("malignant", "p1", "yes", (10, 12, 10), 1, None, None, (0.05, 0.25, 0.70)),
         ("malignant", "p2", "no", None, 1, None, (6, 6, 8), (0.20, 0.30, 0.50)),        # nothing predicted
         ("benign", "p2", "yes", (2, 2, 6), 0, None, (20, 20, 8), (0.10, 0.60, 0.30)),   # predicted elsewhere
         ("normal", "p3", "no", None, 0, (5, 5), None, (0.85, 0.05, 0.10)),              # a small false blob
         ("normal", "p3", "no", None, 0, None, None, (0.95, 0.03, 0.02)),
         ("normal", "p4", "yes", None, 0, (25, 25), None, (0.55, 0.20, 0.25)),           # a small false blob
         ("benign", "p4", "no", (4, 16, 8), 0, None, None, (0.20, 0.30, 0.50))]


def synthetic_set():
    """(LoadedSet of SPECS at NET x NET with original masks H x W, lesion logits, head logits). Each image's
    first pixel holds its index, so that a fake predictor can look its logits up."""
    import torch
    from dataset import LoadedSet, Sample
    from predict import decide, to_original
    n = len(SPECS)
    logits = torch.full((n, len(LESION_CLASSES), NET, NET), -8.0)
    images = np.zeros((n, 1, NET, NET), np.uint8)
    targets = np.zeros((n, len(LESION_CLASSES), NET, NET), np.uint8)
    samples, masks = [], []
    for k, (label, patient, doppler, pred, channel, blob, true, _) in enumerate(SPECS):
        images[k, 0, 0, 0] = k
        if pred:
            logits[k][(channel, *block(*pred))] = 8.0
        if blob:
            logits[k, 0, blob[0], blob[1]] = 8.0
        true = true or pred
        ideal = torch.full((len(LESION_CLASSES), NET, NET), -8.0)
        if true:
            ideal[(0, *block(*true))] = 8.0
            targets[k][(LESION_CLASSES.index(label), *block(*true))] = 1
        masks.append(decide(to_original(torch.sigmoid(ideal), (H, W)), 0.5).lesion)
        samples.append(Sample(Path(f"img{k}.png"), (), label, f"img{k}.png", patient, (("doppler", doppler),)))
    head = torch.log(torch.tensor([s[-1] for s in SPECS]))
    return LoadedSet(samples, images, targets, masks, [str(k) for k in range(n)]), logits, head


def fake_predictor(logits, head=None, as_tuple: bool = False):
    """A predictor as predict.load_predictor makes one: lesion logits, or (lesion, label) logits."""
    import torch

    def predict(images, batch_size, tta):
        index = torch.as_tensor(np.asarray(images)[:, 0, 0, 0].astype(np.int64))
        if head is not None:
            return logits[index], head[index]
        return (logits[index],) if as_tuple else logits[index]
    return predict


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_set()


def test_without_a_head_the_numbers_are_as_before(synthetic):
    """A checkpoint without a head: the rows are those of the old code path (predict.decide at the threshold
    alone), whether the predictor returns a tensor or a 1-tuple, and the defaults apply no post-processing."""
    import torch
    from predict import decide, to_original
    data, logits, _ = synthetic
    rows, s = ev.evaluate_set(fake_predictor(logits), data, 0.5, batch_size=3)
    for k, r in enumerate(rows):
        d = decide(to_original(torch.sigmoid(logits[k]), (H, W)), 0.5)
        old = ev.image_metrics(d, data.full_masks[k], data.samples[k].label)
        np.testing.assert_equal({key: r[key] for key in old}, old)  # NaN equals NaN here
        assert isnan(r["p_normal"]) and r["patient"] == SPECS[k][1]
    again, s2 = ev.evaluate_set(fake_predictor(logits, as_tuple=True), data, 0.5, batch_size=5, min_area=0.0,
                                normal_gate=1.0)
    np.testing.assert_equal(again, rows)
    assert s2["val_loss"] == s["val_loss"]
    f = s["figures"]
    assert [r["complete_miss"] for r in rows if r["true_label"] != "normal"] == [0, 0, 1, 1, 0]
    assert f["miss_rate"] == pytest.approx(2 / 5) and f["normal_fp_share"] == pytest.approx(2 / 3)
    assert f["lesion_dice"] == pytest.approx(3 / 5)             # three perfect, two missed
    # malignancy from the channels: ~0 for the benign-channel lesions, ~1 for the malignant one, none when
    # nothing is predicted (counted 0.5): every malignant image above every benign one
    assert isnan(rows[2]["malignancy"]) and rows[1]["malignancy"] > 0.99 and rows[0]["malignancy"] < 0.01
    assert f["auc"] == 1.0 and f["sensitivity_malignant"] == 0.5 and f["specificity_malignant"] == 1.0


def test_with_a_head_label_malignancy_and_gate(synthetic):
    data, logits, head = synthetic
    rows, s = ev.evaluate_set(fake_predictor(logits, head), data, 0.5)
    probs = [spec[-1] for spec in SPECS]
    for r, p in zip(rows, probs):
        assert r["p_normal"] == pytest.approx(p[0]) and r["malignancy"] == pytest.approx(p[2] / (p[1] + p[2]))
    # the head labels every image with a lesion left: the false blobs too (malignancy 0.67 and 0.56)
    assert [r["pred_label"] for r in rows] == ["benign", "malignant", "normal", "benign", "malignant", "normal",
                                               "malignant", "malignant"]
    f = s["figures"]
    # malignant 0.778, 0.625 against benign 0.105, 0.333, 0.625 (a tie): 5.5 of 6 pairs
    assert f["auc"] == pytest.approx(5.5 / 6) and f["n_lesion_without_malignancy"] == 0
    assert f["sensitivity_malignant"] == 1.0 and f["specificity_malignant"] == pytest.approx(2 / 3)
    assert f["normal_fp_share"] == pytest.approx(2 / 3)
    gated, s7 = ev.evaluate_set(fake_predictor(logits, head), data, 0.5, normal_gate=0.7)
    assert [r["false_positive"] for r in gated if r["true_label"] == "normal"] == [0, 0, 1]  # P(normal) 0.85 >= 0.7
    assert s7["figures"]["normal_fp_share"] == pytest.approx(1 / 3)
    assert s7["figures"]["lesion_dice"] == s["figures"]["lesion_dice"]  # lesion images have P(normal) <= 0.2


def test_min_area_scales_to_the_image(synthetic):
    """min_area is in pixels at the network's input size: 10 of them are 10 * 60 * 72 / 32**2 = 42 pixels here,
    more than a false one-pixel blob grows to, far less than a lesion."""
    data, logits, _ = synthetic
    rows, s = ev.evaluate_set(fake_predictor(logits), data, 0.5, min_area=10.0)
    assert s["figures"]["normal_fp_share"] == 0.0
    assert s["figures"]["lesion_dice"] == pytest.approx(3 / 5)
    assert ev._area_px(10.0, data, (H, W)) == pytest.approx(10 * H * W / NET ** 2)


def test_head_with_the_wrong_classes_is_a_clear_error(synthetic):
    data, logits, head = synthetic
    with pytest.raises(ev.DataError, match="gives 2 classes, expected 3"):
        ev.evaluate_set(fake_predictor(logits, head[:, :2]), data, 0.5)


def sweep_matches_evaluation(data, predictor, sweep):
    """Every row of a sweep equals evaluate_set at that setting."""
    keys = ("dice", "iou", "dice_all_b", "accuracy", "miss_rate", "normal_fp_share")
    for r in sweep:
        _, s = ev.evaluate_set(predictor, data, r["threshold"], with_hd95=False, min_area=r["min_area"],
                               normal_gate=r["normal_gate"])
        h = ev.headline(s)
        assert {k: r[k] for k in keys} == pytest.approx({k: h[k] for k in keys}, nan_ok=True), r


def test_tune_removes_a_small_false_blob(synthetic):
    """Without a head: the sweep over threshold x min_area picks the smallest min_area that clears the false
    blobs of the normal images (threshold 0.5: the masks were drawn at 0.5, so the lesions are perfect there),
    and each row is what evaluate_set gives at that setting."""
    data, logits, _ = synthetic
    predictor = fake_predictor(logits)
    sweep = ev.threshold_sweep(predictor, data, batch_size=3, min_areas=ev.MIN_AREA_GRID, gates=ev.GATE_GRID)
    assert len(sweep) == len(ev.THRESHOLD_GRID) * len(ev.MIN_AREA_GRID)  # no head: the gate is not swept
    best = ev.choose_setting(sweep)
    assert (best["threshold"], best["min_area"], best["normal_gate"]) == (0.5, 10.0, 1.0)
    assert best["normal_fp_share"] == 0.0 and best["dice"] == pytest.approx(3 / 5) and best["miss_rate"] == 0.4
    at_zero = [r for r in sweep if r["threshold"] == 0.5 and r["min_area"] == 0.0][0]
    assert at_zero["normal_fp_share"] == pytest.approx(2 / 3) and at_zero["dice_all_b"] < best["dice_all_b"]
    sweep_matches_evaluation(data, predictor, sweep)
    text = ev.format_sweep(sweep, best)
    assert "min_area" in text and "normal_gate" not in text


def test_tune_with_a_head_sweeps_the_gate(synthetic):
    data, logits, head = synthetic
    predictor = fake_predictor(logits, head)
    sweep = ev.threshold_sweep(predictor, data, grid=(0.3, 0.5), min_areas=(0.0, 10.0), gates=ev.GATE_GRID)
    assert len(sweep) == 2 * 2 * len(ev.GATE_GRID)
    best = ev.choose_setting(sweep)
    # both blobs go with a gate at or below 0.55 (P(normal) 0.85 and 0.55) or with min_area 10: equal Dice (b);
    # ties go to the higher gate (no gate clears fewest masks), then the threshold nearer 0.5, the smaller min_area
    assert (best["threshold"], best["min_area"], best["normal_gate"]) == (0.5, 10.0, 1.0)
    assert best["normal_fp_share"] == 0.0
    sweep_matches_evaluation(data, predictor, sweep)
    assert "normal_gate 1" in ev.format_sweep(sweep, best)


def test_choose_setting_ties():
    rows = [{"threshold": 0.5, "min_area": 20.0, "normal_gate": 1.0, "dice_all_b": 0.8},
            {"threshold": 0.5, "min_area": 10.0, "normal_gate": 0.9, "dice_all_b": 0.8},
            {"threshold": 0.5, "min_area": 10.0, "normal_gate": 1.0, "dice_all_b": 0.8},
            {"threshold": 0.4, "min_area": 0.0, "normal_gate": 1.0, "dice_all_b": 0.8}]
    assert ev.choose_setting(rows) == rows[2]
    assert ev.choose_setting(rows + [{"threshold": 0.9, "min_area": 160.0, "normal_gate": 0.3,
                                      "dice_all_b": 0.81}])["threshold"] == 0.9
    # within the tolerance (one image of a small validation set) a gate that clears masks does not win
    assert ev.choose_setting(rows + [{"threshold": 0.5, "min_area": 0.0, "normal_gate": 0.3,
                                      "dice_all_b": 0.803}]) == rows[2]


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------

def test_json_safe_and_csv_round_trip(tmp_path):
    assert ev.json_safe({"a": nan, "b": [np.float32(1.5), math.inf], "c": np.int64(3)}) == \
        {"a": None, "b": [1.5, None], "c": 3}
    e, les = np.zeros((16, 16), bool), square((16, 16), 2, 2, 6)
    rows = [{"file": "n.png", **ev.image_metrics(decision(e), e, "normal")},
            {"file": "b.png", **ev.image_metrics(decision(les, "benign"), les, "benign")}]
    ev.write_rows(tmp_path / "x.csv", rows)
    back = ev.read_rows(tmp_path / "x.csv")
    assert [r["file"] for r in back] == ["n.png", "b.png"]
    assert isnan(back[0]["dice_a"]) and back[0]["dice_b"] == 1.0 and back[1]["true_area"] == 36
    with open(tmp_path / "x.csv", newline="") as f:
        assert next(csv.reader(f)) == ev.CSV_FIELDS
    table = ev.format_table(ev.summarize(rows))
    assert "dice_a" in table and "empty masks (all): 1" in table and "lesion Dice" in table


def test_gitignore_covers_the_gallery_folders():
    out = ROOT / "checkpoints" / "eval"                        # committed folder: gallery must go elsewhere
    g = ev.default_gallery_dir(out)
    assert ev.is_git_ignored_location(g) and not ev.is_git_ignored_location(out)
    assert g.resolve().relative_to(ROOT).parts[0] == "private"
    assert ev.default_gallery_dir(ROOT / "runs" / "x" / "eval") == ROOT / "runs" / "x" / "eval" / "gallery"
    assert ev.is_git_ignored_location(Path("/tmp/somewhere"))
    if shutil.which("git") and (ROOT / ".git").exists():      # the list matches .gitignore
        for d in (*ev.IGNORED_DIRS, g.relative_to(ROOT).as_posix() + "/best_worst.png"):
            path = d if (ROOT / d).is_symlink() else f"{d}/x.png"  # data/ may be a link to the data sets
            r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
            assert r.returncode == 0, f"{d} is not git-ignored"


def test_gather_folds_hand_made(tmp_path):
    """Three fold summaries with known numbers: mean and population std over folds."""
    dice = [0.6, 0.7, 0.8]
    for i, d in enumerate(dice):
        f = tmp_path / f"fold{i}" / "summary.json"
        f.parent.mkdir()
        s = {"lesion": {"dice_a": {"mean": d}, "iou_a": {"mean": d / 2}, "hd95": {"mean": None}},
             "all": {"dice_b": {"mean": 0.5}, "n_images": 10}, "classification": {"accuracy": 0.9}, "fold": i}
        f.write_text(json.dumps(s))
    r = ev.gather_folds(str(tmp_path / "fold*" / "summary.json"))
    assert r["n_folds"] == 3 and [p["fold"] for p in r["folds"]] == [0, 1, 2]
    assert r["combined"]["lesion_dice"]["mean"] == pytest.approx(0.7)
    assert r["combined"]["lesion_dice"]["std"] == pytest.approx(np.std(dice))
    assert r["combined"]["lesion_iou"]["mean"] == pytest.approx(0.35)
    assert isnan(r["combined"]["lesion_hd95"]["mean"]) and r["combined"]["lesion_hd95"]["n_folds"] == 0
    assert "pooled" not in r                                   # no per_image.csv beside the summaries
    assert "0.7000" in ev.format_gather(r)
    with pytest.raises(ev.DataError):
        ev.gather_folds(str(tmp_path / "nothing*" / "summary.json"))


# ---------------------------------------------------------------------------------------------------------
# End to end on phantoms
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One CPU thread for this module: much faster on a shared machine, and the same arithmetic in training
    and in evaluation, so the logged and re-computed numbers can be compared digit for digit."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, phantom_tree) -> Path:
    """Two short epochs at 64x64 on the phantoms (CPU, seeded): a checkpoint, its split.json and log.csv.
    The stored threshold 0.3 makes this barely trained model predict some lesion pixels."""
    import train
    out = tmp_path_factory.mktemp("evalrun")
    cfg = train.default_settings(data_dir=str(phantom_tree), out_dir=str(out / "run"), loss_graph_dir=str(out / "lg"),
                                 epochs=2, image_size=64, expand=1, batch_size=4, threshold=0.3, progress=False,
                                 device="cpu")
    train.train_model(cfg)
    return out / "run"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def strict_json(path: Path) -> dict:
    def bad(x):
        raise ValueError(f"{path}: non-standard JSON constant {x}")
    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=bad)


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100


def test_evaluate_matches_train_validation_log(trained_run, tmp_path, capsys):
    """The issue's acceptance check: evaluate.py on last.safetensors and the stored validation split gives
    the numbers train.py logged for that epoch (same metric code, same images, same batches)."""
    rc = ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--out_dir", str(tmp_path / "e"),
                  "--device", "cpu", "--gallery", "0"])
    assert rc == 0
    last = read_csv(trained_run / "log.csv")[-1]
    s = strict_json(tmp_path / "e" / "summary.json")
    assert s["split"] == "val" and s["epoch"] == int(last["epoch"]) == 2
    assert f"{s['lesion']['dice_a']['mean']:.4f}" == last["val_dice"]
    assert f"{s['lesion']['iou_a']['mean']:.4f}" == last["val_iou"]
    assert f"{s['all']['dice_b']['mean']:.4f}" == last["val_dice_all_b"]
    assert f"{s['classification']['accuracy']:.4f}" == last["val_accuracy"]
    assert f"{s['val_loss']:.6f}" == last["val_loss"]
    split = json.loads((trained_run / "split.json").read_text())
    assert [r["file"] for r in read_csv(tmp_path / "e" / "per_image.csv")] == split["val"]
    assert f"{s['lesion']['dice_a']['mean']:.4f}" in capsys.readouterr().out


def test_evaluate_end_to_end_outputs(trained_run, phantom_tree, capsys):
    """Default out_dir (<checkpoint folder>/eval) with every file the issue lists, checked against the data."""
    from dataset import load_mask_union, load_image
    rc = ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--device", "cpu", "--gallery", "2"])
    assert rc == 0
    out = trained_run / "eval"
    printed = capsys.readouterr().out
    assert "metric" in printed and "dice_a" in printed and "sensitivity" in printed
    rows = read_csv(out / "per_image.csv")
    assert list(rows[0])[:len(ev.CSV_FIELDS)] == ev.CSV_FIELDS  # then the read-out's (test_evaluate_readout.py)
    split = json.loads((trained_run / "split.json").read_text())
    assert sorted(r["file"] for r in rows) == sorted(split["val"])
    for r in rows:
        assert r["true_label"] == r["file"].split("/")[0] and r["pred_label"] in CLASS_NAMES
        img = phantom_tree / r["file"]
        true = load_mask_union(sorted(img.parent.glob(img.stem + "_mask*.png")), load_image(img).shape)
        assert int(r["true_area"]) == int(true.sum())           # original resolution (96x120), not 64x64
        assert (int(r["height"]), int(r["width"])) == (96, 120)
        if r["true_label"] == "normal":
            assert r["dice_a"] == "" and float(r["dice_b"]) == float(int(r["pred_area"]) == 0)
        else:
            assert 0.0 <= float(r["dice_a"]) <= 1.0 and r["dice_a"] == r["dice_b"]
    s = strict_json(out / "summary.json")
    for subset, n in (("lesion", sum(r["true_label"] != "normal" for r in rows)), ("all", len(rows))):
        assert s[subset]["n_images"] == n
        for key in ev.METRIC_KEYS:
            assert set(s[subset][key]) == {"mean", "std", "median", "n"}
    dice_a = [float(r["dice_a"]) for r in rows if r["dice_a"] != ""]
    assert s["lesion"]["dice_a"]["mean"] == pytest.approx(np.mean(dice_a), abs=1e-6)
    assert s["lesion"]["dice_a"]["median"] == pytest.approx(np.median(dice_a), abs=1e-6)
    assert np.array(s["classification"]["confusion_matrix"]).sum() == len(rows)
    assert s["all"]["empty_masks"]["n"] == sum(r["true_label"] == "normal" for r in rows)
    assert_png(out / "confusion_matrix.png")
    assert_png(out / "dice_per_class.png")
    assert_png(out / "gallery" / "best_worst.png")           # outside the repository: beside the results


def test_manifest_with_patients_and_subgroups(trained_run, phantom_tree, tmp_path, capsys, caplog):
    """A manifest of 12 phantoms with a patient column (6 patients) and a doppler column: per_image.csv
    carries both, the intervals resample patients, the subgroup rows count each value, reliability.png is
    drawn; an unknown column is a clear error naming the manifest and the column."""
    lines = ["image,mask,label,patient,doppler"]
    for c in CLASS_NAMES:
        for n in range(1, 5):
            mask = "" if c == "normal" else str(phantom_tree / c / f"{c} ({n})_mask.png")
            image, patient = phantom_tree / c / f"{c} ({n}).png", f"{c}-{(n + 1) // 2}"
            lines.append(f"{image},{mask},{c},{patient},{'yes' if n % 2 else 'no'}")
    manifest = tmp_path / "twelve.csv"
    manifest.write_text("\n".join(lines) + "\n")
    ck, out = str(trained_run / "last.safetensors"), tmp_path / "m"
    args = ["--checkpoint", ck, "--manifest", str(manifest), "--device", "cpu", "--gallery", "0", "--bootstrap", "100"]
    assert ev.main([*args, "--subgroups", "doppler", "--out_dir", str(out)]) == 0
    rows = read_csv(out / "per_image.csv")
    assert list(rows[0])[:len(ev.CSV_FIELDS) + 1] == [*ev.CSV_FIELDS, "doppler"] and len(rows) == 12
    assert sorted({r["patient"] for r in rows}) == sorted(f"{c}-{i}" for c in CLASS_NAMES for i in (1, 2))
    for r in rows:
        assert (r["complete_miss"] == "") == (r["true_label"] == "normal") == (r["false_positive"] != "")
        assert r["doppler"] in ("yes", "no") and r["p_normal"] == ""   # no head: no P(normal)
    s = strict_json(out / "summary.json")
    assert s["split"] == "all" and (s["min_area"], s["normal_gate"], s["head"]) == (0.0, 1.0, None)
    assert s["intervals"]["resampled_by"] == "patient" and s["intervals"]["n_units"] == 6
    assert s["figures"]["n_lesion"] == 8 and s["figures"]["n_normal"] == 4
    normal_fp = [float(r["false_positive"]) for r in rows if r["true_label"] == "normal"]
    assert s["figures"]["normal_fp_share"] == pytest.approx(np.mean(normal_fp))
    assert [(g["value"], g["n"], g["n_lesion"], g["n_normal"]) for g in s["subgroups"]] == \
        [("no", 6, 4, 2), ("yes", 6, 4, 2)]
    assert len(s["reliability"]) == 10 and sum(b["count"] for b in s["reliability"]) == 8
    assert_png(out / "reliability.png")
    printed = capsys.readouterr().out
    assert "complete misses" in printed and "doppler=yes" in printed and "6 patients" in printed
    caplog.clear()
    assert ev.main([*args, "--subgroups", "doppler,scanner", "--out_dir", str(tmp_path / "bad")]) == 2
    assert f"{manifest}: no column 'scanner'" in caplog.text and "doppler" in caplog.text


def test_subgroups_need_manifest_columns():
    from dataset import Sample
    cfg = {"subgroups": " marks , doppler,marks", "manifest": "x.csv", "data_dir": "", "path_to_images": ""}
    samples = [Sample(Path("a.png"), (), "normal", "a.png", "p", (("doppler", "no"), ("marks", "yes")))]
    assert ev.subgroup_columns(cfg, {}, samples) == ("marks", "doppler")
    assert ev.subgroup_columns({**cfg, "subgroups": ""}, {}, samples) == ()
    with pytest.raises(ev.DataError, match="data/BUSI \\(not a manifest\\): no column 'doppler'"):
        ev.subgroup_columns({**cfg, "manifest": "", "data_dir": "data/BUSI", "subgroups": "doppler"}, {},
                            [Sample(Path("a.png"), (), "normal", "a.png")])
    clash = [Sample(Path("a.png"), (), "normal", "a.png", "", (("dice_a", "x"),))]
    with pytest.raises(ev.DataError, match="per_image.csv column"):
        ev.subgroup_columns({**cfg, "subgroups": "dice_a"}, {}, clash)
    # with no data on the command line, the checkpoint's training data is meant
    meta = {"train_config": {"manifest": "train.csv"}}
    with pytest.raises(ev.DataError, match="train.csv: no column 'scanner'"):
        ev.subgroup_columns({**cfg, "manifest": "", "subgroups": "scanner"}, meta, samples)


def test_choose_threshold_prefers_all_image_dice_then_nearest_half():
    sweep = [{"threshold": 0.3, "dice_all_b": 0.70}, {"threshold": 0.4, "dice_all_b": 0.72},
             {"threshold": 0.6, "dice_all_b": 0.72}, {"threshold": 0.7, "dice_all_b": 0.71}]
    sweep[2]["threshold"] = 0.5  # tie at 0.72: the one nearer 0.5 wins
    assert ev.choose_threshold(sweep) == 0.5
    assert ev.choose_threshold([{"threshold": 0.2, "dice_all_b": 0.9}, {"threshold": 0.5, "dice_all_b": 0.1}]) == 0.2


def test_tune_threshold_sweeps_and_evaluates_at_the_chosen_one(trained_run, tmp_path, capsys):
    """Each row of the sweep equals a plain evaluation at that threshold; the summary is the one at the
    chosen threshold, and the chosen one has the highest all-image Dice (b) of the sweep."""
    ck = str(trained_run / "last.safetensors")
    rc = ev.main(["--checkpoint", ck, "--out_dir", str(tmp_path / "t"), "--device", "cpu", "--gallery", "0",
                  "--tune_threshold"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "chosen threshold" in printed and "ship_checkpoint.py --threshold" in printed
    s = strict_json(tmp_path / "t" / "summary.json")
    sweep = s["threshold_sweep"]
    assert sorted({r["threshold"] for r in sweep}) == list(ev.THRESHOLD_GRID)
    assert sorted({r["min_area"] for r in sweep}) == list(ev.MIN_AREA_GRID)
    assert {r["normal_gate"] for r in sweep} == {1.0}          # no classification head: no gate to tune
    assert len(sweep) == len(ev.THRESHOLD_GRID) * len(ev.MIN_AREA_GRID)
    best = max(r["dice_all_b"] for r in sweep)
    chosen = [r for r in sweep if (r["threshold"], r["min_area"]) == (s["threshold"], s["min_area"])][0]
    assert chosen["dice_all_b"] == pytest.approx(best)
    assert s["all"]["dice_b"]["mean"] == pytest.approx(chosen["dice_all_b"], abs=1e-6)
    assert s["classification"]["accuracy"] == pytest.approx(chosen["accuracy"])
    for r in (sweep[0], sweep[-1]):  # two rows checked against a plain evaluation at that setting
        assert ev.main(["--checkpoint", ck, "--out_dir", str(tmp_path / "p"), "--device", "cpu", "--gallery", "0",
                        "--threshold", str(r["threshold"]), "--min_area", str(r["min_area"])]) == 0
        p = strict_json(tmp_path / "p" / "summary.json")
        assert p["all"]["dice_b"]["mean"] == pytest.approx(r["dice_all_b"], abs=1e-3)  # vectorised sweep vs decide
        assert p["classification"]["accuracy"] == pytest.approx(r["accuracy"], abs=0.05)
    assert sweep[0]["dice_all_b"] != sweep[-1]["dice_all_b"]  # the threshold matters for this model


def test_evaluate_kfold_and_gather(trained_run, phantom_tree, tmp_path, capsys):
    """A K-fold split of the checkpoint's data, evaluated fold by fold with --fold i, then --gather: the
    folds cover every image once and the combined numbers are the mean/std of the folds' numbers."""
    import train
    split_file = tmp_path / "kfold.json"
    train.prepare_data(train.default_settings(data_dir=str(phantom_tree), split_file=str(split_file), folds=3,
                                              fold=0, image_size=64, progress=False), tmp_path)
    for i in range(3):
        assert ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--split_file", str(split_file),
                        "--fold", str(i), "--out_dir", str(tmp_path / f"fold{i}" / "eval"), "--device", "cpu",
                        "--gallery", "0"]) == 0
    summaries = [strict_json(tmp_path / f"fold{i}" / "eval" / "summary.json") for i in range(3)]
    assert [s["fold"] for s in summaries] == [0, 1, 2]
    files = [[r["file"] for r in read_csv(tmp_path / f"fold{i}" / "eval" / "per_image.csv")] for i in range(3)]
    assert sorted(sum(files, [])) == sorted(json.loads(split_file.read_text())["folds"][0]
                                            + sum(json.loads(split_file.read_text())["folds"][1:], []))
    assert len(set(sum(files, []))) == 18                     # every phantom once
    capsys.readouterr()
    assert ev.main(["--gather", str(tmp_path / "fold*" / "eval" / "summary.json"),
                    "--out_dir", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    assert "fold 0" in printed and "fold 2" in printed and "+/-" in printed
    g = strict_json(tmp_path / "all" / "folds_summary.json")
    dice = [s["lesion"]["dice_a"]["mean"] for s in summaries]
    assert g["n_folds"] == 3
    assert g["combined"]["lesion_dice"]["mean"] == pytest.approx(np.mean(dice))
    assert g["combined"]["lesion_dice"]["std"] == pytest.approx(np.std(dice))
    assert g["pooled"]["n_images"] == 18 and g["pooled"]["repeated_images"] == 0
    assert (tmp_path / "all" / "folds.csv").is_file()
    # a fold outside the split is a clear error, not a traceback
    assert ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--split_file", str(split_file),
                    "--fold", "3", "--out_dir", str(tmp_path / "bad"), "--device", "cpu"]) == 2


def test_checkpoint_fold_is_the_default(phantom_tree, tmp_path):
    """Without --fold, a K-fold split is read at the fold the checkpoint was trained for."""
    import train
    split_file = tmp_path / "kfold.json"
    train.prepare_data(train.default_settings(data_dir=str(phantom_tree), split_file=str(split_file), folds=3,
                                              fold=2, image_size=32, progress=False), tmp_path)
    meta = {"image_size": 32, "split_file": str(split_file), "fold": 2,
            "train_config": train.default_settings(data_dir=str(phantom_tree))}
    from cli import parse_settings
    cfg = parse_settings(ev.__file__, ["--checkpoint", str(tmp_path / "x.safetensors")])
    data, info = ev.load_eval_set(cfg, meta)
    assert info == {"split": "val", "split_file": str(split_file), "fold": 2}
    assert [s.key for s in data.samples] == json.loads(split_file.read_text())["folds"][2]


# ---------------------------------------------------------------------------------------------------------
# K-fold splits through train.py, with duplicated pictures
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree_with_duplicates(tmp_path_factory) -> Path:
    """6 small phantoms per class, plus benign (7) = a copy of benign (1) (same label: one copy is kept) and
    malignant (7) = a copy of benign (2) (conflicting labels: both copies are dropped)."""
    from phantom import write_busi_tree
    root = write_busi_tree(tmp_path_factory.mktemp("dups"), per_class=6, height=48, width=64, seed=5)
    for src, dst in (("benign/benign (1)", "benign/benign (7)"), ("benign/benign (2)", "malignant/malignant (7)")):
        shutil.copy(root / f"{src}.png", root / f"{dst}.png")
        shutil.copy(root / f"{src}_mask.png", root / f"{dst}_mask.png")
    return root


def test_kfold_split_through_train(tree_with_duplicates, tmp_path):
    """train.default_settings(folds=3, fold=i): folds disjoint, stratified, covering every kept image; the
    same-label copy is kept once, the conflicting pair never appears; no picture on both sides of any fold."""
    import train
    from dataset import discover_busi, load_set
    split_file = tmp_path / "split.json"
    sets = []
    for i in range(3):
        cfg = train.default_settings(data_dir=str(tree_with_duplicates), out_dir=str(tmp_path / f"f{i}"),
                                     split_file=str(split_file), folds=3, fold=i, image_size=32, progress=False)
        tr, va, _, split = train.prepare_data(cfg, tmp_path / f"f{i}")
        sets.append((tr, va))
        assert {s.key for s in tr.samples}.isdisjoint(s.key for s in va.samples)
        assert set(tr.hashes).isdisjoint(va.hashes)           # no copy of a picture on both sides
    folds = split["folds"]
    assert len(folds) == 3
    keys = [k for f in folds for k in f]
    assert len(keys) == len(set(keys))                        # disjoint
    everything = {s.key for s in discover_busi(tree_with_duplicates)}
    expected = everything - {"benign/benign (7).png", "benign/benign (2).png", "malignant/malignant (7).png"}
    assert set(keys) == expected                              # cover every image but the dropped copies
    assert "benign/benign (1).png" in keys                    # the same-label pair: one copy kept
    assert split["duplicates"]["same_label"] == [{"kept": "benign/benign (1).png", "dropped": ["benign/benign (7).png"]}]
    assert sorted(split["duplicates"]["conflicting_labels"][0]["dropped"]) == \
        ["benign/benign (2).png", "malignant/malignant (7).png"]
    for c in CLASS_NAMES:                                     # stratified: per class, fold sizes differ by <= 1
        counts = [sum(k.startswith(c + "/") for k in f) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == sum(k.startswith(c + "/") for k in expected)
    for i, (tr, va) in enumerate(sets):                       # fold i validates on fold i, trains on the rest
        assert sorted(s.key for s in va.samples) == sorted(folds[i])
        assert len(tr) + len(va) == len(expected)
    # even without deduplication no picture is split across folds: the hashes of each fold are disjoint
    loaded = load_set(discover_busi(tree_with_duplicates), 32)
    h = dict(zip((s.key for s in loaded.samples), loaded.hashes))
    fold_hashes = [{h[k] for k in f} for f in folds]
    assert all(fold_hashes[a].isdisjoint(fold_hashes[b]) for a in range(3) for b in range(a + 1, 3))
    # the split is deterministic: the same seed gives the same folds
    import dataset
    kept = [s for s in loaded.samples if s.key in expected]
    assert dataset.make_split(kept, seed=42, folds=3)["folds"] == folds


def test_kfold_settings_errors(tree_with_duplicates, tmp_path):
    """Bad fold settings stop before any training, with a message instead of a traceback."""
    import train
    from dataset import DataError
    base = dict(data_dir=str(tree_with_duplicates), image_size=32, progress=False)
    for folds, fold in ((3, 3), (3, -1), (1, 0), (-2, 0)):
        with pytest.raises(DataError, match="folds"):
            train.prepare_data(train.default_settings(**base, folds=folds, fold=fold,
                                                      split_file=str(tmp_path / f"s{folds}{fold}.json")), tmp_path)
    # --fold without --folds on a plain train/validation split would silently train on the wrong images
    with pytest.raises(DataError, match="not folds"):
        train.prepare_data(train.default_settings(**base, fold=2, split_file=str(tmp_path / "plain.json")), tmp_path)


def test_evaluate_all_drops_duplicates(trained_run, tree_with_duplicates, tmp_path):
    """--data_dir other data: every image (split auto -> all), duplicates resolved as in training."""
    rc = ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--data_dir", str(tree_with_duplicates),
                  "--out_dir", str(tmp_path / "e"), "--device", "cpu", "--gallery", "0"])
    assert rc == 0
    rows = read_csv(tmp_path / "e" / "per_image.csv")
    assert len(rows) == 3 * 6 + 2 - 3                          # 20 files, one same-label copy, a conflicting pair
    s = strict_json(tmp_path / "e" / "summary.json")
    assert s["split"] == "all" and s["all"]["n_images"] == 17


def test_checkpoint_data_given_by_another_path_is_evaluated_on_its_validation_split(trained_run, phantom_tree,
                                                                                     tmp_path):
    """The shipped-model case: the checkpoint was trained on data at one path, the user gives the same data
    set at another; split auto recognises it by the split's file names and scores the validation images only."""
    import shutil
    copy = tmp_path / "elsewhere" / "phantoms"
    shutil.copytree(phantom_tree, copy)
    rc = ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--data_dir", str(copy),
                  "--out_dir", str(tmp_path / "e"), "--device", "cpu", "--gallery", "0"])
    assert rc == 0
    split = json.loads((trained_run / "split.json").read_text())
    assert [r["file"] for r in read_csv(tmp_path / "e" / "per_image.csv")] == split["val"]
    assert strict_json(tmp_path / "e" / "summary.json")["split"] == "val"
    gone = copy / split["train"][0]  # no longer the whole data set: every image, as for other data
    for f in [gone, *gone.parent.glob(gone.stem + "_mask*")]:
        f.unlink()
    rc = ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--data_dir", str(copy),
                  "--out_dir", str(tmp_path / "e2"), "--device", "cpu", "--gallery", "0"])
    assert rc == 0 and strict_json(tmp_path / "e2" / "summary.json")["split"] == "all"


# ---------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------

@needs_busi
def test_real_busi_images(trained_run, tmp_path, capsys):
    """Six real BUSI images (two per class) through a manifest: metrics at the images' own resolution, every
    output written (the gallery, which holds BUSI pixels, into the temporary folder, never into git)."""
    lines = ["image,mask,label"]
    expected = {}
    for c in CLASS_NAMES:
        for n in (1, 2):
            img = BUSI / c / f"{c} ({n}).png"
            masks = sorted((BUSI / c).glob(f"{c} ({n})_mask*.png"))
            lines.append(f"\"{img}\",\"{';'.join(str(m) for m in masks)}\",{c}")
            union = None
            for m in masks:
                a = np.asarray(Image.open(m).convert("L")) > 127
                union = a if union is None else union | a
            expected[str(img)] = (c, int(union.sum()) if c != "normal" else 0, union.shape)
    manifest = tmp_path / "busi6.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "busi_eval"
    rc = ev.main(["--checkpoint", str(trained_run / "last.safetensors"), "--manifest", str(manifest),
                  "--out_dir", str(out), "--device", "cpu", "--gallery", "2"])
    assert rc == 0
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 6
    for r in rows:
        label, area, shape = expected[r["file"]]
        assert r["true_label"] == label and int(r["true_area"]) == area
        assert (int(r["height"]), int(r["width"])) == shape     # scored at the original resolution
        assert (r["hd95"] == "") == (label == "normal" or int(r["pred_area"]) == 0)
    s = strict_json(out / "summary.json")
    assert s["split"] == "all" and s["lesion"]["n_images"] == 4 and s["all"]["n_images"] == 6
    assert_png(out / "confusion_matrix.png")
    assert_png(out / "dice_per_class.png")
    assert_png(out / "gallery" / "best_worst.png")
    assert ev.is_git_ignored_location(out / "gallery")
    assert "lesion Dice" in capsys.readouterr().out


def test_evaluate_a_multi_source_split_on_one_source(tmp_path, phantom_tree):
    """--sources gives the keys a multi-source split names; evaluating one source scores its share of the
    validation images only."""
    import train
    from cli import parse_settings
    from phantom import write_busi_tree
    other = write_busi_tree(tmp_path / "site2", per_class=4, height=80, width=100, seed=11)
    spec = f"a={phantom_tree};b={other}"
    cfg = train.default_settings(sources=spec, out_dir=str(tmp_path / "run"), loss_graph_dir=str(tmp_path / "lg"),
                                 epochs=1, image_size=64, expand=1, batch_size=4, progress=False)
    train.train_model(cfg)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    ecfg = parse_settings(ev.__file__, ["--checkpoint", str(tmp_path / "run" / "best.safetensors"),
                                             "--sources", f"b={other}", "--split_file",
                                             str(tmp_path / "run" / "split.json"), "--split", "val",
                                             "--out_dir", str(tmp_path / "ev"), "--gallery", "0", "--bootstrap", "0"])
    summary = ev.run(ecfg)
    with open(tmp_path / "ev" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(k for k in split["val"] if k.startswith("b/"))
    assert summary["all"]["n_images"] == len(rows)


# ---- the normal gate under a recall floor (issue 23): synthetic head outputs

def _gate_case(lesion_conf: float = 0.6):
    """50 lesion images (5 of them with the head sure they are normal, as on an unfamiliar scanner) and 10
    normal images given a faint lesion; every mask covers 80 of its lesion's 100 pixels."""
    from types import SimpleNamespace
    one = lambda a: np.full((1, 1), float(a))  # noqa: E731  (thresholds x min areas = 1 x 1)
    counts, heads, samples, masks = [], [], [], []
    for i in range(60):
        lesion = i < 50
        area = 100.0 if lesion else 50.0
        counts.append((one(80 if lesion else 0), one(area), np.zeros((1, 1), int), one(lesion_conf * area), one(area)))
        heads.append((0.95 if (not lesion or i < 5) else 0.05, 0.3))
        samples.append(SimpleNamespace(label="benign" if lesion else "normal"))
        masks.append(np.ones(100, bool) if lesion else np.zeros(100, bool))
    return counts, SimpleNamespace(samples=samples, full_masks=masks), heads


def test_the_gate_never_clears_more_lesion_images_than_the_recall_floor():
    counts, data, heads = _gate_case()
    sweep = ev._sweep_rows(counts, data, heads, (0.5,), (0.0,), ev.GATE_GRID)
    by_gate = {r["normal_gate"]: r for r in sweep}
    assert by_gate[0.9]["cleared_share"] == pytest.approx(0.1) and by_gate[1.0]["cleared_share"] == 0.0
    assert by_gate[0.9]["dice_all_b"] > by_gate[1.0]["dice_all_b"] + 0.05  # the gate pays on the all-image Dice
    assert ev.choose_setting(sweep)["normal_gate"] == 0.9  # ... so without a floor it is chosen
    for floor in (0.0, 0.02, 0.05):
        chosen = ev.choose_setting(sweep, recall_floor=floor)
        assert chosen["cleared_share"] <= floor and chosen["normal_gate"] == 1.0
    assert ev.choose_setting(sweep, recall_floor=0.1)["normal_gate"] == 0.9


def test_the_gate_keeps_confident_masks():
    counts, data, heads = _gate_case(lesion_conf=0.9)
    sweep = ev._sweep_rows(counts, data, heads, (0.5,), (0.0,), ev.GATE_GRID, gate_keep=0.8)
    assert all(r["cleared_share"] == 0.0 and r["normal_fp_share"] == 1.0 for r in sweep)
    sweep = ev._sweep_rows(counts, data, heads, (0.5,), (0.0,), ev.GATE_GRID, gate_keep=0.95)
    assert {r["normal_gate"]: r["cleared_share"] for r in sweep}[0.9] == pytest.approx(0.1)


def test_evaluate_counts_the_lesion_images_the_gate_erased(phantom_tree, tmp_path):
    """With a gate at 0 (everything 'normal'), every lesion image with a mask is erased and counted."""
    import train
    out = tmp_path / "head"
    cfg = train.default_settings(data_dir=str(phantom_tree), out_dir=str(out), loss_graph_dir=str(tmp_path),
                                 epochs=1, image_size=64, expand=1, batch_size=4, progress=False, head=True,
                                 threshold=0.01)
    train.train_model(cfg)
    from cli import settings_with
    summary = ev.run(settings_with(ROOT / "evaluate.py", checkpoint=str(out / "last.safetensors"),
                                   out_dir=str(tmp_path / "e"), normal_gate=0.0, threshold=0.01, gallery=0,
                                   measure=False, bootstrap=0))
    rows = ev.read_rows(tmp_path / "e" / "per_image.csv")
    erased = sum(int(float(r["gate_cleared"])) for r in rows if r["true_label"] != "normal")
    assert summary["figures"]["gate_cleared_lesion"] == erased > 0
    assert all(float(r["pred_area"]) == 0 for r in rows if float(r["gate_cleared"]))


def test_the_recall_floor_also_holds_a_higher_threshold_back():
    """A threshold that empties faint lesions (found at 0.5) counts against the floor like the gate."""
    from types import SimpleNamespace
    counts, samples, masks = [], [], []
    for i in range(60):
        lesion = i < 50
        faint = lesion and i < 10  # found at 0.5, gone at 0.8
        area = np.array([[100.0], [0.0 if faint else 90.0]]) if lesion else np.array([[50.0], [0.0]])
        inter = np.array([[80.0], [0.0 if faint else 80.0]]) if lesion else np.zeros((2, 1))
        counts.append((inter, area, np.zeros((2, 1), int), 0.6 * area, area))
        samples.append(SimpleNamespace(label="benign" if lesion else "normal"))
        masks.append(np.ones(100, bool) if lesion else np.zeros(100, bool))
    data = SimpleNamespace(samples=samples, full_masks=masks)
    heads = [(float("nan"), float("nan"))] * 60
    sweep = ev._sweep_rows(counts, data, heads, (0.5, 0.8), (0.0,), (1.0,))
    by_t = {r["threshold"]: r for r in sweep}
    assert by_t[0.8]["cleared_share"] == pytest.approx(0.2) and by_t[0.5]["cleared_share"] == 0.0
    assert by_t[0.8]["dice_all_b"] > by_t[0.5]["dice_all_b"]  # the normal scans pay for 0.8 ...
    assert ev.choose_setting(sweep)["threshold"] == 0.8
    assert ev.choose_setting(sweep, recall_floor=0.02)["threshold"] == 0.5  # ... but not at the lesions' cost


def test_lesion_breakdown_found_pooled_and_small_misses():
    def row(label, dice, miss, true_area, pred_area):
        return {**hand_row(label, dice, miss), "true_area": true_area, "pred_area": pred_area,
                "height": 100, "width": 100}
    rows = [row("benign", 0.9, 0, 3000, 3000),   # big lesion, found well
            row("malignant", 0.5, 0, 200, 200),  # small lesion, found roughly
            row("benign", 0.0, 1, 100, 0),       # small lesion missed (1% of the image)
            row("malignant", 0.0, 1, 900, 0),    # 9% of the image, missed
            hand_row("normal", nan, fp=0)]
    f, _ = ev.figures(rows)
    assert f["lesion_dice"] == pytest.approx(1.4 / 4)
    assert f["n_found"] == 2 and f["found_lesion_dice"] == pytest.approx(0.7)
    # twice the summed overlap (2700 + 100) over the summed areas (6000 + 400 + 100 + 900)
    assert f["pooled_lesion_dice"] == pytest.approx(2 * 2800 / 7400)
    assert f["n_missed"] == 2 and f["small_miss_share"] == pytest.approx(0.5)
    assert "pooled Dice" in "\n".join(ev.format_figures({"figures": f}))


def test_tune_gate_off_ships_no_gate_where_validation_would_choose_one(synthetic):
    from cli import settings_with
    data, logits, head = synthetic
    with_blob = logits.clone()
    with_blob[5][(0, *block(10, 10, 12))] = 8.0  # a big false lesion on the normal scan with P(normal) 0.95
    predictor = fake_predictor(with_blob, head)
    info = {"split": "val"}
    _, gated = ev.tune(settings_with(ev.__file__, gate_keep=1.0), predictor, data, info)
    assert gated["normal_gate"] == 0.9  # the highest gate of the grid that clears the blob
    _, off = ev.tune(settings_with(ev.__file__, gate_keep=1.0, tune_gate=False), predictor, data, info)
    assert off["normal_gate"] == 1.0 and off["gate_keep"] == 1.0
