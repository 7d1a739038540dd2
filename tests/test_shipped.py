"""The shipped checkpoints: each loads without pickle, carries the right metadata and still scores the
README's lesion Dice on the stored BUSI validation split (real-data part skips without BUSI); the ResNet18 one
is predict.py's default."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import BUSI, ROOT, needs_busi

SPLIT = ROOT / "checkpoints" / "busi_split.json"
# file in checkpoints/ -> (encoder, folder of evaluate.py's summary of it on the validation split, committed
# beside it; the README quotes that summary's lesion Dice)
SHIPPED_MODELS = {
    "busi_unet_resnet18.safetensors": ("resnet18", "eval"),
    "busi_unet_efficientnet_lite0.safetensors": ("efficientnet-lite0", "eval_efficientnet_lite0"),
}
DEFAULT = ROOT / "checkpoints" / "busi_unet_resnet18.safetensors"


def summary_of(name: str) -> dict:
    folder = SHIPPED_MODELS[name][1]
    return json.loads((ROOT / "checkpoints" / folder / "summary.json").read_text(encoding="utf-8"))


def readme_dice(name: str) -> float:
    return summary_of(name)["lesion"]["dice_a"]["mean"]


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_checkpoint_loads_without_pickle(name, forbid_pickle):
    import model
    net, meta = model.load_checkpoint(ROOT / "checkpoints" / name)
    assert meta["encoder"] == SHIPPED_MODELS[name][0] and meta["classes"] == 2 and meta["image_size"] == 256
    assert (meta["norm_mean"], meta["norm_std"], meta["in_channels"]) == (0.5, 0.5, 1)
    assert meta["split_file"] == "checkpoints/busi_split.json" and SPLIT.is_file()
    assert 0.0 < meta["threshold"] < 1.0
    assert net.segmentation_head[0].out_channels == 2
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 256, 256)).shape == (1, 2, 256, 256)


def test_every_shipped_file_is_listed_here():
    assert sorted(p.name for p in (ROOT / "checkpoints").glob("*.safetensors")) == sorted(SHIPPED_MODELS)


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_readme_reports_the_shipped_figure(name):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    summary = summary_of(name)
    assert summary["checkpoint"].endswith(name)
    assert f"{readme_dice(name):.3f}" in readme


def test_predict_with_no_arguments_uses_the_shipped_model(tmp_path, monkeypatch):
    import predict
    assert predict.checkpoint == str(DEFAULT.relative_to(ROOT))
    monkeypatch.chdir(ROOT)
    assert predict.main(["--out_dir", str(tmp_path)]) == 0
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["error"] == "" for r in rows)


@needs_busi
@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_checkpoint_scores_the_readme_dice_on_the_validation_split(name, tmp_path, monkeypatch):
    import evaluate
    from cli import parse_settings
    monkeypatch.chdir(ROOT)
    cfg = parse_settings(evaluate.__file__, ["--checkpoint", str(ROOT / "checkpoints" / name), "--data_dir",
                                            str(BUSI), "--split_file", str(SPLIT), "--split", "val",
                                            "--out_dir", str(tmp_path), "--gallery", "0"])
    summary = evaluate.run(cfg)
    dice = summary["lesion"]["dice_a"]["mean"]
    assert summary["lesion"]["dice_a"]["n"] == 129
    assert dice >= readme_dice(name) - 0.02, f"{name} scores {dice:.4f}, README says {readme_dice(name)}"
