"""ONNX export and the ONNX Runtime backend agree with PyTorch (probabilities within 1e-4, same masks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64


def _random_checkpoint(path: Path, seed: int) -> Path:
    """A random-init resnet18 UNet at 64px whose BatchNorm statistics come from a few image batches, so its
    logits have the spread of a trained model's rather than the thousands of a barely trained one."""
    import dataset
    from model import build_model, save_checkpoint
    torch.manual_seed(seed)
    model = build_model("resnet18", None, len(dataset.LESION_CLASSES), 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(dataset.normalize(torch.randint(0, 256, (4, 1, SIZE, SIZE)).float()))
    meta = {**dataset.preprocessing_meta(SIZE), "encoder": "resnet18", "classes": len(dataset.LESION_CLASSES),
            "threshold": 0.5, "epoch": 0}
    save_checkpoint(path, model.eval(), meta)
    return path


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(tmp_path_factory.mktemp("onnx") / "random.safetensors", seed=3)


def test_export_cli_writes_dynamic_batch_and_metadata(random_checkpoint):
    """python export_onnx.py --checkpoint X --check: <stem>.onnx beside X, batch axis symbolic, metadata kept,
    ONNX Runtime within 1e-4 of PyTorch."""
    import onnx
    import export_onnx
    assert export_onnx.main(["--checkpoint", str(random_checkpoint), "--check"]) == 0
    out = random_checkpoint.with_suffix(".onnx")
    assert export_onnx.ensure_onnx(random_checkpoint) == out  # up to date: found, not exported again
    proto = onnx.load(str(out))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    meta = export_onnx.onnx_metadata(out)
    assert json.loads(meta["image_size"]) == SIZE
    assert json.loads(meta["norm_mean"]) == 0.5 and json.loads(meta["norm_std"]) == 0.5
    assert meta["checkpoint_sha256"] == export_onnx.file_sha256(random_checkpoint)


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_runtime_matches_pytorch(random_checkpoint, tta):
    import export_onnx
    from model import load_checkpoint
    from predict import predict_logits
    model, meta = load_checkpoint(random_checkpoint)
    images = torch.randint(0, 256, (5, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref = predict_logits(model, images, torch.device("cpu"), 2, tta)
    predictor = export_onnx.onnx_predictor(random_checkpoint, meta)
    for imgs in (images, images.numpy()):  # torch or numpy input; batch 2 leaves a remainder of 1
        got = predictor(imgs, 2, tta)
        assert got.dtype == torch.float32 and got.shape == ref.shape == (5, 2, SIZE, SIZE)
        assert float((torch.sigmoid(got) - torch.sigmoid(ref)).abs().max()) <= 1e-4
    assert 0.5 < float(ref.abs().max()) < 1e3  # a meaningful comparison: logits neither all tiny nor huge


@pytest.mark.parametrize("tta", [False, True])
def test_batches_split_over_the_cores_give_the_one_session_results(random_checkpoint, tta):
    """backends.onnx_file_predictor on 2 cores (a batch's parts run side by side on a one-thread session, single
    images on the two-thread one) returns what one session returns, for any batch size and remainder."""
    import export_onnx
    from backends import make_session, onnx_file_predictor, session_predictor
    path = export_onnx.ensure_onnx(random_checkpoint)
    images = torch.randint(0, 256, (7, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    ref = session_predictor(make_session(path, 1))(images, 7, tta)
    split = onnx_file_predictor(path, threads=2)
    for batch_size in (1, 2, 3, 5, 8):
        got = split(images, batch_size, tta)
        assert got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-5, batch_size


def test_stale_onnx_is_reexported(random_checkpoint, tmp_path):
    import shutil
    import export_onnx
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(random_checkpoint, ckpt)
    shutil.copy(export_onnx.ensure_onnx(random_checkpoint), tmp_path / "m.onnx")
    stamp = (tmp_path / "m.onnx").stat().st_mtime_ns
    assert export_onnx.ensure_onnx(ckpt).stat().st_mtime_ns == stamp  # same checkpoint bytes: kept
    _random_checkpoint(ckpt, seed=5)                                   # the checkpoint changes
    again = export_onnx.ensure_onnx(ckpt)
    assert again == tmp_path / "m.onnx"
    assert export_onnx.onnx_metadata(again)["checkpoint_sha256"] == export_onnx.file_sha256(ckpt)


def test_predict_backend_onnx_writes_the_torch_mask(random_checkpoint, phantom_tree, tmp_path):
    """predict.py --backend onnx and --backend torch write the same masks (pixels whose probability lies
    within 1e-4 of the threshold may go either way)."""
    from PIL import Image
    import predict
    from dataset import load_image, resize_image
    files = [phantom_tree / "benign" / "benign (1).png", phantom_tree / "malignant" / "malignant (2).png"]
    outs = {}
    for backend in ("torch", "onnx"):
        outs[backend] = tmp_path / backend
        rc = predict.main([*map(str, files), "--checkpoint", str(random_checkpoint), "--out_dir", str(outs[backend]),
                           "--backend", backend, "--device", "cpu"])
        assert rc == 0
    predictor, meta = predict.load_predictor(str(random_checkpoint), torch.device("cpu"), "torch")
    for f in files:
        a = np.asarray(Image.open(outs["torch"] / f"{f.stem}_mask.png")) > 0
        b = np.asarray(Image.open(outs["onnx"] / f"{f.stem}_mask.png")) > 0
        grey = load_image(f)
        logits = predictor(resize_image(grey, SIZE)[None, None].copy(), 1, False)[0]
        top = predict.to_original(torch.sigmoid(logits), grey.shape).max(0).values.numpy()
        differ = a != b
        assert not (differ & (np.abs(top - 0.5) > 1e-4)).any()
        assert 0 < a.sum() < a.size  # the masks are not trivially empty or full
    for backend in outs:
        rows = (outs[backend] / "predictions.csv").read_text().splitlines()
        assert len(rows) == 1 + len(files)
