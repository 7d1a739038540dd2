"""Issue 6: bad input, crashes and untrusted files. Keep working, lose nothing, load nothing unsafe.

Every bad input gives the project's own error (dataset.DataError, model.CheckpointError, train.TrainingError)
with a message that names the file and the problem, never a traceback from inside a library.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

import dataset
import model as model_mod
from dataset import DataError
from model import CheckpointError
from phantom import make_phantom, write_busi_tree


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained 64-pixel checkpoint (plumbing only; faster than training one)."""
    import train
    torch.manual_seed(0)
    net = model_mod.build_model("resnet18", None, len(dataset.LESION_CLASSES), 1)
    cfg = train.default_settings(image_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "untrained.safetensors"
    model_mod.save_checkpoint(path, net, train.checkpoint_meta(cfg, Path("split.json"), 0, {}))
    return path


def _png(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def _grey(h: int = 40, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _raises_naming(fn, path, *words):
    """fn() raises DataError whose message names `path` and contains every word (case-insensitive)."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


# =========================================================================================================
# Bad image files
# =========================================================================================================

def test_truncated_png(tmp_path):
    good = _png(tmp_path / "good.png", _grey(120, 160))
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _raises_naming(lambda: dataset.load_image(bad), bad, "truncated")


def test_zero_byte_file(tmp_path):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    _raises_naming(lambda: dataset.load_image(bad), bad, "empty")
    _raises_naming(lambda: dataset.load_mask(bad), bad, "empty")


def test_text_file_named_png(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n" * 20)
    _raises_naming(lambda: dataset.load_image(bad), bad, "not an image")


def test_missing_file_and_folder(tmp_path):
    _raises_naming(lambda: dataset.load_image(tmp_path / "nope.png"), tmp_path / "nope.png", "not found")
    (tmp_path / "dir.png").mkdir()
    _raises_naming(lambda: dataset.load_image(tmp_path / "dir.png"), tmp_path / "dir.png", "folder")


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    a = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    g = dataset.load_image(p)
    assert g.dtype == np.uint8 and g.shape == (30, 40)
    np.testing.assert_array_equal(g, np.round(a / 65535.0 * 255.0).astype(np.uint8))


def test_rgba_keeps_pixel_values_and_drops_alpha(tmp_path):
    g = _grey()
    rgba = np.stack([g, g, g, np.full_like(g, 7)], axis=-1)  # nearly transparent: values must stay as stored
    p = _png(tmp_path / "rgba.png", rgba)
    assert Image.open(p).mode == "RGBA"
    np.testing.assert_array_equal(dataset.load_image(p), g)


def test_palette_image(tmp_path):
    g = _grey()
    p = tmp_path / "pal.png"
    Image.fromarray(np.stack([g] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(p)
    im = Image.open(p)
    assert im.mode == "P"
    np.testing.assert_array_equal(dataset.load_image(p), np.asarray(im.convert("L")))
    # with a transparent palette entry too
    p2 = tmp_path / "pal_t.png"
    im.save(p2, transparency=0)
    out = dataset.load_image(p2)
    assert out.shape == g.shape and out.dtype == np.uint8


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (48, 32), (10, 20, 30, 40)).save(p, quality=95)
    im = Image.open(p)
    assert im.mode == "CMYK"
    g = dataset.load_image(p)
    assert g.shape == (32, 48) and g.dtype == np.uint8
    np.testing.assert_array_equal(g, np.asarray(im.convert("RGB").convert("L")))


@pytest.mark.parametrize("kind", ["L", "RGB", "I;16", "F"])
def test_tiff(tmp_path, kind):
    g = _grey(33, 44)
    p = tmp_path / f"scan {kind.replace(';', '')}.tif"
    if kind == "L":
        Image.fromarray(g).save(p); want = g
    elif kind == "RGB":
        Image.fromarray(np.stack([g] * 3, -1)).save(p); want = g
    elif kind == "I;16":
        Image.fromarray(g.astype(np.uint16) * 257).save(p); want = g  # 257 * v / 65535 * 255 = v
    else:
        Image.fromarray(g.astype(np.float32) / 255.0).save(p); want = g
    out = dataset.load_image(p)
    np.testing.assert_array_equal(out, want)


def test_lab_tiff_uses_lightness(tmp_path):
    p = tmp_path / "lab.tif"
    Image.new("LAB", (20, 10), (90, 128, 128)).save(p)
    g = dataset.load_image(p)
    assert g.shape == (10, 20) and int(g[0, 0]) == 90


def test_pixel_limit_is_deliberate_and_refused_before_decoding(tmp_path, monkeypatch):
    """Decompression bombs: dataset.MAX_IMAGE_PIXELS is set on purpose (50 megapixels by default) and also
    passed to PIL's own guard; an image over it is refused from its header, before its pixels are decoded."""
    assert dataset.MAX_IMAGE_PIXELS == 50_000_000
    p = _png(tmp_path / "big.png", _grey(100, 120))  # 12000 pixels
    monkeypatch.setattr(dataset, "MAX_IMAGE_PIXELS", 10_000)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(1))
    msg = _raises_naming(lambda: dataset.load_image(p), p, "too large", "10000")
    assert "MAX_IMAGE_PIXELS" in msg
    assert not decoded, "the pixels of an over-limit image were decoded"
    monkeypatch.undo()
    assert dataset.load_image(p).shape == (100, 120)  # the same file is fine under the real limit


def test_pil_guard_uses_the_same_limit(tmp_path, monkeypatch):
    p = _png(tmp_path / "big2.png", _grey(100, 120))
    monkeypatch.setattr(dataset, "MAX_IMAGE_PIXELS", 5_000)  # < half the pixels: PIL itself raises
    _raises_naming(lambda: dataset.load_image(p), p, "too large")
    assert Image.MAX_IMAGE_PIXELS == 5_000
    monkeypatch.undo()
    dataset.load_image(p)
    assert Image.MAX_IMAGE_PIXELS == dataset.MAX_IMAGE_PIXELS == 50_000_000


# =========================================================================================================
# Masks
# =========================================================================================================

def test_mask_size_differs_from_image(tmp_path):
    m = _png(tmp_path / "x_mask.png", np.zeros((30, 40), np.uint8))
    msg = _raises_naming(lambda: dataset.load_mask(m, (31, 40)), m, "40x30", "40x31")
    assert "image" in msg


@pytest.mark.parametrize("values", [(0, 128), (0, 1, 255), (0, 2), (3,)])
def test_mask_values_other_than_binary(tmp_path, values):
    a = np.zeros((20, 20), np.uint8)
    for i, v in enumerate(values):
        a[i::len(values)] = v
    m = _png(tmp_path / "bad_mask.png", a)
    _raises_naming(lambda: dataset.load_mask(m), m, "0/255", "found values")


@pytest.mark.parametrize("top,dtype", [(255, np.uint8), (1, np.uint8), (1, np.uint16), (255, np.uint16),
                                       (65535, np.uint16)])
def test_binary_masks_in_any_depth(tmp_path, top, dtype):
    a = np.zeros((20, 30), dtype)
    a[5:12, 3:20] = top
    m = tmp_path / "m.png"
    Image.fromarray(a).save(m)
    np.testing.assert_array_equal(dataset.load_mask(m), a == top)


def test_16bit_mask_with_other_values_is_refused(tmp_path):
    a = np.zeros((20, 30), np.uint16)
    a[5:12, 3:20] = 300  # would scale to 1 and pass as a 0/1 mask if judged after scaling
    m = tmp_path / "m16.png"
    Image.fromarray(a).save(m)
    _raises_naming(lambda: dataset.load_mask(m), m, "300")


def _busi(root: Path, per_class: int = 2, size=(32, 40)) -> Path:
    return write_busi_tree(root, per_class=per_class, height=size[0], width=size[1], seed=3)


def test_mask_with_no_image(tmp_path):
    root = _busi(tmp_path / "d")
    orphan = _png(root / "benign" / "benign (9)_mask.png", np.zeros((32, 40), np.uint8))
    _raises_naming(lambda: dataset.discover_busi(root), orphan, "mask with no image")


def test_image_with_no_mask(tmp_path):
    root = _busi(tmp_path / "d")
    (root / "malignant" / "malignant (2)_mask.png").unlink()
    _raises_naming(lambda: dataset.discover_busi(root), root / "malignant" / "malignant (2).png", "no mask")


def test_two_folder_layout_orphans(tmp_path):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    _png(imgs / "benign (1).png", _grey(20, 20)); _png(masks / "benign (1)_mask.png", np.zeros((20, 20), np.uint8))
    _png(masks / "benign (7)_mask.png", np.zeros((20, 20), np.uint8))
    _raises_naming(lambda: dataset.discover_folders(imgs, masks), masks / "benign (7)_mask.png", "no image")
    (masks / "benign (7)_mask.png").unlink()
    _png(imgs / "benign (2).png", _grey(20, 20))
    _raises_naming(lambda: dataset.discover_folders(imgs, masks), imgs / "benign (2).png", "no mask")


def test_bad_mask_in_training_data_names_the_file(tmp_path):
    root = _busi(tmp_path / "d")
    bad = root / "benign" / "benign (1)_mask.png"
    _png(bad, np.full((32, 40), 77, np.uint8))
    samples = dataset.discover_busi(root)
    _raises_naming(lambda: dataset.load_set(samples, 32), bad, "77")


# =========================================================================================================
# Folders, manifests, file names
# =========================================================================================================

def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises_naming(lambda: dataset.discover_busi(tmp_path / "empty"), tmp_path / "empty", "empty")
    _raises_naming(lambda: dataset.discover_busi(tmp_path / "nope"), tmp_path / "nope", "not found")


def test_folder_without_class_subfolders(tmp_path):
    _png(tmp_path / "d" / "a.png", _grey())
    _raises_naming(lambda: dataset.discover_busi(tmp_path / "d"), tmp_path / "d", "no class folders", "manifest")


def test_missing_class_folder(tmp_path):
    root = _busi(tmp_path / "d")
    shutil.rmtree(root / "normal")
    _raises_naming(lambda: dataset.discover_busi(root), root, "missing class folder", "normal")


def test_class_folder_without_images(tmp_path):
    root = _busi(tmp_path / "d")
    for p in (root / "benign").iterdir():
        p.unlink()
    _raises_naming(lambda: dataset.discover_busi(root), root / "benign", "no images")


def test_manifest_naming_missing_files(tmp_path):
    root = _busi(tmp_path / "d", per_class=1)
    man = tmp_path / "d" / "list.csv"
    man.write_text("image,mask,label\nbenign/benign (1).png,benign/benign (1)_mask.png,benign\n"
                   "benign/gone.png,benign/gone_mask.png,benign\n", encoding="utf-8")
    _raises_naming(lambda: dataset.discover_manifest(man), man, "line 3", "gone.png", "not found")
    man.write_text("image,mask,label\nbenign/benign (1).png,benign/no_mask.png,benign\n", encoding="utf-8")
    _raises_naming(lambda: dataset.discover_manifest(man), man, "no_mask.png", "not found")
    man.write_text("image,mask,label\nbenign/benign (1).png,benign/benign (1)_mask.png,cyst\n", encoding="utf-8")
    _raises_naming(lambda: dataset.discover_manifest(man), man, "unknown label")
    man.write_text("file;label\nx;y\n", encoding="utf-8")
    _raises_naming(lambda: dataset.discover_manifest(man), man, "image,mask,label")
    man.write_bytes(b"\xff\xfe\x00bad")
    _raises_naming(lambda: dataset.discover_manifest(man), man)
    _raises_naming(lambda: dataset.discover_manifest(tmp_path / "none.csv"), tmp_path / "none.csv", "not found")


def test_paths_with_spaces_and_non_ascii(tmp_path):
    root = tmp_path / "données échographie" / "BUSI ü 乳腺"
    _busi(root, per_class=2)
    for label in dataset.CLASS_NAMES:  # also non-ASCII file names
        (root / label / f"{label} (1).png").rename(root / label / f"{label} é (1).png")
        (root / label / f"{label} (1)_mask.png").rename(root / label / f"{label} é (1)_mask.png")
    samples = dataset.discover_busi(root)
    assert len(samples) == 6 and any("é" in s.key for s in samples)
    loaded = dataset.load_set(samples, 32)
    assert loaded.images.shape == (6, 1, 32, 32)
    man = root / "liste é.csv"
    with open(man, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "label"])
        for s in samples:
            w.writerow([s.key, ";".join(m.relative_to(root).as_posix() for m in s.masks), s.label])
    assert [s.image for s in dataset.discover_manifest(man)] == [s.image for s in samples]


# =========================================================================================================
# predict.py over a folder with one bad file
# =========================================================================================================

def test_predict_folder_with_one_bad_file(tmp_path, ckpt, caplog):
    import predict
    src = tmp_path / "scans ü"
    names = ["a scan.png", "b é.png", "c.jpg"]
    for i, n in enumerate(names):
        img, _ = make_phantom("benign", 70, 90, seed=i)
        _png(src / n, img)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing
    _png(src / "a scan_mask.png", np.zeros((70, 90), np.uint8))           # masks in the folder are skipped
    out = tmp_path / "out"
    code = predict.main([str(src), "--checkpoint", str(ckpt), "--out_dir", str(out), "--device", "cpu"])
    assert code != 0
    for n in names:
        stem = Path(n).stem
        assert Image.open(out / f"{stem}_mask.png").size == (90, 70)
        assert (out / f"{stem}_overlay.png").is_file()
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == set(names) | {"broken.png"}
    assert all(rows[n]["error"] == "" and rows[n]["label"] in dataset.CLASS_NAMES for n in names)
    assert "broken.png" in rows["broken.png"]["error"]
    assert any("broken.png" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    # a missing file given by name is reported the same way
    code = predict.main([str(src / "b é.png") + ";" + str(tmp_path / "missing.png"), "--checkpoint",
                         str(ckpt), "--out_dir", str(tmp_path / "out2"), "--device", "cpu"])
    assert code != 0 and (tmp_path / "out2" / "b é_mask.png").is_file()
    # all good: exit code 0
    assert predict.main([str(src / "c.jpg"), "--checkpoint", str(ckpt), "--out_dir",
                         str(tmp_path / "out3"), "--device", "cpu"]) == 0


def test_predict_with_a_bad_checkpoint_is_a_clear_error(tmp_path, caplog):
    import predict
    img = _png(tmp_path / "x.png", _grey())
    ck = tmp_path / "model.safetensors"
    ck.write_text("not weights")
    code = predict.main([str(img), "--checkpoint", str(ck), "--out_dir", str(tmp_path / "o"), "--device", "cpu"])
    assert code not in (0, None)
    assert any(str(ck) in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


# =========================================================================================================
# Untrusted checkpoint and resume files
# =========================================================================================================

def _resave(src: Path, dst: Path, tensors=None, meta_update=None, header=None):
    """Rewrite a checkpoint with changed tensors or metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(src), framework="pt") as f:
        h = dict(f.metadata())
    meta = json.loads(h["meta"])
    meta.update(meta_update or {})
    h["meta"] = json.dumps(meta)
    if header is not None:
        h = header
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=h)
    return dst


def test_checkpoint_loads_without_pickle(ckpt, forbid_pickle):
    net, meta = model_mod.load_checkpoint(ckpt)
    assert meta["encoder"] == "resnet18" and not net.training


def _check_error(path, *words):
    with pytest.raises(CheckpointError) as e:
        model_mod.load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_checkpoint_wrong_format(tmp_path, ckpt):
    p = tmp_path / "text.safetensors"
    p.write_text("hello")
    _check_error(p, "not a safetensors")
    p = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(2)}, p)  # a torch pickle named .safetensors
    _check_error(p, "not a safetensors")
    p = tmp_path / "half.safetensors"
    p.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _check_error(p)
    p = tmp_path / "zero.safetensors"
    p.write_bytes(b"")
    _check_error(p)
    _check_error(tmp_path / "missing.safetensors", "not found")


def test_checkpoint_without_this_tools_metadata(tmp_path, ckpt):
    from safetensors.torch import load_file, save_file
    p = tmp_path / "plain.safetensors"
    save_file(load_file(str(ckpt)), str(p))
    _check_error(p, "metadata")
    p2 = _resave(ckpt, tmp_path / "badjson.safetensors", header={"format": model_mod.CHECKPOINT_FORMAT,
                                                                           "meta": "{not json"})
    _check_error(p2, "JSON")
    p3 = _resave(ckpt, tmp_path / "lacks.safetensors",
                 header={"format": model_mod.CHECKPOINT_FORMAT, "meta": json.dumps({"encoder": "resnet18"})})
    _check_error(p3, "lacks")


def test_checkpoint_unknown_encoder(tmp_path, ckpt):
    p = _resave(ckpt, tmp_path / "enc.safetensors", meta_update={"encoder": "resnet9000"})
    _check_error(p, "unknown encoder", "resnet9000")


def test_checkpoint_metadata_does_not_match_weights(tmp_path, ckpt):
    p = _resave(ckpt, tmp_path / "classes.safetensors", meta_update={"classes": 3})
    _check_error(p, "do not match")
    p = _resave(ckpt, tmp_path / "enc34.safetensors", meta_update={"encoder": "resnet34"})
    _check_error(p, "do not match")
    p = _resave(ckpt, tmp_path / "chan.safetensors", meta_update={"in_channels": 3})
    _check_error(p, "do not match")


@pytest.mark.parametrize("key,value", [("classes", "two"), ("in_channels", None), ("image_size", "big"),
                                       ("image_size", -5), ("norm_std", 0), ("norm_mean", "x"), ("encoder", 7)])
def test_checkpoint_metadata_of_the_wrong_type(tmp_path, ckpt, key, value):
    p = _resave(ckpt, tmp_path / "t.safetensors", meta_update={key: value})
    _check_error(p, key)


def test_checkpoint_wrong_shapes(tmp_path, ckpt):
    from safetensors.torch import load_file
    t = load_file(str(ckpt))
    k = next(k for k in t if k.endswith("weight") and t[k].ndim == 4)
    t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])
    p = _resave(ckpt, tmp_path / "shape.safetensors", tensors=t)
    _check_error(p, "wrong shape", k)
    t = load_file(str(ckpt))
    t.pop(k)
    t["extra.weight"] = torch.zeros(3)
    p = _resave(ckpt, tmp_path / "keys.safetensors", tensors=t)
    _check_error(p, "missing", "unexpected")


def test_resume_state_refuses_pickled_code(tmp_path):
    """resume.pt is read with weights_only=True: a pickle that would run code is refused, and the code never runs."""
    import pickle
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "resume.pt"
    p.write_bytes(pickle.dumps({"optimizer": Evil()}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        model_mod.load_resume_state(p)
    assert str(p) in str(e.value)
    assert not marker.exists()
    p.write_text("garbage")
    with pytest.raises(CheckpointError):
        model_mod.load_resume_state(p)


def test_encoder_weights_file_refuses_pickled_code(tmp_path):
    import pickle
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "enc.pt"
    p.write_bytes(pickle.dumps({"conv1.weight": Evil()}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        model_mod.read_state_dict(p)
    assert str(p) in str(e.value) and not marker.exists()
    torch.save({"conv1.weight": torch.zeros(64, 1, 7, 7), "note": "text"}, p)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        model_mod.read_state_dict(p)


def _py_files() -> list[Path]:
    skip = {".venv", "runs", ".git", "node_modules", "__pycache__", "shared", "loss_graph", "data"}
    return [p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts[:-1]) & skip)]


def unsafe_calls(source: str) -> list[str]:
    """torch.load without weights_only=True, pickle/dill/marshal loads, numpy loads with allow_pickle=True,
    eval/exec of anything: the ways a file's content could run code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        where = f"line {node.lineno}"
        if isinstance(f, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append(f"{where}: {name}()")
        elif name in ("load", "loads", "Unpickler") and owner in ("pickle", "cPickle", "dill", "marshal",
                                                                  "joblib", "cloudpickle", "_pickle"):
            found.append(f"{where}: {owner}.{name}()")
        elif name == "load" and owner == "torch":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif name in ("load",) and owner in ("np", "numpy"):
            ap = kw.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(f"{where}: numpy.load with allow_pickle")
        elif name in ("load", "unsafe_load", "full_load") and owner == "yaml" and name != "safe_load":
            if name != "load" or "Loader" not in kw or "Safe" not in ast.unparse(kw["Loader"]):
                found.append(f"{where}: yaml.{name}")
    return found


def test_the_checker_catches_unsafe_calls():
    bad = ("import torch, pickle\nx = torch.load('a')\ny = torch.load('a', weights_only=False)\n"
           "z = pickle.load(open('f','rb'))\nw = eval(open('f').read())\nimport numpy as np\n"
           "v = np.load('f', allow_pickle=True)\n")
    assert len(unsafe_calls(bad)) == 5
    good = "import torch\nm.eval()\nx = torch.load('a', map_location='cpu', weights_only=True)\n"
    assert unsafe_calls(good) == []


def test_no_unsafe_loading_in_the_source():
    files = _py_files()
    assert any(p.name == "model.py" for p in files) and len(files) >= 6
    problems = [f"{p.relative_to(ROOT)} {u}" for p in files for u in unsafe_calls(p.read_text(encoding="utf-8"))]
    assert problems == [], "unsafe loading calls:\n" + "\n".join(problems)


# =========================================================================================================
# Crashes during training
# =========================================================================================================

def test_atomic_write_survives_a_crash_at_any_point(tmp_path, monkeypatch):
    """A failure (or kill) before the rename leaves the old file as it was and no temporary file behind."""
    target = tmp_path / "last.safetensors"
    model_mod.atomic_write_bytes(target, b"old")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    model_mod.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and synced, "the data must be fsynced before the rename"
    for stage in ("fsync", "replace"):
        def boom(*a, **k):
            raise KeyboardInterrupt(stage)  # like a kill: nothing after this line runs
        monkeypatch.setattr(os, stage, boom)
        with pytest.raises(KeyboardInterrupt):
            model_mod.atomic_write_bytes(target, b"half-written")
        monkeypatch.undo()
        assert target.read_bytes() == b"new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        model_mod.atomic_write_bytes(target, b"x" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """4 phantoms per class at 48x60 (9 training and 3 validation images)."""
    return write_busi_tree(tmp_path_factory.mktemp("small") / "BUSI data é", per_class=4, height=48, width=60, seed=7)


@pytest.fixture(autouse=True)
def _restore_threads():
    """In-process trainings here use one thread (faster on a shared CPU, and the same as the subprocesses);
    the test session gets its thread count back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(tree: Path, out: Path, **kw) -> dict:
    import train
    base = dict(data_dir=str(tree), out_dir=str(out / "run"), loss_graph_dir=str(out / "lg"), epochs=2,
                image_size=64, expand=1, batch_size=4, progress=False, device="cpu", num_threads=1)
    return train.default_settings(**{**base, **kw})


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_existing_run_is_never_overwritten(tmp_path, small_tree, monkeypatch):
    import train
    cfg = _cfg(small_tree, tmp_path)
    run = Path(cfg["out_dir"])
    run.mkdir(parents=True)
    for name in ("log.csv", "best.safetensors", "last.safetensors", "resume.pt"):
        (run / name).write_bytes(b"earlier run: " + name.encode())
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        with pytest.raises(train.TrainingError, match="--resume|--overwrite") as e:
            train.check_out_dir(cfg, True)
        assert name in str(e.value) and str(run) in str(e.value)
        assert train.main(["--data_dir", str(small_tree), "--out_dir", str(run), "--loss_graph_dir",
                           str(tmp_path / "lg"), "--no-progress", "--device", "cpu"]) == 1
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
        (run / name).unlink()
    assert train.check_out_dir({**cfg, "overwrite": True}, True) == run
    with pytest.raises(train.TrainingError, match="nothing to resume"):
        train.check_out_dir({**cfg, "resume": True}, True)


def test_unwritable_output_folder_fails_before_training(tmp_path, small_tree, monkeypatch):
    import train
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    for cfg, where in ((_cfg(small_tree, tmp_path, out_dir=str(blocker / "run")), blocker / "run"),
                       (_cfg(small_tree, tmp_path, loss_graph_dir=str(blocker / "lg")), blocker / "lg")):
        with pytest.raises(train.TrainingError, match="not writable") as e:
            train.train_model(cfg)
        assert str(where) in str(e.value)


def test_full_disk_fails_before_training(tmp_path, small_tree, monkeypatch):
    import train
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 5 * 2**20,
                                                                                      5 * 2**20))
    cfg = _cfg(small_tree, tmp_path)
    with pytest.raises(train.TrainingError, match="5 MiB free") as e:
        train.train_model(cfg)
    assert cfg["out_dir"] in str(e.value)


def test_disk_filling_up_during_training_is_a_clear_error(tmp_path, small_tree, monkeypatch, caplog):
    import train
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    run = tmp_path / "run"
    code = train.main(["--data_dir", str(small_tree), "--out_dir", str(run), "--loss_graph_dir", str(tmp_path / "lg"),
                       "--no-progress", "--device", "cpu", "--image_size", "64", "--expand", "1", "--batch_size", "4",
                       "--epochs", "1", "--save_every_steps", "1"])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("No space left" in m and "cannot write" in m for m in errors), errors
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]


def test_bad_training_data_is_a_clear_error_from_train_main(tmp_path, caplog):
    import train
    root = _busi(tmp_path / "d", per_class=2)
    bad = root / "normal" / "normal (2).png"
    bad.write_bytes(bad.read_bytes()[:60])
    code = train.main(["--data_dir", str(root), "--out_dir", str(tmp_path / "run"), "--loss_graph_dir",
                       str(tmp_path / "lg"), "--no-progress", "--device", "cpu"])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(bad) in m and "truncated" in m for m in errors), errors


class _LossProxy:
    """Stands in for train.F: the training loss turns NaN from the `bad_from`-th step on."""

    def __init__(self, bad_from: int):
        self.calls, self.bad_from = 0, bad_from

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def binary_cross_entropy_with_logits(self, *a, **k):
        self.calls += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(*a, **k)
        return loss * float("nan") if self.calls >= self.bad_from else loss


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, small_tree, monkeypatch):
    import train
    cfg = _cfg(small_tree, tmp_path, epochs=2, save_every_steps=1)
    run = Path(cfg["out_dir"])
    # 9 training images, batch 4: 2 steps per epoch; the 4th step (epoch 2, batch 1) goes NaN
    monkeypatch.setattr(train, "F", _LossProxy(bad_from=4))
    with pytest.raises(train.TrainingError) as e:
        train.train_model(cfg)
    msg = str(e.value)
    assert "nan" in msg and "epoch 2" in msg and "last good checkpoint" in msg and str(run) in msg
    for name in ("best.safetensors", "last.safetensors"):
        net, meta = model_mod.load_checkpoint(run / name)
        assert meta["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in net.state_dict().values() if t.is_floating_point())
    state = model_mod.load_resume_state(run / "resume.pt")
    assert (state["epoch"], state["step"]) == (2, 3)  # saved after the last good step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(train.read_log(run / "log.csv")) == 1
    # the run can be continued (with the loss back to normal) from the last good state
    monkeypatch.setattr(train, "F", torch.nn.functional)
    train.train_model({**cfg, "resume": True})
    assert [int(r["epoch"]) for r in train.read_log(run / "log.csv")] == [1, 2]


def test_non_finite_weights_are_never_saved(tmp_path, small_tree, monkeypatch):
    """Weights can turn infinite in an optimizer step whose loss was still finite: the periodic save refuses
    them and the previous resume state stays."""
    import train
    real = train.make_optimizer

    def make_optimizer(cfg, params):
        opt = real(cfg, params)
        step, n = opt.step, [0]

        def poisoned_step(*a, **k):
            out = step(*a, **k)
            n[0] += 1
            if n[0] == 3:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].fill_(float("inf"))
            return out
        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    cfg = _cfg(small_tree, tmp_path, epochs=2, expand=2, save_every_steps=1)  # 4 steps per epoch
    with pytest.raises(train.TrainingError, match="weights became non-finite at epoch 1, batch 2"):
        train.train_model(cfg)
    state = model_mod.load_resume_state(Path(cfg["out_dir"]) / "resume.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                      if v.is_floating_point())


def test_resume_state_that_does_not_fit_the_run(tmp_path, small_tree):
    import train
    cfg = _cfg(small_tree, tmp_path, epochs=1, max_steps=1)
    train.train_model(cfg)
    run = Path(cfg["out_dir"])
    state = torch.load(run / "resume.pt", weights_only=True)
    assert state["samples"] == 4 and "model" in state
    with pytest.raises(CheckpointError, match="does not fit this run"):
        train.train_model({**cfg, "resume": True, "optimizer": "adam"})
    broken = dict(state)
    broken.pop("optimizer")
    model_mod.save_resume_state(run / "resume.pt", broken)
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        train.train_model({**cfg, "resume": True})
    (run / "resume.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="resume.pt"):
        train.train_model({**cfg, "resume": True})


def _train_cmd(tree: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--data_dir", str(tree), "--out_dir", str(out),
            "--loss_graph_dir", str(out.parent / "lg"), "--epochs", "2", "--image_size", "64", "--expand", "2",
            "--batch_size", "4", "--save_every_steps", "1", "--num_threads", "1", "--device", "cpu",
            "--no-progress", *extra]


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path, small_tree):
    """SIGKILL in the middle of epoch 2 (while it saves a resumable state after every step), then --resume:
    the final weights, best weights and log equal those of an uninterrupted run, bit for bit. Exact identity
    holds on CPU because the resume state holds everything the rest of the run depends on (weights with
    BatchNorm statistics, optimizer and scheduler state, best loss, the running loss sum, position, RNG), the
    data order and augmentation come from generators seeded by (seed, epoch, batch), and both runs use one
    thread. The killed run is a separate process; the resumed and the reference runs run in this one."""
    import train
    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(small_tree, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    seen, last_mtime = None, None
    deadline = time.time() + 300
    try:
        while p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
            try:  # cheap polling: read resume.pt only when epoch 1 is logged and the file was replaced
                if not (killed / "log.csv").exists() or os.stat(killed / "resume.pt").st_mtime_ns == last_mtime:
                    continue
                last_mtime = os.stat(killed / "resume.pt").st_mtime_ns
                st = torch.load(killed / "resume.pt", weights_only=True)  # atomically replaced: always whole
            except FileNotFoundError:
                continue
            if st["epoch"] == 2 and st["samples"] > 0:
                p.send_signal(signal.SIGKILL)
                seen = (st["epoch"], st["samples"])
                break
    finally:
        if p.poll() is None and seen is None:
            p.kill()
        p.wait()
        err = p.stderr.read()
        p.stderr.close()
    assert seen and p.returncode == -signal.SIGKILL, (seen, p.returncode, err[-2000:])
    assert len(train.read_log(killed / "log.csv")) == 1
    model_mod.load_resume_state(killed / "resume.pt")   # what the kill left is loadable
    model_mod.load_checkpoint(killed / "last.safetensors")
    settings = dict(epochs=2, expand=2, save_every_steps=1)
    (killed / "resume.pt.k1ll3d.tmp").write_bytes(b"half a file")  # what a kill during a save leaves
    assert train.main(_train_cmd(small_tree, killed, "--resume")[2:]) == 0
    assert train.train_model(_cfg(small_tree, tmp_path / "ref", **settings))  # the uninterrupted run
    ref = tmp_path / "ref" / "run"
    for name in ("last.safetensors", "best.safetensors"):
        a, b = _tensors(ref / name), _tensors(killed / name)
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, f"{name}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(train.read_log(ref / "log.csv")) == strip(train.read_log(killed / "log.csv"))
    assert len(train.read_log(ref / "log.csv")) == 2
    assert not list(killed.glob("*.tmp"))
