"""evaluate_readout.py and evaluate.py --measure / --uncertainty: the Bland-Altman agreement and cue AUCs from
hand-made rows, measurements and uncertainty scores on a synthetic set with fake predictors, and evaluate.py end
to end on phantoms (with the cut-off stored by ship_checkpoint.py). The mathematics: test_metrics.py."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
import evaluate_readout as ro
from dataset import LoadedSet, Sample
from test_predict import fixed_predictor, following_predictor


def rows_for(pred_long, true_long, labels, pred_solidity):
    return [{"true_label": lab, "pred_area": 10, "true_area": 10, "pred_long_diameter_px": p,
             "true_long_diameter_px": t, "pred_long_mm": p / 10, "true_long_mm": float("nan") if i == 0 else t / 10,
             "pred_solidity": s, "true_solidity": s, "pred_shape": "oval" if s > 0.9 else "irregular"}
            for i, (p, t, lab, s) in enumerate(zip(pred_long, true_long, labels, pred_solidity))]


def test_measurement_summary_from_hand_made_rows():
    rows = rows_for([110, 95, 130, 80], [100, 100, 120, 80], ["benign", "benign", "malignant", "malignant"],
                    [0.98, 0.95, 0.80, 0.85])
    rows.append({"true_label": "normal", "pred_area": 0, "true_area": 0})
    m = ro.measurement_summary(rows)
    assert m["n_lesion_images"] == 4 and m["n_with_prediction"] == 4
    ba = m["bland_altman_px"]
    assert ba["n"] == 4 and ba["bias"] == pytest.approx(np.mean([10, -5, 10, 0]))
    assert ba["upper"] - ba["lower"] == pytest.approx(2 * 1.96 * np.std([10, -5, 10, 0], ddof=1))
    assert m["bland_altman_mm"]["n"] == 3  # the image without a reference size is left out
    assert m["cue_auc"]["solidity"]["pred"] == 0.0  # every malignant lesion is less solid
    assert np.isnan(m["cue_auc"]["convexity"]["pred"])  # not measured
    assert m["terms"]["shape"] == {"benign": {"oval": 1.0}, "malignant": {"irregular": 1.0}}


NET, H, W = 64, 96, 128


def disc_set(n: int = 6) -> LoadedSet:
    """n images at NET x NET, each a dark disc on grey (a different size each); masks at H x W; labels cycle."""
    labels = ["benign", "malignant", "normal"]
    images = np.full((n, 1, NET, NET), 170, np.uint8)
    masks, samples = [], []
    yy, xx = np.ogrid[:NET, :NET]
    for k in range(n):
        label = labels[k % 3]
        disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= (8 + 2 * k) ** 2
        if label != "normal":
            images[k, 0][disc] = 20
        full = np.asarray(torch.nn.functional.interpolate(torch.as_tensor(disc if label != "normal" else 0 * disc,
                                                                          dtype=torch.float32)[None, None],
                                                          size=(H, W))[0, 0] > 0.5)
        masks.append(full)
        samples.append(Sample(Path(f"img{k}.png"), (), label, f"img{k}.png"))
    return LoadedSet(samples, images, np.zeros((n, 2, NET, NET), np.uint8), masks, [str(k) for k in range(n)])


@pytest.mark.parametrize("predictor, stable", [(following_predictor, True), (fixed_predictor(), False)])
def test_uncertainty_scores_follow_the_predictor(predictor, stable):
    data = disc_set()
    masks = {}
    rows, _ = ev.evaluate_set(predictor, data, 0.5, batch_size=4, masks=masks)
    setting = {"threshold": 0.5, "min_area": 0.0, "normal_gate": 1.0}
    ro.add_uncertainty(rows, ev._predicted_batches(predictor, data, 4, False), predictor, data, setting,
                       lambda k: ev.unpack_mask(masks[k]), 4)
    score = np.array([r["uncertainty"] for r in rows])
    assert ((score < 0.05) if stable else (score > 0.02)).all(), score
    u = ro.uncertainty_summary(rows, None, "")
    assert u["risk_coverage"]["coverage"][-1] == 1.0
    assert u["risk_coverage"]["mean_dice_b"][-1] == pytest.approx(np.mean([r["dice_b"] for r in rows]))
    assert u["cutoff_source"] == "chosen on these images" and {r["review"] for r in rows} <= {"yes", "no"}
    assert u["flagged"]["n"] + u["unflagged"]["n"] == len(rows)
    if stable:  # the following predictor is right everywhere: no failures to flag
        assert u["n_failures"] == 0 and np.isnan(u["auc_failure"])
    fixed = ro.uncertainty_summary(rows, 2.0, "setting")  # nothing lies above 2
    assert fixed["flagged"]["n"] == 0 and fixed["cutoff_source"] == "setting"


def test_measurements_of_predicted_and_reference_lesions():
    data = disc_set()
    masks = {}
    rows, _ = ev.evaluate_set(following_predictor, data, 0.5, batch_size=4, masks=masks)
    ro.add_measurements(rows, data, lambda k: ev.unpack_mask(masks[k]), lambda p: None)
    for r in rows:
        if r["true_label"] == "normal":
            assert np.isnan(r["true_long_diameter_px"]) and r["true_shape"] == ""
        else:
            assert r["pred_long_diameter_px"] == pytest.approx(r["true_long_diameter_px"], rel=0.15)
            assert np.isnan(r["pred_long_mm"])  # no pixel size
    assert set(ro.readout_columns(rows)) >= {"pred_long_diameter_px", "true_solidity", "pred_margin"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_evaluate_end_to_end_with_readout_and_a_shipped_cutoff(tiny_checkpoint, phantom_tree, tmp_path, monkeypatch,
                                                            capsys):
    import predict
    from model import read_checkpoint_meta
    from ship_checkpoint import ship
    shipped = tmp_path / "shipped.safetensors"
    ship(str(tiny_checkpoint), str(shipped), str(tmp_path / "split.json"), uncertainty_cutoff=0.05)
    meta = read_checkpoint_meta(shipped)
    monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: (fixed_predictor(), meta))
    out = tmp_path / "e"
    args = ["--checkpoint", str(shipped), "--data_dir", str(phantom_tree), "--split", "all", "--out_dir", str(out),
            "--gallery", "0", "--bootstrap", "0", "--uncertainty", "--pixel_mm", "0.1"]
    assert ev.main(args) == 0
    s = json.loads((out / "summary.json").read_text())["readout"]
    n_lesion = s["measurements"]["n_lesion_images"]
    assert s["measurements"]["bland_altman_px"]["n"] == n_lesion == 12  # every image gets the fixed lesion
    ba_px, ba_mm = s["measurements"]["bland_altman_px"], s["measurements"]["bland_altman_mm"]
    assert ba_mm["bias"] == pytest.approx(ba_px["bias"] / 10, rel=1e-3)  # mm rounded to 0.01
    assert s["uncertainty"]["cutoff"] == 0.05 and s["uncertainty"]["cutoff_source"] == "checkpoint"
    rows = read_csv(out / "per_image.csv")
    assert list(rows[0])[:len(ev.CSV_FIELDS)] == ev.CSV_FIELDS
    assert {"pred_long_mm", "true_long_diameter_px", "uncertainty", "review"} <= set(rows[0])
    assert all(r["review"] == ("yes" if float(r["uncertainty"]) > 0.05 else "no") for r in rows)
    assert (out / "bland_altman.png").is_file() and (out / "risk_coverage.png").is_file()
    printed = capsys.readouterr().out
    assert "limits of agreement" in printed and "ship_checkpoint.py --uncertainty_cutoff" in printed
    assert ev.main([*args[:-3], "--no-measure", "--out_dir", str(tmp_path / "plain")]) == 0
    assert "readout" in json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert list(read_csv(tmp_path / "plain" / "per_image.csv")[0]) == ev.CSV_FIELDS
