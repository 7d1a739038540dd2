"""Images are read upright (EXIF orientation) and worked on at a bounded resolution (issue 22): an image whose
longest side is over dataset.WORK_SIDE is segmented, measured and drawn at that size, its mask drawn back at full
size with sizes and points in full-size pixels, in predict.py, evaluate.py and the page alike (the page's are in
tests/test_app_load.py). The tests lower WORK_SIDE so that the real samples are over it."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import dataset
import evaluate
import predict
from measure import measure_lesions
from metrics import dice_iou

SAMPLE = ROOT / "samples" / "malignant (3).png"
CHECKPOINT = ROOT / "checkpoints" / "busi_unet_resnet18.safetensors"


def orientation_6_jpeg(path, grey: np.ndarray) -> None:
    """grey stored turned 90 degrees anticlockwise, with EXIF Orientation 6 (viewers turn it back clockwise)."""
    exif = Image.Exif()
    exif[dataset.ORIENTATION_TAG] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(grey))).save(path, quality=95, exif=exif)


def test_a_jpeg_with_exif_orientation_6_is_read_upright(tmp_path):
    grey = np.asarray(Image.open(SAMPLE).convert("L"))
    orientation_6_jpeg(tmp_path / "turned.jpg", grey)
    assert Image.open(tmp_path / "turned.jpg").size == (grey.shape[0], grey.shape[1])  # stored turned
    upright = dataset.load_image(tmp_path / "turned.jpg")
    assert upright.shape == grey.shape and np.abs(upright.astype(int) - grey).mean() < 3


def test_predict_py_segments_and_draws_the_upright_image(tmp_path):
    grey = np.asarray(Image.open(SAMPLE).convert("L"))
    orientation_6_jpeg(tmp_path / "turned.jpg", grey)
    Image.fromarray(grey).save(tmp_path / "upright.png")
    assert predict.main([str(tmp_path / "turned.jpg"), str(tmp_path / "upright.png"), "--checkpoint", str(CHECKPOINT),
                         "--out_dir", str(tmp_path / "out")]) == 0
    turned = np.asarray(Image.open(tmp_path / "out" / "turned_mask.png")) > 0
    upright = np.asarray(Image.open(tmp_path / "out" / "upright_mask.png")) > 0
    assert turned.shape == upright.shape == grey.shape and dice_iou(turned, upright)[0] > 0.9
    assert Image.open(tmp_path / "out" / "turned_overlay.png").size == (grey.shape[1], grey.shape[0])


def test_the_page_shows_the_upright_image(tmp_path):
    import app
    grey = np.asarray(Image.open(SAMPLE).convert("L"))
    orientation_6_jpeg(tmp_path / "turned.jpg", grey)
    state = app.State(app.default_settings(checkpoint=str(CHECKPOINT), uncertainty=False))
    try:
        r = app.handle_upload(state, (tmp_path / "turned.jpg").read_bytes(), {"name": "turned.jpg"})
    finally:
        state.close()
    assert (r["width"], r["height"]) == (grey.shape[1], grey.shape[0])


def test_working_size_shrink_and_drawing_back():
    assert dataset.working_size((600, 800)) == (600, 800)
    assert dataset.working_size((7000, 3500)) == (2048, 1024) and dataset.working_size((1, 9000)) == (1, 2048)
    grey = np.random.default_rng(0).integers(0, 256, (3000, 2500), dtype=np.uint8)
    assert dataset.shrink(grey).shape == (2048, 1707) and dataset.shrink(grey[:100, :100]).shape == (100, 100)
    small = np.zeros((30, 40), bool)
    small[5:20, 10:33] = True
    full = dataset.to_full(small, (95, 101))
    assert full.shape == (95, 101) and full.dtype == bool and full.sum() == dataset.full_area(small, (95, 101))
    labels = dataset.to_full(np.arange(12, dtype=np.int32).reshape(3, 4), (7, 9))  # nearest: every value kept
    assert set(np.unique(labels)) == set(range(12)) and dataset.to_full(small, (30, 40)) is small
    edges = dataset.block_edges(95, 30)
    assert edges[0] == 0 and edges[-1] == 95 and np.all(np.diff(edges) >= 3)


def test_measurements_of_a_working_resolution_mask_are_those_of_the_full_mask():
    from skimage.draw import ellipse
    work = np.zeros((300, 400), bool)
    work[ellipse(150, 180, 60, 110, rotation=0.3, shape=work.shape)] = True
    shape = (750, 1000)
    (a,), (b,) = measure_lesions(work, None, shape), measure_lesions(dataset.to_full(work, shape))
    assert a["area"]["px"] == b["area"]["px"] and a["bbox_row_col"] == b["bbox_row_col"]
    assert a["long_diameter"]["px"] == pytest.approx(b["long_diameter"]["px"], rel=0.02)
    assert a["perpendicular_diameter"]["px"] == pytest.approx(b["perpendicular_diameter"]["px"], rel=0.03)
    assert np.abs(np.subtract(a["centroid_row_col"], b["centroid_row_col"])).max() < 1
    middle = [np.mean(x["long_diameter"]["ends_row_col"], axis=0) for x in (a, b)]  # the ends slide along the tip
    assert np.abs(middle[0] - middle[1]).max() < 2
    assert a["shape"]["term"] == b["shape"]["term"] and a["orientation"]["term"] == b["orientation"]["term"]


def test_predict_py_over_the_working_resolution_writes_full_size_masks_and_sizes(tmp_path, monkeypatch):
    args = [str(SAMPLE), "--checkpoint", str(CHECKPOINT), "--uncertainty"]
    assert predict.main([*args, "--out_dir", str(tmp_path / "full")]) == 0
    monkeypatch.setattr(dataset, "WORK_SIDE", 200)
    assert predict.main([*args, "--out_dir", str(tmp_path / "work")]) == 0
    w, h = Image.open(SAMPLE).size
    full, work = (np.asarray(Image.open(tmp_path / d / "malignant (3)_mask.png")) > 0 for d in ("full", "work"))
    assert work.shape == (h, w) and dice_iou(work, full)[0] > 0.85
    assert max(Image.open(tmp_path / "work" / "malignant (3)_overlay.png").size) == 200
    assert max(Image.open(tmp_path / "work" / "malignant (3)_uncertainty.png").size) == 200
    with open(tmp_path / "work" / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert (int(row["width"]), int(row["height"])) == (w, h) and int(row["lesion_area_px"]) == work.sum()


def test_evaluate_decides_and_sweeps_at_the_working_resolution(monkeypatch):
    probs = torch.nn.functional.avg_pool2d(torch.rand(1, 2, 24, 24, generator=torch.Generator().manual_seed(0)),
                                           5, 1, 2)[0]
    true = np.zeros((300, 450), bool)
    true[100:200, 150:300] = True
    full = predict.decide(predict.to_original(probs, true.shape), 0.5, 40.0)
    monkeypatch.setattr(dataset, "WORK_SIDE", 100)
    d = predict.decide_full(probs, true.shape, 0.5, 40.0)
    assert d.lesion.shape == d.class_masks.shape[1:] == true.shape and dice_iou(d.lesion, full.lesion)[0] > 0.95
    inter, area, *_ = evaluate._component_counts(probs, true, [0.5], [0.0, 40.0])
    assert inter[0, 1] == (d.lesion & true).sum() and area[0, 1] == d.lesion.sum()  # the sweep counts that mask
    assert np.array_equal(predict.lesion_full(probs, true.shape, 0.5, 40.0), d.lesion)
