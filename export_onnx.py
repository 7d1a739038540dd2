"""Export a checkpoint to ONNX, and run it with ONNX Runtime (predict.py --backend onnx).

    python export_onnx.py --checkpoint runs/resnet18/best.safetensors            # -> runs/resnet18/best.onnx
    python export_onnx.py --checkpoint runs/resnet18/best.safetensors --out model.onnx --check

The ONNX graph maps normalized images float32 N x 1 x S x S (input "image", dynamic batch axis) to lesion
logits float32 N x C x S x S (output "logits"); normalization stays outside the graph, in dataset.normalize,
exactly as for the PyTorch model. The checkpoint's metadata (image size, normalization, classes, threshold,
...) is copied into the ONNX model's metadata_props, together with the SHA-256 of the checkpoint file, so
predict.py re-exports a stale .onnx after the checkpoint has changed.

predict.py --backend onnx looks for <checkpoint stem>.onnx beside the checkpoint and exports it when it is
missing or stale (into a temporary folder when the checkpoint's folder is not writable). The INT8 model of
--backend onnx-int8 (<checkpoint stem>.int8.onnx) is quantize.py's, made from this export.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

log = logging.getLogger("export_onnx")

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
HEAD_OUTPUT_NAME = "label_logits"  # second output of models with a classification head


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_onnx_path(checkpoint_path: str | Path) -> Path:
    """<checkpoint stem>.onnx beside the checkpoint."""
    return Path(checkpoint_path).with_suffix(".onnx")


def export_model(model: torch.nn.Module, out_path: str | Path, image_size: int, in_channels: int = 1,
                 metadata: dict | None = None, opset: int = OPSET, dynamo: bool = False) -> Path:
    """Write the model's logits graph with a dynamic batch axis to out_path (atomically); returns out_path.

    dynamo=False uses the TorchScript exporter (about 3x quicker to export, identical results here);
    dynamo=True the torch.export-based one (opset >= 18).
    """
    import onnx
    from model import atomic_write_bytes, _unwrap
    model = _unwrap(model).float().eval().to("cpu", memory_format=torch.contiguous_format)
    out_path = Path(out_path)
    example = torch.zeros(2, in_channels, image_size, image_size)
    with torch.no_grad():
        has_head = isinstance(model(example[:1]), (tuple, list))
    outputs = [OUTPUT_NAME, HEAD_OUTPUT_NAME] if has_head else [OUTPUT_NAME]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=65536)
                prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=max(opset, 18),
                                         input_names=[INPUT_NAME], output_names=outputs,
                                         dynamic_shapes=({0: batch},), verbose=False)
                prog.save(str(tmp_file))
            else:
                torch.onnx.export(model, (example,), str(tmp_file), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=outputs,
                                  dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
                                  do_constant_folding=True)
        proto = onnx.load(str(tmp_file))
    onnx.checker.check_model(proto)
    meta = {"image_size": image_size, "in_channels": in_channels, **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    proto.producer_name = "busi-unet export_onnx.py"
    atomic_write_bytes(out_path, proto.SerializeToString())
    return out_path


def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path | None = None, dynamo: bool = False) -> Path:
    """Export a .safetensors checkpoint; the .onnx goes beside it unless out_path is given."""
    from model import load_checkpoint
    model, meta = load_checkpoint(checkpoint_path, "cpu")
    out = Path(out_path) if out_path else default_onnx_path(checkpoint_path)
    extra = {"checkpoint_sha256": file_sha256(checkpoint_path), "checkpoint_name": Path(checkpoint_path).name,
             "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
             "input": "normalized image float32 N x in_channels x S x S: (uint8 / 255 - norm_mean) / norm_std",
             "output": "lesion logits float32 N x classes x S x S (sigmoid -> probabilities)"}
    meta_out = {**{k: v for k, v in meta.items() if k not in ("train_config", "metrics")}, **extra}
    return export_model(model, out, int(meta["image_size"]), int(meta["in_channels"]), meta_out, dynamo=dynamo)


def onnx_metadata(onnx_path: str | Path) -> dict:
    """metadata_props of an ONNX file as {key: value string} (reads the graph but not the weights)."""
    import onnx
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _is_current(onnx_path: Path, checkpoint_path: Path) -> bool:
    if not onnx_path.is_file():
        return False
    try:
        return onnx_metadata(onnx_path).get("checkpoint_sha256") == file_sha256(checkpoint_path)
    except Exception:  # noqa: BLE001 - an unreadable .onnx is simply re-exported
        return False


def ensure_onnx(checkpoint_path: str | Path) -> Path:
    """The path of an up-to-date ONNX export of the checkpoint: <stem>.onnx beside it, exported when missing
    or made from another version of the checkpoint (into a temporary folder if that folder is read-only)."""
    checkpoint_path = Path(checkpoint_path)
    path = default_onnx_path(checkpoint_path)
    if _is_current(path, checkpoint_path):
        return path
    why = "stale (made from another version of the checkpoint)" if path.exists() else "missing"
    log.info("%s: %s; exporting it now (or run: python export_onnx.py --checkpoint %s)", path, why, checkpoint_path)
    try:
        return export_checkpoint(checkpoint_path, path)
    except PermissionError:
        alt = Path(tempfile.gettempdir()) / f"{checkpoint_path.stem}-{file_sha256(checkpoint_path)[:12]}.onnx"
        log.warning("%s is not writable; exporting to %s instead (export it yourself with: python export_onnx.py "
                    "--checkpoint %s --out <file>)", path.parent, alt, checkpoint_path)
        return alt if _is_current(alt, checkpoint_path) else export_checkpoint(checkpoint_path, alt)


def onnx_predictor(checkpoint_path: str | Path, meta: dict | None = None, threads: int = 0):
    """predict.py's ONNX backend: a callable (uint8 images, batch_size, tta) -> torch float32 logits, running
    <checkpoint stem>.onnx (exported on first use) with ONNX Runtime on the CPU."""
    return runtime_predictor("onnx", ensure_onnx, checkpoint_path, meta, threads)


def runtime_predictor(backend: str, ensure, checkpoint_path: str | Path, meta: dict | None, threads: int):
    """The onnx and onnx-int8 backends: ensure(checkpoint) gives the up-to-date .onnx file, checked against the
    checkpoint's image size and run with ONNX Runtime on the CPU."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeError(f"the {backend} backend needs onnxruntime and onnx (pip install onnx onnxruntime)") from None
    path = ensure(checkpoint_path)
    check_image_size(path, meta, checkpoint_path)
    from backends import onnx_file_predictor
    return onnx_file_predictor(path, threads)


def check_image_size(onnx_path: Path, meta: dict | None, checkpoint_path: str | Path) -> None:
    """A RuntimeError when an ONNX file was made for another image size than the checkpoint's."""
    if meta is None:
        return
    stored = onnx_metadata(onnx_path)
    if "image_size" in stored and int(json.loads(stored["image_size"])) != int(meta["image_size"]):
        raise RuntimeError(f"{onnx_path}: made for {stored['image_size']}px, the checkpoint says "
                           f"{meta['image_size']}px; delete it and it is made again from {checkpoint_path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="trained model (.safetensors)")
    ap.add_argument("--out", default="", help="ONNX file to write (default: <checkpoint stem>.onnx beside it)")
    ap.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (opset 18)")
    ap.add_argument("--check", action="store_true",
                    help="compare ONNX Runtime with PyTorch on random images (max |probability difference|)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from model import CheckpointError, load_checkpoint
    try:
        out = export_checkpoint(args.checkpoint, args.out or None, dynamo=args.dynamo)
    except CheckpointError as e:
        log.error("%s", e)
        return 2
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 2 ** 20)
    if args.check:
        from backends import make_session, predict_logits, session_predictor, split_output
        model, meta = load_checkpoint(args.checkpoint, "cpu")
        s = int(meta["image_size"])
        images = torch.randint(0, 256, (3, int(meta["in_channels"]), s, s), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        ref = torch.sigmoid(split_output(predict_logits(model, images, torch.device("cpu"), 2, False, False))[0])
        got = torch.sigmoid(split_output(session_predictor(make_session(out))(images, 2, False))[0])
        diff = float((ref - got).abs().max())
        log.info("max |probability difference| ONNX Runtime vs PyTorch: %.2e (%s)", diff,
                 "ok" if diff <= 1e-4 else "TOO LARGE")
        return 0 if diff <= 1e-4 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
