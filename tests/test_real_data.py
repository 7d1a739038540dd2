"""The real BUSI data in ../shared/data/BUSI: discovery, its quirks, and a short training on it.
Skipped, with the reason, where the folder is absent."""
from __future__ import annotations

import numpy as np

import dataset
from conftest import BUSI, needs_busi

pytestmark = needs_busi


def test_discovery_finds_780_images_in_3_classes():
    samples = dataset.discover_busi(BUSI)
    counts = {c: sum(s.label == c for s in samples) for c in dataset.CLASS_NAMES}
    assert counts == {"normal": 133, "benign": 437, "malignant": 210}
    n_masks = {c: sum(len(s.masks) for s in samples if s.label == c) for c in dataset.CLASS_NAMES}
    assert n_masks == {"normal": 133, "benign": 454, "malignant": 211}
    assert sum(len(s.masks) == 3 for s in samples) == 1


def test_multi_mask_images_are_the_union_and_quirky_files_load():
    samples = {s.key: s for s in dataset.discover_busi(BUSI)}
    s = samples["benign/benign (4).png"]
    assert len(s.masks) >= 2
    grey = dataset.load_image(s.image)
    parts = [dataset.load_mask(m, grey.shape) for m in s.masks]
    union = dataset.load_mask_union(s.masks, grey.shape)
    assert np.array_equal(union, np.logical_or.reduce(parts))
    assert union.sum() > max(p.sum() for p in parts)
    # normal masks are RGB files and all zero
    n = samples["normal/normal (1).png"]
    assert not dataset.load_mask_union(n.masks, dataset.load_image(n.image).shape).any()


def test_the_duplicate_with_two_labels_is_dropped():
    samples = [s for s in dataset.discover_busi(BUSI)
               if s.key in ("benign/benign (433).png", "malignant/malignant (145).png", "benign/benign (1).png")]
    loaded = dataset.load_set(samples, size=32)
    keep, report = dataset.resolve_duplicates(loaded.samples, loaded.hashes)
    assert [loaded.samples[i].key for i in keep] == ["benign/benign (1).png"]
    assert sorted(report["conflicting_labels"][0]["dropped"]) == ["benign/benign (433).png", "malignant/malignant (145).png"]


def test_a_short_training_runs_on_real_images(tmp_path):
    import train
    from model import load_checkpoint
    csv_path = tmp_path / "few.csv"
    rows = ["image,mask,label"]
    for label, n in (("benign", 6), ("malignant", 6), ("normal", 4)):
        for i in range(1, n + 1):
            mask = f"{BUSI}/{label}/{label} ({i})_mask.png"
            rows.append(f"{BUSI}/{label}/{label} ({i}).png,{mask},{label}")
    csv_path.write_text("\n".join(rows) + "\n")
    cfg = train.default_settings(manifest=str(csv_path), out_dir=str(tmp_path / "run"),
                                 loss_graph_dir=str(tmp_path / "lg"), epochs=1, image_size=64, expand=1,
                                 batch_size=4, progress=False)
    metrics = train.train_model(cfg)
    assert np.isfinite(metrics["val_loss"])
    model, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["image_size"] == 64 and meta["train_config"]["manifest"] == str(csv_path)
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 2
    assert (tmp_path / "lg" / "run.png").stat().st_size > 1000
