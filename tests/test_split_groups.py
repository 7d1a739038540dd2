"""Near-duplicate groups and grouped splits (dataset.py): the same scan saved twice never straddles a split."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import dataset
from conftest import BUSI, needs_busi
from phantom import make_phantom


def _variants(grey: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The ways one scan reappears in a public data set: noise, a shift, a small crop, gain, caliper marks."""
    rng = np.random.default_rng(seed)
    h, w = grey.shape
    noisy = np.clip(grey + rng.normal(0, 6, grey.shape), 0, 255).astype(np.uint8)
    shifted = np.roll(grey, (3, -4), axis=(0, 1))
    cropped = np.asarray(Image.fromarray(grey[6:h - 4, 5:w - 7]).resize((w, h), Image.BILINEAR))
    gain = np.clip(grey.astype(float) * 1.25 + 8, 0, 255).astype(np.uint8)
    marked = Image.fromarray(grey.copy())
    draw = ImageDraw.Draw(marked)
    for cx, cy in ((w // 3, h // 2), (2 * w // 3, h // 2)):  # two '+' calipers and a dotted line
        draw.line([cx - 5, cy, cx + 5, cy], fill=255, width=2)
        draw.line([cx, cy - 5, cx, cy + 5], fill=255, width=2)
    for x in range(w // 3, 2 * w // 3, 6):
        draw.point((x, h // 2 + 12), fill=255)
    return {"noisy": noisy, "shifted": shifted, "cropped": cropped, "gain": gain, "marked": np.asarray(marked)}


@pytest.fixture(scope="module")
def scans():
    """Three different phantom scans (one per class) and five near-copies of each."""
    out = []
    for k, label in enumerate(dataset.CLASS_NAMES):
        grey, _ = make_phantom(label, 192, 240, seed=100 + k)
        out.append((label, grey, _variants(grey, k)))
    return out


def test_near_copies_are_one_group_and_different_scans_are_not(scans):
    samples, phashes, owner = [], [], []
    for k, (label, grey, variants) in enumerate(scans):
        for name, img in [("original", grey), *variants.items()]:
            samples.append(dataset.Sample(dataset.Path(f"{label}_{name}.png"), (), label, f"{label}/{name}"))
            phashes.append(dataset.image_hashes(img))
            owner.append(k)
    keep, report = dataset.resolve_near_duplicates(samples, phashes)
    assert keep == list(range(len(samples)))                    # no conflicting labels: nothing dropped
    groups = {tuple(g) for g in report["groups"]}
    for k, (label, _, variants) in enumerate(scans):
        assert tuple(sorted(f"{label}/{n}" for n in ["original", *variants])) in groups
    assert len(groups) == len(scans)                             # different phantoms are never merged


def test_conflicting_labels_in_a_group_are_dropped_and_reported(scans):
    label, grey, variants = scans[1]
    samples = [dataset.Sample(dataset.Path("a.png"), (), "benign", "benign/a"),
               dataset.Sample(dataset.Path("b.png"), (), "malignant", "malignant/b"),
               dataset.Sample(dataset.Path("c.png"), (), "normal", "normal/c")]
    phashes = [dataset.image_hashes(grey), dataset.image_hashes(variants["gain"]),
               dataset.image_hashes(scans[0][1])]
    keep, report = dataset.resolve_near_duplicates(samples, phashes)
    assert keep == [2]
    assert report["conflicting_labels"] == [{"dropped": ["benign/a", "malignant/b"], "labels": ["benign", "malignant"]}]


def _samples(n_groups=30, per_group=3, patient=False):
    out = []
    for g in range(n_groups):
        label = dataset.CLASS_NAMES[g % 3]
        for j in range(per_group):
            out.append(dataset.Sample(dataset.Path(f"{g}_{j}.png"), (), label if not patient else
                                      dataset.CLASS_NAMES[(g + j) % 3], f"g{g}/{j}", f"P{g}" if patient else ""))
    return out


def _side(split, key):
    return [i for i, f in enumerate(split["folds"]) if key in f] if "folds" in split else \
        ["val" if key in split["val"] else "train"]


@pytest.mark.parametrize("folds", [0, 4])
def test_groups_never_straddle_a_split_or_a_fold(folds):
    samples = _samples()
    groups = {s.key: s.key.split("/")[0] for s in samples}
    split = dataset.make_split(samples, 0.2, seed=5, folds=folds, groups=groups)
    for g in {v for v in groups.values()}:
        sides = {tuple(_side(split, k)) for k, v in groups.items() if v == g}
        assert len(sides) == 1, (g, sides)
    listed = set().union(*split["folds"]) if folds else set(split["train"]) | set(split["val"])
    assert listed == {s.key for s in samples}
    if not folds:  # stratified: each class close to its share
        for c in dataset.CLASS_NAMES:
            n_val = sum(1 for k in split["val"] if next(s for s in samples if s.key == k).label == c)
            assert abs(n_val - 0.2 * 30) <= 3
    assert split == dataset.make_split(samples, 0.2, seed=5, folds=folds, groups=groups)  # deterministic


def test_patients_are_groups_even_with_mixed_labels():
    samples = _samples(patient=True)
    groups = dataset.split_groups(samples)
    split = dataset.make_split(samples, 0.25, seed=1, groups=groups)
    for p in {s.patient for s in samples}:
        sides = {_side(split, s.key)[0] for s in samples if s.patient == p}
        assert len(sides) == 1
    # near-duplicate groups and patients chain: a copy of P0's image filed under P1 joins both patients
    chained = dataset.split_groups(samples, [["g0/0", "g1/0"]])
    assert chained["g0/2"] == chained["g1/2"]


def test_manifest_patient_and_extra_columns(tmp_path):
    img = np.zeros((20, 20), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "m.png")
    (tmp_path / "list.csv").write_text("image,mask,label,patient,doppler\na.png,m.png,benign,P7,yes\n"
                                       "a.png,,normal,P8,no\n")
    s = dataset.discover_manifest(tmp_path / "list.csv")
    assert (s[0].patient, dict(s[0].attrs)) == ("P7", {"doppler": "yes"})
    assert (s[1].patient, dict(s[1].attrs)) == ("P8", {"doppler": "no"})


def test_multi_source_keys_and_split_per_source(tmp_path, phantom_tree):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(phantom_tree, other)
    samples = dataset.discover_all(f"a={phantom_tree};b={other}")
    assert {s.source for s in samples} == {"a", "b"}
    assert all(s.key.startswith(s.source + "/") for s in samples)
    split = dataset.load_or_make_split(tmp_path / "split.json", samples, 0.2, seed=3)
    assert set(split["sources"]) == {"a", "b"}
    for name in "ab":  # each source split on its own, stratified by class
        val = [k for k in split["val"] if k.startswith(name + "/")]
        assert {k.split("/")[1] for k in val} == set(dataset.CLASS_NAMES)
    with pytest.raises(dataset.DataError, match="source 'x'"):
        dataset.discover_all(f"x={tmp_path / 'nowhere'}")
    with pytest.raises(dataset.DataError, match="not name=path"):
        dataset.discover_all(str(phantom_tree))
    with pytest.raises(dataset.DataError, match="twice"):
        dataset.discover_all(f"a={phantom_tree};a={other}")


# The pairs the issue lists (the same scan, filed twice in BUSI).
KNOWN_PAIRS = [("benign/benign (13).png", "benign/benign (330).png"),
               ("benign/benign (136).png", "benign/benign (50).png"),
               ("benign/benign (14).png", "benign/benign (331).png")]
SHIPPED_SPLIT = dataset.Path(__file__).resolve().parents[1] / "checkpoints" / "busi_split_grouped.json"


@needs_busi
def test_busi_near_duplicates_grouped_and_the_shipped_split_does_not_leak():
    samples = dataset.discover_busi(BUSI)
    phashes = [dataset.image_hashes(dataset.load_image(s.image)) for s in samples]
    keep, report = dataset.resolve_near_duplicates(samples, phashes)
    group_of = {k: i for i, g in enumerate(report["groups"]) for k in g}
    for a, b in KNOWN_PAIRS:
        assert a in group_of and group_of[a] == group_of.get(b), (a, b)
    split = json.loads(SHIPPED_SPLIT.read_text())
    side = {k: "train" for k in split["train"]} | {k: "val" for k in split["val"]}
    index = {s.key: i for i, s in enumerate(samples)}
    for i, j in dataset.near_duplicate_pairs(phashes):
        a, b = samples[i].key, samples[j].key
        if a in side and b in side:
            assert side[a] == side[b], (a, b)
    for a, b in KNOWN_PAIRS:
        assert side[a] == side[b]
    assert len(split["val"]) >= 140 and index  # about 20% of the images


def test_frames_of_one_patient_with_two_labels_are_kept(scans):
    label, grey, variants = scans[1]
    samples = [dataset.Sample(dataset.Path("a.png"), (), "benign", "a", "P1"),
               dataset.Sample(dataset.Path("b.png"), (), "normal", "b", "P1"),
               dataset.Sample(dataset.Path("c.png"), (), "normal", "c", "P2")]
    phashes = [dataset.image_hashes(grey), dataset.image_hashes(variants["noisy"]), dataset.image_hashes(variants["gain"])]
    keep, report = dataset.resolve_near_duplicates(samples, phashes)  # P2's copy joins them: a conflict
    assert keep == [] and report["conflicting_labels"][0]["labels"] == ["benign", "normal", "normal"]
    keep, _ = dataset.resolve_near_duplicates(samples[:2], phashes[:2])  # same patient only: no conflict
    assert keep == [0, 1]


def test_groups_are_spread_over_the_parts_like_single_images():
    samples = _samples(n_groups=40, per_group=2) + [
        dataset.Sample(dataset.Path(f"s{i}.png"), (), dataset.CLASS_NAMES[i % 3], f"single/{i}") for i in range(90)]
    groups = {s.key: s.key.split("/")[0] if s.key.startswith("g") else s.key for s in samples}
    split = dataset.make_split(samples, 0.2, seed=2, groups=groups)
    grouped_in_val = sum(k.startswith("g") for k in split["val"])
    assert 0.1 * 80 <= grouped_in_val <= 0.3 * 80  # about 20% of the grouped images, not none
