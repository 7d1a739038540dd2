"""The shipped checkpoint: loads without pickle, carries the right metadata, is predict.py's default, and
still scores the README's lesion Dice on the stored BUSI validation split (real-data part skips without BUSI)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import BUSI, ROOT, needs_busi

SHIPPED = ROOT / "checkpoints" / "busi_unet_resnet18.safetensors"
SPLIT = ROOT / "checkpoints" / "busi_split.json"
# evaluate.py's summary of the shipped file on its validation split, committed beside it; the README quotes it
SUMMARY = json.loads((ROOT / "checkpoints" / "eval" / "summary.json").read_text(encoding="utf-8"))
README_LESION_DICE = SUMMARY["lesion"]["dice_a"]["mean"]


def test_shipped_checkpoint_loads_without_pickle(forbid_pickle):
    import model
    net, meta = model.load_checkpoint(SHIPPED)
    assert meta["encoder"] == "resnet18" and meta["classes"] == 2 and meta["image_size"] == 256
    assert (meta["norm_mean"], meta["norm_std"], meta["in_channels"]) == (0.5, 0.5, 1)
    assert meta["split_file"] == "checkpoints/busi_split.json" and SPLIT.is_file()
    assert net.segmentation_head[0].out_channels == 2
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 256, 256)).shape == (1, 2, 256, 256)


def test_readme_reports_the_shipped_figure():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{README_LESION_DICE:.3f}" in readme


def test_predict_with_no_arguments_uses_the_shipped_model(tmp_path, monkeypatch):
    import predict
    monkeypatch.chdir(ROOT)
    assert predict.main(["--out_dir", str(tmp_path)]) == 0
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["error"] == "" for r in rows)


@needs_busi
def test_shipped_checkpoint_scores_the_readme_dice_on_the_validation_split(tmp_path, monkeypatch):
    import evaluate
    from cli import parse_settings
    monkeypatch.chdir(ROOT)
    cfg = parse_settings(evaluate.__file__, ["--checkpoint", str(SHIPPED), "--data_dir", str(BUSI),
                                            "--split_file", str(SPLIT), "--split", "val",
                                            "--out_dir", str(tmp_path), "--gallery", "0"])
    summary = evaluate.run(cfg)
    dice = summary["lesion"]["dice_a"]["mean"]
    assert summary["lesion"]["dice_a"]["n"] == 129
    assert dice >= README_LESION_DICE - 0.02, f"shipped model scores {dice:.4f}, README says {README_LESION_DICE}"
