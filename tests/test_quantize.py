"""The INT8 model (quantize.py, predict.py --backend onnx-int8): made on demand beside the checkpoint, rebuilt when
the checkpoint changes, calibrated on training-split images only, per-channel QDQ; the page and evaluate.py can
use it; on the six samples it gives the labels of the fp32 model."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import quantize  # noqa: E402


@pytest.fixture()
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint in a folder of its own (its data and split are found through its metadata)."""
    path = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, path)
    return path


def _split(path: Path) -> dict:
    from model import read_checkpoint_meta
    return json.loads(Path(read_checkpoint_meta(path)["split_file"]).read_text())


def test_int8_file_is_made_on_demand_and_rebuilt_when_the_checkpoint_changes(ckpt, monkeypatch):
    import onnx
    from export_onnx import file_sha256, onnx_metadata
    from model import load_checkpoint, save_checkpoint
    out = quantize.ensure_int8(ckpt)
    assert out == ckpt.with_suffix(".int8.onnx") and out.is_file()
    meta = onnx_metadata(out)
    assert meta["checkpoint_sha256"] == file_sha256(ckpt)
    info = json.loads(meta["quantization"])
    assert info["recipe"] == quantize.QUANT_RECIPE and info["calibration_split_part"] == "train"
    assert info["float_nodes"] == ["/encoder/conv1/Conv", "/segmentation_head/segmentation_head.0/Conv"]
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    inits = {i.name: i for i in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[1]].dims) == 1
                   and inits[n.input[1]].dims[0] > 1]
    assert per_channel, "int8 weights with one scale per output channel"

    def no_rebuild(*a, **k):
        raise AssertionError("an up-to-date INT8 file was rebuilt")
    with monkeypatch.context() as m:
        m.setattr(quantize, "quantize_checkpoint", no_rebuild)
        assert quantize.ensure_int8(ckpt) == out
    model, meta_ck = load_checkpoint(ckpt)
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    save_checkpoint(ckpt, model, meta_ck)  # the checkpoint changes: its INT8 file is stale
    assert quantize.ensure_int8(ckpt) == out
    assert onnx_metadata(out)["checkpoint_sha256"] == file_sha256(ckpt)


def test_calibration_reads_only_training_split_images(ckpt, monkeypatch):
    import dataset
    from model import read_checkpoint_meta
    split = _split(ckpt)
    train, val = set(split["train"]), set(split["val"])
    meta = read_checkpoint_meta(ckpt)
    chosen = quantize.calibration_samples(ckpt, meta, 5)
    assert len(chosen) == 5 and {s.key for s in chosen} <= train
    root = Path(meta["train_config"]["data_dir"])
    opened = []
    real = dataset.load_image
    monkeypatch.setattr(dataset, "load_image", lambda p: opened.append(Path(p)) or real(p))
    quantize.quantize_checkpoint(ckpt)
    keys = {p.relative_to(root).as_posix() for p in opened}
    assert keys and keys <= train and not keys & val, keys - train
    assert len(keys) == min(len(train), quantize.CALIBRATION_IMAGES)


def test_with_the_encoder_in_float_the_head_gives_the_fp32_outputs(phantom_tree, tiny_checkpoint, tmp_path):
    """An EfficientNet-Lite0 UNet with a head (random weights, 64 px): the decoder runs in int8, but the encoder
    and the head read float tensors only, so the label probabilities are the fp32 model's."""
    import onnx
    import dataset
    from backends import make_session, session_predictor
    from export_onnx import ensure_onnx
    from model import build_model, read_checkpoint_meta, save_checkpoint
    torch.manual_seed(0)
    model = build_model("efficientnet-lite0", None, 2, 1, len(dataset.CLASS_NAMES))
    meta = {**read_checkpoint_meta(tiny_checkpoint), "encoder": "efficientnet-lite0", "head": list(dataset.CLASS_NAMES)}
    path = tmp_path / "effl0.safetensors"
    save_checkpoint(path, model.eval(), meta)
    out = quantize.ensure_int8(path)
    graph = onnx.load(str(out)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    enc = [n for n in graph.node if n.name.startswith("/encoder/") and n.op_type == "Conv"]
    assert enc and not any(made_by.get(i) == "DequantizeLinear" for n in enc for i in n.input[:1])
    assert any(n.op_type == "DequantizeLinear" and "/decoder/" in n.name for n in graph.node)  # the decoder is int8
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    (seg32, cls32), (seg8, cls8) = (session_predictor(make_session(p))(images, 4, False)
                                    for p in (ensure_onnx(path), out))
    assert float((cls8 - cls32).abs().max()) < 1e-5
    assert seg8.shape == seg32.shape == (4, 2, 64, 64) and bool(torch.isfinite(seg8).all())


def test_a_missing_training_set_is_a_clear_error(ckpt, tmp_path):
    from dataset import DataError
    from model import load_checkpoint, save_checkpoint
    model, meta = load_checkpoint(ckpt)
    meta["train_config"] = {**meta["train_config"], "data_dir": str(tmp_path / "gone")}
    save_checkpoint(ckpt, model, meta)
    with pytest.raises(DataError, match="training images"):
        quantize.ensure_int8(ckpt)


def test_predict_and_evaluate_run_the_int8_backend(ckpt, phantom_tree, tmp_path):
    import evaluate
    import predict
    assert predict.main([str(phantom_tree / "benign"), "--checkpoint", str(ckpt), "--backend", "onnx-int8",
                         "--out_dir", str(tmp_path / "p")]) == 0
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} <= {"normal", "benign", "malignant"}
    assert evaluate.main(["--checkpoint", str(ckpt), "--backend", "onnx-int8", "--gallery", "0", "--bootstrap", "0",
                          "--no-measure"]) == 0
    summary = json.loads((ckpt.parent / "eval_onnx-int8" / "summary.json").read_text())  # beside the torch figures
    assert summary["backend"] == "onnx-int8" and summary["split"] == "val"


def test_the_page_offers_the_backends_and_runs_int8(ckpt):
    import app
    from test_app import call, png_bytes
    cfg = app.default_settings(port=0, checkpoint=str(ckpt), checkpoint_dir=str(ckpt.parent), uncertainty=True)
    img = (torch.rand(90, 120, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    with app.running(cfg) as (url, server):
        status, config = call(url, "api/config")
        assert status == 200 and config["backends"] == ["torch", "onnx", "onnx-int8"] and config["backend"] == "torch"
        status, r = call(url, f"api/predict?name=a.png&model={ckpt.name}&backend=onnx-int8", png_bytes(img))
        assert status == 200, r
        assert (ckpt.name, "onnx-int8") in server.state.models and ckpt.with_suffix(".int8.onnx").is_file()
        status, r = call(url, f"api/predict?name=a.png&backend=tensorflow", png_bytes(img))
        assert status == 400 and "unknown backend" in r["error"]


@pytest.mark.skipif(not (ROOT / "data" / "BUSI").is_dir(), reason="INT8 calibration reads the default model's training "
                    "images from data/ (data/BUSI not found; make install links data -> ../shared/data)")
def test_int8_gives_the_fp32_labels_on_the_six_samples(tmp_path):
    """predict.py on samples/ (six BUSI scans) with the default model: the INT8 model gives every image the label of
    the fp32 ONNX model."""
    import predict
    ck = ROOT / predict.checkpoint
    labels = {}
    for backend in ("onnx", "onnx-int8"):
        out = tmp_path / backend
        assert predict.main([str(ROOT / "samples"), "--checkpoint", str(ck), "--backend", backend,
                             "--out_dir", str(out)]) == 0
        with open(out / "predictions.csv", newline="") as f:
            labels[backend] = {Path(r["file"]).name: r["label"] for r in csv.DictReader(f)}
    assert len(labels["onnx"]) == 6 and labels["onnx-int8"] == labels["onnx"]
