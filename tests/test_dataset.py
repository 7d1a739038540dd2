"""dataset.py: discovery of the three layouts, every quirk of real data, preprocessing, splitting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import DataError


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path)


def _picture(seed, h=40, w=50):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _box(h=40, w=50, y=(10, 20), x=(10, 30)):
    m = np.zeros((h, w), np.uint8)
    m[y[0]:y[1], x[0]:x[1]] = 255
    return m


@pytest.fixture()
def quirky_tree(tmp_path):
    """A BUSI-like tree holding every quirk of the real release."""
    root = tmp_path / "BUSI"
    b, m, n = root / "benign", root / "malignant", root / "normal"
    # benign (1): greyscale image, 1-bit mask
    _save(b / "benign (1).png", _picture(1))
    Image.fromarray(_box() > 0).convert("1").save(b / "benign (1)_mask.png")
    # benign (2): RGB image with equal channels, two masks (0/255 and 0/1) whose union is the lesion
    g = _picture(2)
    _save(b / "benign (2).png", np.stack([g, g, g], -1))
    _save(b / "benign (2)_mask.png", _box(y=(5, 10), x=(5, 10)))
    _save(b / "benign (2)_mask_1.png", (_box(y=(20, 30), x=(30, 40)) // 255).astype(np.uint8))
    # benign (10): RGBA mask; natural sort must put it after benign (2)
    _save(b / "benign (10).png", _picture(10))
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[12:18, 12:18, :3] = 255
    Image.fromarray(rgba, "RGBA").save(b / "benign (10)_mask.png")
    # malignant (1): colour image (channels differ), greyscale mask
    col = np.stack([_picture(3), _picture(4), _picture(5)], -1)
    _save(m / "malignant (1).png", col)
    _save(m / "malignant (1)_mask.png", _box(y=(15, 35), x=(20, 30)))
    # malignant (2): the same picture as benign (1) with another label (BUSI's benign 433 / malignant 145)
    _save(m / "malignant (2).png", _picture(1))
    _save(m / "malignant (2)_mask.png", _box())
    # normal: RGB empty masks
    for i in (1, 2):
        _save(n / f"normal ({i}).png", _picture(20 + i))
        _save(n / f"normal ({i})_mask.png", np.zeros((40, 50, 3), np.uint8))
    return root


def test_discover_busi_finds_every_image_with_its_masks(quirky_tree):
    samples = dataset.discover_busi(quirky_tree)
    keys = [s.key for s in samples]
    assert keys == ["normal/normal (1).png", "normal/normal (2).png", "benign/benign (1).png",
                    "benign/benign (2).png", "benign/benign (10).png", "malignant/malignant (1).png",
                    "malignant/malignant (2).png"]
    two = next(s for s in samples if s.key == "benign/benign (2).png")
    assert [p.name for p in two.masks] == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    assert {s.label for s in samples} == set(dataset.CLASS_NAMES)


def test_every_mode_and_mask_encoding_is_read(quirky_tree):
    loaded = dataset.load_set(dataset.discover_busi(quirky_tree), size=32)
    by_key = {s.key: i for i, s in enumerate(loaded.samples)}
    # union of a 0/255 and a 0/1 mask
    full = loaded.full_masks[by_key["benign/benign (2).png"]]
    assert full.sum() == 25 + 100 and full[7, 7] and full[25, 35] and not full[0, 0]
    # 1-bit mask and RGBA mask
    assert loaded.full_masks[by_key["benign/benign (1).png"]].sum() == 200
    assert loaded.full_masks[by_key["benign/benign (10).png"]].sum() == 36
    # normal: empty targets, both channels
    assert loaded.targets[by_key["normal/normal (1).png"]].sum() == 0
    # target channel per lesion class
    t = loaded.targets[by_key["malignant/malignant (1).png"]]
    assert t[0].sum() == 0 and t[1].sum() > 0
    assert loaded.images.shape == (7, 1, 32, 32) and loaded.images.dtype == np.uint8
    assert set(np.unique(loaded.targets)) <= {0, 1}


def test_rgb_with_equal_channels_keeps_its_values(tmp_path):
    g = _picture(7)
    _save(tmp_path / "a.png", np.stack([g, g, g], -1))
    assert np.array_equal(dataset.load_image(tmp_path / "a.png"), g)


def test_duplicates_by_content_are_reported_and_never_split(quirky_tree, tmp_path):
    # a same-label copy under another name, re-encoded as RGB: identical pixels, different bytes
    g = _picture(10)
    _save(quirky_tree / "benign" / "benign (11).png", np.stack([g, g, g], -1))
    _save(quirky_tree / "benign" / "benign (11)_mask.png", _box())
    samples = dataset.discover_busi(quirky_tree)
    loaded = dataset.load_set(samples, size=32)
    keep, report = dataset.resolve_duplicates(loaded.samples, loaded.hashes)
    kept = {loaded.samples[i].key for i in keep}
    assert report["same_label"] == [{"kept": "benign/benign (10).png", "dropped": ["benign/benign (11).png"]}]
    assert report["conflicting_labels"][0]["dropped"] == ["benign/benign (1).png", "malignant/malignant (2).png"]
    assert "benign/benign (1).png" not in kept and "malignant/malignant (2).png" not in kept
    split = dataset.load_or_make_split(tmp_path / "split.json", [loaded.samples[i] for i in keep],
                                       val_fraction=0.5, report=report)
    assert set(split["train"]).isdisjoint(split["val"])
    assert set(split["train"]) | set(split["val"]) == kept
    assert json.loads((tmp_path / "split.json").read_text())["duplicates"] == report


def test_bad_files_give_errors_naming_the_file(quirky_tree):
    bad = quirky_tree / "benign" / "benign (1)_mask.png"
    _save(bad, _box(h=41))
    with pytest.raises(DataError, match=r"benign \(1\)_mask\.png: mask is 50x41 but its image is 50x40"):
        dataset.load_set(dataset.discover_busi(quirky_tree))
    bad.unlink()
    with pytest.raises(DataError, match=r"benign \(1\)\.png: image with no mask"):
        dataset.discover_busi(quirky_tree)
    (quirky_tree / "benign" / "benign (1).png").write_bytes(b"not a png at all")
    _save(bad, _box())
    with pytest.raises(DataError, match=r"benign \(1\)\.png: not an image file"):
        dataset.load_set(dataset.discover_busi(quirky_tree))


def test_mask_values_other_than_binary_are_refused(tmp_path):
    m = _box()
    m[0, 0] = 128
    _save(tmp_path / "m.png", m)
    with pytest.raises(DataError, match="m.png: mask must hold only 0/255 or 0/1, found values 0, 128, 255"):
        dataset.load_mask(tmp_path / "m.png")


def test_two_folder_layout_of_the_original(tmp_path):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    _save(imgs / "benign (1).png", _picture(1))
    _save(masks / "benign (1).png", _box())                     # same file name
    _save(imgs / "malignant (3).png", _picture(2))
    _save(masks / "malignant (3)_mask.png", _box())             # BUSI-style name
    _save(masks / "malignant (3)_mask_1.png", _box(y=(30, 35)))
    _save(imgs / "scan.png", _picture(3))
    _save(masks / "scan.png", np.zeros((40, 50), np.uint8))
    with pytest.raises(DataError, match="scan.png: cannot tell the class"):
        dataset.discover_folders(imgs, masks)
    samples = dataset.discover(path_to_images=str(imgs), path_to_masks=str(masks), default_label="normal")
    assert [(s.key, s.label, len(s.masks)) for s in samples] == [
        ("benign (1).png", "benign", 1), ("malignant (3).png", "malignant", 2), ("scan.png", "normal", 1)]
    _save(masks / "orphan.png", _box())
    with pytest.raises(DataError, match="orphan.png: mask with no image"):
        dataset.discover_folders(imgs, masks, "normal")


def test_manifest(tmp_path):
    _save(tmp_path / "a b/é 1.png", _picture(1))
    _save(tmp_path / "a b/é 1 m.png", _box())
    _save(tmp_path / "n.png", _picture(2))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,mask,label\na b/é 1.png,a b/é 1 m.png,Malignant\nn.png,,normal\n", encoding="utf-8")
    samples = dataset.discover(manifest=str(csv_path))
    assert [(s.key, s.label, len(s.masks)) for s in samples] == [("a b/é 1.png", "malignant", 1), ("n.png", "normal", 0)]
    loaded = dataset.load_set(samples, size=16)
    assert loaded.targets[0, 1].sum() > 0 and loaded.targets[1].sum() == 0
    csv_path.write_text("image,mask,label\nmissing.png,,normal\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list.csv line 2: image .*missing.png not found"):
        dataset.discover_manifest(csv_path)
    csv_path.write_text("image,mask,label\nn.png,,cyst\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown label 'cyst'"):
        dataset.discover_manifest(csv_path)


def test_preprocessing_is_the_documented_recipe():
    grey = np.array([[0, 255], [128, 64]], np.uint8)
    x = dataset.preprocess(grey, size=4)
    assert x.shape == (1, 4, 4) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert dataset.normalize(np.float32(0)) == -1 and dataset.normalize(np.float32(255)) == 1
    assert dataset.preprocessing_meta()["image_size"] == 256 == dataset.IMAGE_SIZE
    mask = np.zeros((100, 80), bool)
    mask[20:60, 10:50] = True
    small = dataset.resize_mask(mask, 16)
    assert small.dtype == bool and 0.8 < small.sum() / (16 * 16 * 0.2) < 1.2


def test_split_is_stratified_seeded_and_reused(tmp_path):
    samples = [dataset.Sample(tmp_path / f"{c}{i}.png", (), c, f"{c}/{i}") for c in dataset.CLASS_NAMES
               for i in range(20 if c != "normal" else 10)]
    a = dataset.make_split(samples, 0.2, seed=1)
    assert a == dataset.make_split(samples, 0.2, seed=1)
    assert a != dataset.make_split(samples, 0.2, seed=2)
    assert len(a["val"]) == 4 + 4 + 2 and sum(k.startswith("normal") for k in a["val"]) == 2
    path = tmp_path / "split.json"
    first = dataset.load_or_make_split(path, samples, 0.2, seed=1)
    again = dataset.load_or_make_split(path, samples, 0.5, seed=99)   # the stored split wins
    assert first == again == json.loads(path.read_text())
    with pytest.raises(DataError, match="split names 1 image"):
        dataset.load_or_make_split(path, samples[1:], 0.2, seed=1)


def test_kfold_split_covers_everything_once(tmp_path):
    samples = [dataset.Sample(tmp_path / f"{i}.png", (), c, f"{c}/{i}") for c in dataset.CLASS_NAMES for i in range(7)]
    split = dataset.make_split(samples, seed=3, folds=5)
    all_val = [k for i in range(5) for k in dataset.select_fold(split, i)[1]]
    assert sorted(all_val) == sorted(s.key for s in samples)
    for i in range(5):
        train, val = dataset.select_fold(split, i)
        assert set(train).isdisjoint(val) and len(train) + len(val) == 21


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        dataset.discover_busi(tmp_path / "nope")
    with pytest.raises(DataError, match="the folder is empty"):
        dataset.discover_busi(tmp_path)
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        dataset.discover_busi(tmp_path)
    (tmp_path / "benign").mkdir()
    with pytest.raises(DataError, match="missing class folder"):
        dataset.discover_busi(tmp_path)


def test_val_always_moves_named_images_and_their_group_to_validation(tmp_path):
    samples = [dataset.Sample(tmp_path / f"{c}{i}.png", (), c, f"{c}/{c} ({i}).png") for c in dataset.CLASS_NAMES
               for i in range(20)]
    plain = dataset.make_split(samples, 0.2, seed=1)
    named = sorted(k for k in plain["train"] if k.startswith("benign"))[:2]
    buddy = sorted(k for k in plain["train"] if k.startswith("malignant"))[0]
    groups = {named[0]: "g", buddy: "g"}  # a near-duplicate group spanning the named image and another
    split = dataset.load_or_make_split(tmp_path / "s.json", samples, 0.2, seed=1, groups=groups,
                                       val_always=frozenset(Path(k).name for k in named))
    assert set(named + [buddy]) <= set(split["val"]) and set(split["train"]).isdisjoint(named + [buddy])
    assert sorted(split["train"] + split["val"]) == sorted(s.key for s in samples)
    assert split["val_always"] == sorted(Path(k).name for k in named)
    with pytest.raises(DataError, match="val_always: no file matches"):
        import train
        train.val_always_names(str(tmp_path / "nothing*.png"))
