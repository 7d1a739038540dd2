"""evaluate.py: metric functions on hand-computed cases and against independent implementations (scikit-learn,
SMP, a brute-force HD95), the empty-mask conventions, evaluate.py end to end on phantoms, its agreement with
train.py's validation log, K-fold splits through train.py and the gathering of per-fold results, and a run on a
few real BUSI images (skipped when the data is absent)."""
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
from predict import Decision

nan = float("nan")


def isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def square(shape=(64, 64), top=10, left=10, side=20) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top:top + side, left:left + side] = True
    return m


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

def test_dice_iou_hand_computed():
    pred = np.zeros((4, 4), bool)
    true = np.zeros((4, 4), bool)
    pred[0, 0:4] = True            # 4 pixels
    true[0, 1:4] = True            # 6 pixels, 3 of them shared with pred
    true[1, 1:4] = True
    d, j = ev.dice_iou(pred, true)
    assert d == pytest.approx(2 * 3 / (4 + 6))
    assert j == pytest.approx(3 / 7)
    p, r = ev.precision_recall(pred, true)
    assert p == pytest.approx(3 / 4) and r == pytest.approx(3 / 6)
    assert ev.dice_iou(true, true) == (1.0, 1.0)
    assert ev.dice_iou(pred, ~pred) == (0.0, 0.0)


def test_dice_iou_empty_cases():
    e, full = np.zeros((5, 5), bool), square((5, 5), 1, 1, 2)
    assert ev.dice_iou(e, e) == (1.0, 1.0)                    # convention b: empty/empty scores 1
    assert all(isnan(v) for v in ev.dice_iou(e, e, empty_score=nan))
    assert ev.dice_iou(e, full) == (0.0, 0.0)                 # nothing predicted on a lesion
    assert ev.dice_iou(full, e) == (0.0, 0.0)                 # something predicted on an empty mask
    p, r = ev.precision_recall(e, full)
    assert isnan(p) and r == 0.0
    p, r = ev.precision_recall(full, e)
    assert p == 0.0 and isnan(r)


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
        d, j = ev.dice_iou(pred, true)
        t, p = true.ravel(), pred.ravel()
        assert d == pytest.approx(f1_score(t, p, zero_division=1.0), abs=1e-12)
        assert j == pytest.approx(jaccard_score(t, p, zero_division=1.0), abs=1e-12)
        prec, rec = ev.precision_recall(pred, true)
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
        d, j = ev.dice_iou(preds[i], trues[i])
        assert d == pytest.approx(float(f1[i]), abs=1e-6) and j == pytest.approx(float(iou[i]), abs=1e-6)


def test_classification_summary_agrees_with_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, recall_score
    rng = np.random.default_rng(2)
    true = [CLASS_NAMES[i] for i in rng.integers(0, 3, 60)]
    pred = [CLASS_NAMES[i] for i in rng.integers(0, 3, 60)]
    cm = ev.confusion(true, pred)
    assert cm.tolist() == confusion_matrix(true, pred, labels=list(CLASS_NAMES)).tolist()
    s = ev.classification_summary(cm)
    assert s["accuracy"] == pytest.approx(accuracy_score(true, pred))
    sens = recall_score(true, pred, labels=list(CLASS_NAMES), average=None)
    for c, v in zip(CLASS_NAMES, sens):
        assert s[f"sensitivity_{c}"] == pytest.approx(v)
        # specificity of c: the recall of "not c" when c is the positive class
        tt, pp = [x != c for x in true], [x != c for x in pred]
        assert s[f"specificity_{c}"] == pytest.approx(recall_score(tt, pp))


def test_classification_hand_computed():
    # true normal x2 (one called benign), benign x2 (correct), malignant x1 (called benign)
    s = ev.classification_summary(ev.confusion(["normal", "normal", "benign", "benign", "malignant"],
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
    assert ev.hd95(a, b) == pytest.approx(d)
    assert ev.hd95(b, a) == pytest.approx(d)


def test_hd95_hand_computed_and_empty():
    a, b = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    a[10, 10] = True
    b[13, 14] = True                                           # a 3-4-5 triangle
    assert ev.hd95(a, b) == pytest.approx(5.0)
    assert isnan(ev.hd95(a, np.zeros_like(a))) and isnan(ev.hd95(np.zeros_like(a), a))
    # a 9x9 square against its centre pixel: boundary pixels lie 4 (edge middles) to 4*sqrt(2) (corners) away;
    # pooled with the centre's distance 4 to the nearest boundary pixel
    sq, c = square((30, 30), 5, 5, 9), np.zeros((30, 30), bool)
    c[9, 9] = True
    border = np.array([[y, x] for y in range(5, 14) for x in range(5, 14) if y in (5, 13) or x in (5, 13)])
    dist = np.hypot(*(border - [9, 9]).T)
    assert ev.hd95(sq, c) == pytest.approx(np.percentile(np.hstack([dist, [4.0]]), 95))


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
        assert ev.hd95(a, b) == pytest.approx(expected)


def test_hd95_boundary_at_the_image_edge():
    """A mask touching the image edge has its boundary there (the edge counts as outside)."""
    a = np.zeros((10, 10), bool)
    a[:, :4] = True                                            # columns 0..3, touching three edges
    assert ev.surface(a)[:, 0].all() and ev.surface(a)[:, 3].all() and not ev.surface(a)[5, 1:3].any()
    assert ev.hd95(a, a) == 0.0


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
            r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", f"{d}/x.png"])
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
    assert list(rows[0]) == ev.CSV_FIELDS
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
    assert [r["threshold"] for r in sweep] == list(ev.THRESHOLD_GRID)
    best = max(r["dice_all_b"] for r in sweep)
    chosen = [r for r in sweep if r["threshold"] == s["threshold"]][0]
    assert chosen["dice_all_b"] == pytest.approx(best)
    assert s["all"]["dice_b"]["mean"] == pytest.approx(chosen["dice_all_b"], abs=1e-6)
    assert s["classification"]["accuracy"] == pytest.approx(chosen["accuracy"])
    for r in (sweep[0], sweep[-1]):  # two rows checked against a plain evaluation at that threshold
        assert ev.main(["--checkpoint", ck, "--out_dir", str(tmp_path / "p"), "--device", "cpu", "--gallery", "0",
                        "--threshold", str(r["threshold"])]) == 0
        p = strict_json(tmp_path / "p" / "summary.json")
        assert p["all"]["dice_b"]["mean"] == pytest.approx(r["dice_all_b"], abs=1e-3)  # fp16 vs fp32 probs
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
