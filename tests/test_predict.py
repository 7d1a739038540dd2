"""predict.py: inputs (file, folder, glob), every file it writes, the label rule, TTA."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    assert seen["t"] == (0.5, 0.0, None, 1.0, 1.0)  # threshold, min area, no head, no gate, no gate keep


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


# ---------------------------------------------------------------------------------------------------------
# The clinical read-out: measurements, pixel size, DICOM, uncertainty (fake predictors: deterministic)
# ---------------------------------------------------------------------------------------------------------

def fixed_predictor(lesion: bool = True):
    """Always the same benign ellipse at the network's resolution, whatever the image (so every view of the
    uncertainty disagrees a little with the reported mask)."""
    from skimage.draw import ellipse

    def predictor(images, batch_size, tta):
        n, _, s, _ = np.asarray(images).shape
        z = torch.full((n, 2, s, s), -6.0)
        if lesion:
            rr, cc = ellipse(s / 2, s / 2, s / 6, s / 3, shape=(s, s))
            z[:, 0, rr, cc] = 6.0
        return z
    return predictor


def following_predictor(images, batch_size, tta):
    """The lesion is where the image is dark: follows every mirror and zoom exactly (no uncertainty)."""
    x = torch.as_tensor(np.array(images)).float()
    z = torch.where(x < 60, 6.0, -6.0)
    return torch.cat([z, torch.full_like(z, -6.0)], 1)


@pytest.fixture()
def fake_model(monkeypatch, tiny_checkpoint):
    """Replace the network by a predictor given to the returned function (the checkpoint's metadata stays)."""
    from model import read_checkpoint_meta
    meta = read_checkpoint_meta(tiny_checkpoint)

    def use(predictor, **meta_changes):
        monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: (predictor, {**meta, **meta_changes}))
    return use


def dark_disc_png(path, shape=(90, 120), centre=(45, 60), radius=20):
    img = np.full(shape, 180, np.uint8)
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    img[(rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2] = 20
    Image.fromarray(img).save(path)
    return path


def test_readout_columns_json_and_overlay_with_a_pixel_size(fake_model, tmp_path):
    fake_model(fixed_predictor())
    src = dark_disc_png(tmp_path / "scan.png")
    assert predict.main([str(src), "--out_dir", str(tmp_path / "o"), "--pixel_mm", "0.1"]) == 0
    row = _rows(tmp_path / "o" / "predictions.csv")[0]
    assert row["n_lesions"] == "1" and row["pixel_size_source"] == "pixel_mm setting" and row["pixel_mm_row"] == "0.1"
    assert float(row["long_diameter_mm"]) == pytest.approx(float(row["long_diameter_px"]) * 0.1, abs=0.01)
    assert float(row["long_diameter_px"]) == pytest.approx(2 * 120 / 3, rel=0.06)  # the ellipse at 120 px wide
    assert row["shape"] == "oval" and row["orientation"] == "parallel" and row["margin"] == "circumscribed"
    assert "not a diagnosis" in row["note"] and row["uncertainty"] == "" and row["review"] == ""
    report = json.loads((tmp_path / "o" / row["lesions_json"]).read_text())
    assert "not a diagnosis" in report["note"] and "BI-RADS Atlas, 5th edition" in report["terms"]
    assert report["n_lesions"] == 1 and report["lesions"][0]["long_diameter"]["px"] == float(row["long_diameter_px"])
    assert report["image"]["pixel_spacing"]["source"] == "pixel_mm setting"
    ov = np.asarray(Image.open(tmp_path / "o" / row["overlay"]))
    assert (ov == predict.DIAMETER_COLOURS[0]).all(-1).sum() > 20  # the long diameter is drawn


def test_without_a_pixel_size_sizes_are_in_pixels_only(fake_model, tmp_path):
    fake_model(fixed_predictor())
    predict.main([str(dark_disc_png(tmp_path / "scan.png")), "--out_dir", str(tmp_path / "o")])
    row = _rows(tmp_path / "o" / "predictions.csv")[0]
    assert row["pixel_size_source"] == "unknown" and row["long_diameter_mm"] == "" and row["area_mm2"] == ""
    assert float(row["long_diameter_px"]) > 0
    assert "px (pixel size unknown)" in predict.lesion_line(
        json.loads((tmp_path / "o" / row["lesions_json"]).read_text())["lesions"][0])


def test_uncertainty_map_score_and_review_flag(fake_model, tmp_path):
    src = dark_disc_png(tmp_path / "scan.png")
    fake_model(fixed_predictor())
    assert predict.main([str(src), "--out_dir", str(tmp_path / "a"), "--uncertainty", "--uncertainty_cutoff", "0.01"]) == 0
    row = _rows(tmp_path / "a" / "predictions.csv")[0]
    assert float(row["uncertainty"]) > 0.01 and row["review"] == "yes"
    umap = Image.open(tmp_path / "a" / "scan_uncertainty.png")
    assert umap.size == (120, 90) and umap.mode == "RGB"
    fake_model(following_predictor)
    predict.main([str(src), "--out_dir", str(tmp_path / "b"), "--uncertainty", "--uncertainty_cutoff", "0.05"])
    row = _rows(tmp_path / "b" / "predictions.csv")[0]
    assert float(row["uncertainty"]) < 0.05 and row["review"] == "no" and row["n_lesions"] == "1"
    fake_model(fixed_predictor(), uncertainty_cutoff=0.01)  # stored in the checkpoint (ship_checkpoint.py)
    predict.main([str(src), "--out_dir", str(tmp_path / "c"), "--uncertainty"])
    assert _rows(tmp_path / "c" / "predictions.csv")[0]["review"] == "yes"
    fake_model(following_predictor)  # no cut-off anywhere: the score without a flag
    predict.main([str(src), "--out_dir", str(tmp_path / "d"), "--uncertainty"])
    assert _rows(tmp_path / "d" / "predictions.csv")[0]["review"] == ""


def test_quick_outline_and_small_component_removal_match_the_library_versions():
    """predict.thick_boundaries is skimage's find_boundaries(mode="thick"); remove_small, which labels only the
    lesion's bounding box, drops exactly the components that labelling the whole image drops."""
    from skimage.measure import label
    from skimage.segmentation import find_boundaries
    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        assert (predict.thick_boundaries(m) == find_boundaries(m, mode="thick")).all()
        components = label(m, connectivity=2)
        sizes = np.bincount(components.ravel())
        for area in (1, 3, 8):
            keep = sizes >= area
            keep[0] = False
            assert (predict.remove_small(torch.from_numpy(m), area).numpy() == keep[components]).all()


@pytest.mark.parametrize("tta", [False, True])
def test_the_image_and_its_views_go_through_the_network_in_one_call(tta):
    """uncertainty.predict_with_views: one predictor call for the image and its views, with the results of the
    separate calls (the reported prediction, with its tta, and view_predictions)."""
    import uncertainty
    from backends import split_output
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=g).numpy()
    weight = torch.randn(2, 1, 3, 3, generator=g)
    calls = []

    def net(imgs, batch_size, tta_):  # a fixed convolution: not mirror-symmetric, so tta changes the answer
        calls.append(len(imgs))
        x = torch.as_tensor(np.array(imgs)).float() / 255
        z = F.conv2d(x, weight, padding=1)
        if tta_:
            z = (z + F.conv2d(x.flip(-1), weight, padding=1).flip(-1)) / 2
        return z, z.mean((2, 3)).repeat(1, 2)[:, :3]
    seg, cls, views = uncertainty.predict_with_views(net, images, 8, tta)
    assert calls == [2 * (1 + len(uncertainty.VIEWS))]
    ref_seg, ref_cls = split_output(net(images, 8, tta))
    assert torch.allclose(seg, ref_seg, atol=1e-6) and torch.allclose(cls, ref_cls, atol=1e-6)
    for (p, c), (q, d) in zip(views, uncertainty.view_predictions(net, images, torch.sigmoid(ref_seg))):
        assert torch.allclose(p, q, atol=1e-6) and torch.allclose(c, d, atol=1e-6)


def test_review_cutoff_comes_from_the_setting_or_a_checkpoint_of_the_same_method():
    from uncertainty import METHOD
    cfg = {"uncertainty": True, "uncertainty_cutoff": -1.0, "checkpoint": "x"}
    assert predict.review_cutoff(cfg, {"uncertainty_cutoff": 0.2}) == 0.2
    assert predict.review_cutoff(cfg, {"uncertainty_cutoff": 0.2, "uncertainty_method": METHOD}) == 0.2
    assert predict.review_cutoff(cfg, {"uncertainty_cutoff": 0.2, "uncertainty_method": "other"}) is None
    assert predict.review_cutoff({**cfg, "uncertainty_cutoff": 0.3}, {"uncertainty_cutoff": 0.2}) == 0.3
    assert predict.review_cutoff({**cfg, "uncertainty": False}, {"uncertainty_cutoff": 0.2}) is None


def test_dicom_frames_regions_crop_and_no_header_leaks(fake_model, tmp_path):
    from test_dicom_io import SECRET, region, write_dicom
    fake_model(fixed_predictor())
    frame = np.full((100, 140), 150, np.uint8)
    frame[:, :20] = 255  # scanner UI left of the ultrasound region
    folder = tmp_path / "exam"
    folder.mkdir()
    write_dicom(folder / "IM0001", np.stack([frame, frame]), regions=[region(20, 0, 139, 99, (0.005, 0.005))])
    out = tmp_path / "o"
    assert predict.main([str(folder), "--out_dir", str(out), "--dicom_crop"]) == 0
    rows = _rows(out / "predictions.csv")
    assert [r["frame"] for r in rows] == ["0", "1"] and [r["mask"] for r in rows] == \
        ["IM0001_f000_mask.png", "IM0001_f001_mask.png"]
    assert rows[0]["pixel_size_source"] == "dicom ultrasound region 1" and rows[0]["pixel_mm_row"] == "0.05"
    mask = np.asarray(Image.open(out / rows[0]["mask"])) > 0
    assert mask.shape == (100, 140) and not mask[:, :20].any() and mask.any()  # segmented inside the region only
    cols = np.nonzero(mask.any(0))[0]
    assert (cols.min() + cols.max()) / 2 == pytest.approx(20 + 120 / 2, abs=2)  # centred in the crop, not the frame
    for name in SECRET.split():
        for f in out.iterdir():
            assert name.split("^")[0].encode() not in f.read_bytes(), f"{name} leaked into {f.name}"
    assert predict.main([str(folder / "IM0001"), "--out_dir", str(tmp_path / "one"), "--frame", "1"]) == 0
    assert [r["frame"] for r in _rows(tmp_path / "one" / "predictions.csv")] == ["1"]


def test_a_bad_dicom_is_reported_and_the_others_are_processed(fake_model, tmp_path, caplog):
    from test_dicom_io import write_dicom
    fake_model(fixed_predictor())
    folder = tmp_path / "mixed"
    folder.mkdir()
    dark_disc_png(folder / "a.png")
    good = write_dicom(folder / "b.dcm", np.full((60, 80), 100, np.uint8))
    (folder / "c.dcm").write_bytes(good.read_bytes()[:-1500])  # cut inside the pixel data
    assert predict.main([str(folder), "--out_dir", str(tmp_path / "o")]) == 1
    rows = {Path(r["file"]).name: r for r in _rows(tmp_path / "o" / "predictions.csv")}
    assert rows["a.png"]["error"] == "" and rows["b.dcm"]["error"] == ""
    assert "c.dcm" in rows["c.dcm"]["error"] and "truncated" in rows["c.dcm"]["error"]
    assert "c.dcm" in caplog.text


def test_bad_pixel_mm_setting_is_a_clear_error(fake_model, tmp_path, caplog):
    fake_model(fixed_predictor())
    assert predict.main([str(dark_disc_png(tmp_path / "s.png")), "--out_dir", str(tmp_path / "o"),
                         "--pixel_mm", "fine"]) == 2
    assert "pixel_mm: pixel size 'fine' is not a number" in caplog.text


def test_the_gate_keeps_a_confident_mask_and_asks_for_review():
    import torch
    from predict import decide
    probs = torch.zeros(2, 20, 20)
    probs[0, 5:15, 5:15] = 0.95
    says_normal = torch.tensor([0.95, 0.04, 0.01])
    kept = decide(probs, 0.5, cls_probs=says_normal, normal_gate=0.9, gate_keep=0.8)
    assert kept.lesion.sum() == 100 and kept.gate_conflict and not kept.gated and kept.label == "benign"
    erased = decide(probs, 0.5, cls_probs=says_normal, normal_gate=0.9, gate_keep=0.99)
    assert erased.lesion.sum() == 0 and erased.gated and not erased.gate_conflict and erased.label == "normal"
    unsure = decide(probs, 0.5, cls_probs=torch.tensor([0.5, 0.4, 0.1]), normal_gate=0.9, gate_keep=0.8)
    assert unsure.lesion.sum() == 100 and not unsure.gate_conflict and not unsure.gated


def test_a_one_channel_model_takes_its_label_from_the_head():
    import torch
    from predict import decide
    probs = torch.zeros(1, 20, 20)
    probs[0, 5:15, 5:15] = 0.9
    d = decide(probs, 0.5, cls_probs=torch.tensor([0.1, 0.2, 0.7]))
    assert d.label == "malignant" and d.class_masks.shape == (2, 20, 20)
    assert d.class_masks[1].sum() == 100 and d.class_masks[0].sum() == 0
    empty = decide(torch.zeros(1, 20, 20), 0.5, cls_probs=torch.tensor([0.8, 0.1, 0.1]))
    assert empty.label == "normal" and empty.class_masks.shape == (2, 20, 20) and not empty.class_masks.any()
    with pytest.raises(ValueError, match="needs its classification head"):
        decide(probs, 0.5)
