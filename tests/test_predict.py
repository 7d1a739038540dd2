"""predict.py: inputs (file, folder, glob), every file it writes, the label rule, TTA."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from predict import decide


def test_label_rule_normal_when_nothing_survives_the_threshold():
    p = torch.zeros(2, 10, 12)
    d = decide(p + 0.2, 0.5)
    assert d.label == "normal" and not d.lesion.any() and d.confidence == pytest.approx(0.8)
    p[1, 2:5, 3:7] = 0.9   # malignant channel holds the lesion
    p[0, 2:5, 3:5] = 0.6
    d = decide(p, 0.5)
    assert d.label == "malignant"
    assert d.lesion.sum() == 12 and d.class_masks[1].sum() == 12 and d.class_masks[0].sum() == 0
    assert d.confidence == pytest.approx(0.9) and d.mean_lesion_prob == pytest.approx(0.9)


def test_to_original_resizes_probabilities_to_the_image():
    p = torch.zeros(2, 8, 8)
    p[0, :4] = 1
    out = predict.to_original(p, (40, 30))
    assert out.shape == (2, 40, 30)
    assert out[0, :15].min() > 0.99 and out[0, 25:].max() < 0.01


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_writes_mask_overlay_and_a_row_per_image(tiny_checkpoint, phantom_tree, tmp_path):
    out = tmp_path / "pred"
    code = predict.main([str(phantom_tree / "benign"), str(phantom_tree / "normal" / "normal (1).png"),
                         "--checkpoint", str(tiny_checkpoint), "--out_dir", str(out), "--threshold", "0.3"])
    assert code == 0
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 7  # 6 benign images (their masks skipped) + 1 normal
    for row in rows:
        src = Image.open(row["file"])
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == (src.height, src.width) and set(np.unique(mask)) <= {0, 255}
        assert int(row["lesion_area_px"]) == (mask == 255).sum()
        assert float(row["lesion_area_fraction"]) == pytest.approx((mask == 255).mean(), abs=1e-6)
        ov = Image.open(out / row["overlay"])
        assert ov.size == src.size and ov.mode == "RGB"
        assert row["label"] in ("normal", "benign", "malignant") and row["error"] == ""
        assert 0 <= float(row["confidence"]) <= 1


def test_glob_and_tta(tiny_checkpoint, phantom_tree, tmp_path):
    pattern = str(phantom_tree / "malignant" / "malignant ([12]).png")
    assert predict.main([pattern, "--checkpoint", str(tiny_checkpoint), "--out_dir", str(tmp_path / "a"),
                         "--tta"]) == 0
    assert [r["file"].rsplit("/", 1)[1] for r in _rows(tmp_path / "a" / "predictions.csv")] == \
        ["malignant (1).png", "malignant (2).png"]


def test_threshold_comes_from_the_checkpoint(tiny_checkpoint, phantom_tree, tmp_path, monkeypatch):
    seen = {}
    real = predict.decide
    monkeypatch.setattr(predict, "decide", lambda p, t, *rest: seen.setdefault("t", (t, *rest)) and real(p, t, *rest))
    predict.main([str(phantom_tree / "normal" / "normal (2).png"), "--checkpoint", str(tiny_checkpoint),
                  "--out_dir", str(tmp_path)])
    assert seen["t"] == (0.5, 0.0, None, 1.0)  # threshold, min area, no head, no gate


def test_missing_checkpoint_is_a_clear_error(tmp_path, phantom_tree, caplog):
    code = predict.main([str(phantom_tree / "normal" / "normal (1).png"), "--checkpoint", str(tmp_path / "x.safetensors")])
    assert code == 2
    assert "x.safetensors: checkpoint not found" in caplog.text


def test_decide_with_min_area_and_a_head():
    p = torch.zeros(2, 20, 20)
    p[0, 2:8, 2:8] = 0.9    # a 36-pixel lesion
    p[1, 15:17, 15:17] = 0.9  # a 4-pixel speck
    d = decide(p, 0.5, min_area=10)
    assert d.lesion.sum() == 36 and d.label == "benign"
    assert 0 <= d.malignancy < 0.2  # the lesion's probability sits in the benign channel
    head = torch.tensor([0.1, 0.2, 0.7])  # normal, benign, malignant
    d = decide(p, 0.5, 10, head, normal_gate=0.9)
    assert d.label == "malignant" and abs(d.malignancy - 0.7 / 0.9) < 1e-6 and abs(d.p_normal - 0.1) < 1e-6
    d = decide(p, 0.5, 10, torch.tensor([0.95, 0.03, 0.02]), normal_gate=0.9)
    assert d.label == "normal" and not d.lesion.any()  # the head's normal gate clears the mask
    d = decide(torch.zeros(2, 20, 20), 0.5, 0, head)
    assert d.label == "normal" and abs(d.confidence - 0.1) < 1e-6


def test_predictions_csv_has_the_probability_columns(tiny_checkpoint, phantom_tree, tmp_path):
    predict.main([str(phantom_tree / "benign" / "benign (1).png"), "--checkpoint", str(tiny_checkpoint),
                  "--out_dir", str(tmp_path)])
    row = _rows(tmp_path / "predictions.csv")[0]
    assert "malignancy_probability" in row and row["normal_probability"] == ""  # no head: not known
