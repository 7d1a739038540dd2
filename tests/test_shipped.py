"""The shipped checkpoints: each loads without pickle, carries the right metadata, and still scores the
README's figures on its BUSI validation images and on BUS-UCLM (real-data parts skip without ../shared);
predict.py's default model reproduces the committed sample predictions."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import BUSI, ROOT

UCLM = ROOT.parent / "shared" / "data" / "BUS-UCLM"
BRA = ROOT.parent / "shared" / "data" / "BUS-BRA"
CK = ROOT / "checkpoints"

# file in checkpoints/ -> what it is, and the folders of evaluate.py's summaries committed beside it (the README
# quotes them): "busi" on its BUSI validation images, "uclm" on BUS-UCLM (all images for BUSI-only models, the
# validation patients for the multi-source ones), "bra" on BUS-BRA's validation patients where trained on it;
# each with the evaluate.py arguments that made it.
SHIPPED = {
    "all_unet_efficientnet_lite0.safetensors": {
        "encoder": "efficientnet-lite0", "image_size": 160, "head": True,
        "split": "checkpoints/all_sources_split.json",
        "busi": ("eval_all_busi", ["--sources", f"busi={BUSI}", "--split", "val"]),
        "uclm": ("eval_all_bus-uclm", ["--sources", f"bus-uclm={UCLM / 'manifest.csv'}", "--split", "val"]),
        "bra": ("eval_all_bus-bra", ["--sources", f"bus-bra={BRA / 'manifest.csv'}", "--split", "val"])},
    "busi_unet_efficientnet_lite0.safetensors": {
        "encoder": "efficientnet-lite0", "image_size": 192, "head": True,
        "split": "checkpoints/busi_split_grouped.json",
        "busi": ("eval_efficientnet_lite0", ["--data_dir", str(BUSI), "--split", "val"]),
        "uclm": ("eval_efficientnet_lite0_bus-uclm", ["--manifest", str(UCLM / "manifest.csv"), "--split", "all"])},
    "multi_unet_efficientnet_lite0.safetensors": {
        "encoder": "efficientnet-lite0", "image_size": 192, "head": True,
        "split": "checkpoints/multi_split_busi_bus-uclm.json",
        "busi": ("eval_multi_busi", ["--sources", f"busi={BUSI}", "--split", "val"]),
        "uclm": ("eval_multi_bus-uclm", ["--sources", f"uclm={UCLM / 'manifest.csv'}", "--split", "val"])},
    "busi_unet_resnet18.safetensors": {
        "encoder": "resnet18", "image_size": 256, "head": False, "split": "checkpoints/busi_split.json",
        "busi": ("eval", ["--data_dir", str(BUSI), "--split", "val"]),
        "uclm": ("eval_resnet18_bus-uclm", ["--manifest", str(UCLM / "manifest.csv"), "--split", "all"])},
}
DEFAULT = CK / "all_unet_efficientnet_lite0.safetensors"


def summary_of(name: str, part: str) -> dict:
    return json.loads((CK / SHIPPED[name][part][0] / "summary.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_loads_without_pickle(name, forbid_pickle):
    import model
    spec = SHIPPED[name]
    net, meta = model.load_checkpoint(CK / name)
    assert meta["encoder"] == spec["encoder"] and meta["classes"] == 2 and meta["image_size"] == spec["image_size"]
    assert (meta["norm_mean"], meta["norm_std"], meta["in_channels"]) == (0.5, 0.5, 1)
    assert meta["split_file"] == spec["split"] and (ROOT / spec["split"]).is_file()
    assert 0.0 < meta["threshold"] < 1.0 and meta.get("storage") == "fp16"
    assert bool(meta.get("head")) == spec["head"]
    s = spec["image_size"]
    with torch.inference_mode():
        out = net(torch.zeros(1, 1, s, s))
    seg = out[0] if spec["head"] else out
    assert seg.shape == (1, 2, s, s)
    if spec["head"]:
        assert out[1].shape == (1, 3)


def test_every_shipped_file_is_listed_here():
    assert sorted(p.name for p in CK.glob("*.safetensors")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_readme_reports_the_shipped_figures(name):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for part in [p for p in ("busi", "uclm", "bra") if p in SHIPPED[name]]:
        summary = summary_of(name, part)
        assert summary["checkpoint"].endswith(name)
        assert f"{summary['figures']['lesion_dice']:.3f}" in readme, (name, part)


def test_predict_with_no_arguments_reproduces_the_committed_sample_predictions(tmp_path, monkeypatch):
    import predict
    assert predict.checkpoint == str(DEFAULT.relative_to(ROOT))
    monkeypatch.chdir(ROOT)
    assert predict.main(["--out_dir", str(tmp_path)]) == 0

    def rows(path):
        with open(path, newline="") as f:
            return {r["file"].replace("\\\\", "/").rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    got, committed = rows(tmp_path / "predictions.csv"), rows(ROOT / "sample_predictions" / "predictions.csv")
    assert len(got) == 6 and all(r["error"] == "" for r in got.values())
    assert {k: r["label"] for k, r in got.items()} == {k: r["label"] for k, r in committed.items()}


def _evaluate(name: str, part: str, tmp_path, monkeypatch) -> dict:
    import evaluate
    from cli import parse_settings
    monkeypatch.chdir(ROOT)
    folder, args = SHIPPED[name][part]
    cfg = parse_settings(evaluate.__file__, ["--checkpoint", str(CK / name), "--split_file", SHIPPED[name]["split"],
                                            *args, "--out_dir", str(tmp_path), "--gallery", "0", "--bootstrap", "0",
                                            "--no-measure"])
    return evaluate.run(cfg)


REAL_DATA = {"busi": BUSI, "uclm": UCLM, "bra": BRA}


@pytest.mark.parametrize("name,part", [(n, p) for n in sorted(SHIPPED) for p in REAL_DATA if p in SHIPPED[n]])
def test_shipped_checkpoint_scores_the_readme_figures(name, part, tmp_path, monkeypatch):
    """On its BUSI validation images, on BUS-UCLM and on BUS-BRA's validation patients where listed: lesion Dice and IoU at least the README's minus 0.02,
    the share of normal scans given a lesion at most the README's plus 0.02."""
    if not REAL_DATA[part].is_dir():
        pytest.skip(f"real data not found at {REAL_DATA[part]}")
    want = summary_of(name, part)["figures"]
    got = _evaluate(name, part, tmp_path, monkeypatch)["figures"]
    assert got["n_lesion"] == want["n_lesion"]
    assert got["lesion_dice"] >= want["lesion_dice"] - 0.02, (name, part, got["lesion_dice"], want["lesion_dice"])
    assert got["lesion_iou"] >= want["lesion_iou"] - 0.02
    if want["n_normal"]:
        assert got["normal_fp_share"] <= want["normal_fp_share"] + 0.02
