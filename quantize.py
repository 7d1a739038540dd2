"""INT8 model for the CPU: static quantization of a checkpoint's ONNX export (predict.py --backend onnx-int8).

    python quantize.py --checkpoint checkpoints/busi_unet_efficientnet_lite0.safetensors   # -> <stem>.int8.onnx
    python quantize.py --checkpoint X.safetensors --check 200   # also INT8 vs fp32 on held-out training images

How: the fp32 export of export_onnx.py, onnxruntime's quant_pre_process (shape inference, graph clean-up), then
quantize_static in QDQ format: weights int8 per output channel (symmetric), activations uint8 (asymmetric),
reduce_range off; onnxruntime's advice for x86 CPUs with VNNI (AVX512-VNNI or AVX-VNNI: Intel Ice Lake and later,
AMD Zen 4 and later; older CPUs still run the file, with less gain). Activation ranges are calibrated (MinMax)
on CALIBRATION_IMAGES images of the checkpoint's own training split (its train_config data and split file, the
split's "train" part only: never validation, test or external images), spread evenly over the sorted keys.

Kept in float (OUTPUT_NODES, FLOAT_NODES), all else int8:
  - the output layers (segmentation head, classification head): their outputs are compared with thresholds (lesion
    threshold, normal gate, malignancy 0.5), and 8-bit outputs put those decisions on a coarse grid (different
    scans got the very same malignancy);
  - EfficientNet-Lite0: the whole encoder. The image label comes from the head, which reads only the encoder.
    Quantized, its depthwise stages (one uint8 scale per tensor over channels of very different ranges) moved the
    malignancy by 0.015 on average and 0.41 at most on 352 training images not used for calibration; with the
    stem and blocks 0-2 in float, the label still changed on 30 of 675 BUS-UCLM images, mostly where P(normal)
    sits at the gate or the malignancy at 0.5. With the encoder in float the head's outputs are the fp32 model's;
    the decoder, about three quarters of the fp32 time, runs in int8;
  - ResNet18 (no head; the label comes from the lesion channels): the stem convolution, which reads the image.
Nodes kept in float read float tensors: the quantizer hands every consumer of a tensor it quantizes (here the
skip features the decoder takes) the quantize-dequantize copy, also the consumers it leaves in float.
docs/performance.md has the measured accuracy and speed.

<stem>.int8.onnx is written beside the checkpoint on first use (a temporary folder when that folder is
read-only), with the checkpoint's SHA-256 and this recipe (QUANT_RECIPE) in its metadata: a changed checkpoint or
recipe rebuilds it. Building takes about a minute on 2 cores and needs the training images.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("quantize")
REPO = Path(__file__).resolve().parent

CALIBRATION_IMAGES = 256
# Node-name prefixes of the ONNX graph (torch module paths) kept in float: the output layers of every model, and
# per encoder what the measurements in the module docstring asked for (other encoders: the output layers only).
OUTPUT_NODES = ("/segmentation_head/", "/classification_head/")
FLOAT_NODES = {
    "efficientnet-lite0": ("/encoder/",),
    "resnet18": ("/encoder/conv1/",),
}
QUANT_RECIPE = ("int8-v3: QDQ, weights int8 per channel symmetric, activations uint8 asymmetric, MinMax "
                f"calibration on {CALIBRATION_IMAGES} training-split images, OUTPUT_NODES and FLOAT_NODES in float "
                "reading float inputs")
CALIBRATION_BATCH = 8


def default_int8_path(checkpoint_path: str | Path) -> Path:
    """<checkpoint stem>.int8.onnx beside the checkpoint."""
    return Path(checkpoint_path).with_suffix(".int8.onnx")


# ---------------------------------------------------------------------------------------------------------
# Calibration images: the training split's only
# ---------------------------------------------------------------------------------------------------------

def _existing(path: str) -> str:
    """A data path from a checkpoint's settings: as given (relative to the working folder, where it was
    trained), else relative to this repository."""
    if not path or Path(path).exists() or not (REPO / path).exists():
        return path
    return str(REPO / path)


def _data_settings(train_config: dict) -> dict:
    """dataset.discover_all's arguments from a checkpoint's train_config, paths resolved."""
    from dataset import parse_sources
    sources = train_config.get("sources") or ""
    if sources:
        sources = ";".join(f"{name}={','.join(_existing(p.strip()) for p in path.split(','))}"
                           for name, path in parse_sources(sources))
    return {"sources": sources, "data_dir": _existing(train_config.get("data_dir") or ""),
            "path_to_images": _existing(train_config.get("path_to_images") or ""),
            "path_to_masks": _existing(train_config.get("path_to_masks") or ""),
            "manifest": _existing(train_config.get("manifest") or ""),
            "default_label": train_config.get("default_label") or ""}


def split_file_of(checkpoint_path: str | Path, meta: dict) -> Path:
    """The checkpoint's split file: the path stored in it, else a file of that name beside the checkpoint."""
    from dataset import DataError
    stored = str(meta.get("split_file") or "")
    candidates = [Path(_existing(stored))] if stored else []
    candidates.append(Path(checkpoint_path).parent / (Path(stored).name if stored else "split.json"))
    for p in candidates:
        if p.is_file():
            return p
    raise DataError(f"calibration needs the checkpoint's split file (looked for "
                    f"{', '.join(str(c) for c in candidates)})")


def training_keys(checkpoint_path: str | Path, meta: dict) -> list[str]:
    """The keys of the checkpoint's training images (the "train" part of its split, its fold's for K folds)."""
    from dataset import read_split, select_fold
    split = read_split(split_file_of(checkpoint_path, meta))
    return sorted(select_fold(split, int(meta.get("fold", 0) or 0))[0])


def calibration_samples(checkpoint_path: str | Path, meta: dict, n: int = CALIBRATION_IMAGES) -> list:
    """n samples of the checkpoint's training split (all when it has fewer), spread evenly over its sorted
    keys; a DataError when its training data cannot be found."""
    from dataset import DataError, discover_all
    keys = training_keys(checkpoint_path, meta)
    settings = _data_settings(meta.get("train_config") or {})
    try:
        by_key = {s.key: s for s in discover_all(**settings)}
    except DataError as e:
        raise DataError(f"INT8 calibration needs the checkpoint's training images ({e}); the checkpoint names "
                        f"{settings}") from None
    present = [k for k in keys if k in by_key]
    if not present:
        raise DataError(f"INT8 calibration: none of the {len(keys)} training images of the split is in the data "
                        f"({settings})")
    if len(present) < len(keys):
        log.warning("INT8 calibration: %d of %d training images are missing from the data", len(keys) - len(present),
                    len(keys))
    if n < len(present):
        present = [present[int(i * len(present) / n)] for i in range(n)]
    return [by_key[k] for k in present]


def network_images(samples: list, image_size: int) -> np.ndarray:
    """uint8 N x 1 x S x S, resized as predict.py resizes an image."""
    from dataset import load_image, resize_image
    if not samples:
        return np.zeros((0, 1, image_size, image_size), np.uint8)
    return np.stack([resize_image(load_image(s.image), image_size)[None] for s in samples])


def _reader(images: np.ndarray, input_name: str):
    """onnxruntime's CalibrationDataReader over normalized batches of images."""
    from onnxruntime.quantization import CalibrationDataReader

    from dataset import normalize

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(images):
                return None
            batch = images[self.i:self.i + CALIBRATION_BATCH].astype(np.float32)
            self.i += CALIBRATION_BATCH
            return {input_name: np.ascontiguousarray(normalize(batch), dtype=np.float32)}

        def rewind(self):
            self.i = 0
    return Reader()


# ---------------------------------------------------------------------------------------------------------
# Building the INT8 file
# ---------------------------------------------------------------------------------------------------------

def float_nodes(onnx_path: str | Path, encoder: str) -> list[str]:
    """Names of the nodes of the graph kept in float for this encoder (OUTPUT_NODES and FLOAT_NODES)."""
    import onnx
    prefixes = OUTPUT_NODES + FLOAT_NODES.get(encoder, ())
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.name.startswith(prefixes)]


def _float_path_for_float_nodes(proto, keep: list[str]) -> int:
    """Rewire the nodes kept in float to read the float tensor instead of its quantize-dequantize copy where the
    tensor comes from a node kept in float (or the graph input). The quantizer gives every consumer of a tensor
    it quantizes the copy, also those it left in float, so that without this an encoder kept in float would
    still see the rounding of the skip features that the decoder quantizes. Returns the inputs rewired."""
    keep = set(keep)
    made_by = {o: n for n in proto.graph.node for o in n.output}
    graph_inputs = {i.name for i in proto.graph.input}
    rewired = 0
    for node in proto.graph.node:
        if node.name not in keep:
            continue
        for i, name in enumerate(node.input):
            dq = made_by.get(name)
            q = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = made_by.get(q.input[0])
            if (source is not None and source.name in keep) or q.input[0] in graph_inputs:
                node.input[i] = q.input[0]
                rewired += 1
    return rewired


def quantize_checkpoint(checkpoint_path: str | Path, out_path: str | Path | None = None,
                        n_images: int = CALIBRATION_IMAGES) -> Path:
    """Write the INT8 model of a checkpoint (default <stem>.int8.onnx beside it), atomically; returns its path."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    from export_onnx import INPUT_NAME, ensure_onnx, file_sha256, onnx_metadata
    from model import atomic_write_bytes, read_checkpoint_meta
    checkpoint_path = Path(checkpoint_path)
    out = Path(out_path) if out_path else default_int8_path(checkpoint_path)
    meta = read_checkpoint_meta(checkpoint_path)
    samples = calibration_samples(checkpoint_path, meta, n_images)
    images = network_images(samples, int(meta["image_size"]))
    fp32 = ensure_onnx(checkpoint_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(pre))
        keep = float_nodes(pre, str(meta.get("encoder", "")))
        log.info("%s: calibrating on %d training images, %d nodes kept in float", checkpoint_path.name, len(images),
                 len(keep))
        quantize_static(str(pre), str(q), _reader(images, INPUT_NAME), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=keep or None)
        proto = onnx.load(str(q))
    _float_path_for_float_nodes(proto, keep)
    info = {"recipe": QUANT_RECIPE, "calibration_images": len(images), "calibration_split_part": "train",
            "calibration_split_file": str(split_file_of(checkpoint_path, meta)), "float_nodes": keep}
    props = {**onnx_metadata(fp32), "checkpoint_sha256": file_sha256(checkpoint_path), "quantization": json.dumps(info)}
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "busi-unet quantize.py"
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def quantization_info(onnx_path: str | Path) -> dict:
    """The 'quantization' metadata of an INT8 file ({} for another file)."""
    from export_onnx import onnx_metadata
    return json.loads(onnx_metadata(onnx_path).get("quantization", "{}"))


def _is_current(path: Path, checkpoint_path: Path) -> bool:
    from export_onnx import file_sha256, onnx_metadata
    if not path.is_file():
        return False
    try:
        props = onnx_metadata(path)
        return (props.get("checkpoint_sha256") == file_sha256(checkpoint_path)
                and json.loads(props.get("quantization", "{}")).get("recipe") == QUANT_RECIPE)
    except Exception:  # noqa: BLE001 - an unreadable file is simply rebuilt
        return False


def ensure_int8(checkpoint_path: str | Path) -> Path:
    """The path of an up-to-date INT8 model of the checkpoint: <stem>.int8.onnx beside it, built when missing or
    made from another version of the checkpoint or recipe (into a temporary folder if that folder is read-only)."""
    from export_onnx import file_sha256
    checkpoint_path = Path(checkpoint_path)
    path = default_int8_path(checkpoint_path)
    if _is_current(path, checkpoint_path):
        return path
    why = "stale (made from another checkpoint or recipe)" if path.exists() else "missing"
    log.info("%s: %s; building it now (about a minute; or run: python quantize.py --checkpoint %s)", path, why,
             checkpoint_path)
    try:
        return quantize_checkpoint(checkpoint_path, path)
    except PermissionError:
        alt = Path(tempfile.gettempdir()) / f"{checkpoint_path.stem}-{file_sha256(checkpoint_path)[:12]}.int8.onnx"
        log.warning("%s is not writable; writing %s instead", path.parent, alt)
        return alt if _is_current(alt, checkpoint_path) else quantize_checkpoint(checkpoint_path, alt)


def int8_predictor(checkpoint_path: str | Path, meta: dict | None = None, threads: int = 0):
    """predict.py's onnx-int8 backend: a callable (uint8 images, batch_size, tta) -> torch float32 logits (and
    label logits), running <checkpoint stem>.int8.onnx (built on first use) with ONNX Runtime on the CPU."""
    from export_onnx import runtime_predictor
    return runtime_predictor("onnx-int8", ensure_int8, checkpoint_path, meta, threads)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def held_out_training_samples(checkpoint_path: str | Path, meta: dict, n: int) -> list:
    """Up to n training-split samples that the calibration did not use (for --check: no validation image is
    looked at when choosing what stays in float)."""
    used = {s.key for s in calibration_samples(checkpoint_path, meta)}
    rest = [s for s in calibration_samples(checkpoint_path, meta, 10 ** 9) if s.key not in used]
    return rest if n >= len(rest) else [rest[int(i * len(rest) / n)] for i in range(n)]


def compare(checkpoint_path: str | Path, n: int) -> dict:
    """INT8 against the fp32 ONNX model on n held-out training images: the change of the head's malignancy
    probability P(malignant) / (P(benign) + P(malignant)) and of P(normal) (mean, largest), the share of images
    whose malignancy crosses 0.5, and the mean Dice between the two lesion masks at the checkpoint's threshold."""
    import torch

    from backends import make_session, session_predictor, split_output
    from export_onnx import ensure_onnx
    from metrics import dice_iou
    from model import read_checkpoint_meta
    meta = read_checkpoint_meta(checkpoint_path)
    images = network_images(held_out_training_samples(checkpoint_path, meta, n), int(meta["image_size"]))
    out = {}
    for name, path in (("fp32", ensure_onnx(checkpoint_path)), ("int8", ensure_int8(checkpoint_path))):
        seg, cls = split_output(session_predictor(make_session(path))(images, 8, False))
        masks = (torch.sigmoid(seg).amax(1) > float(meta.get("threshold", 0.5))).numpy()
        out[name] = (masks, None if cls is None else torch.softmax(cls, -1).numpy())
    (m32, c32), (m8, c8) = out["fp32"], out["int8"]
    res = {"images": len(images), "mask_dice_mean": float(np.mean([dice_iou(a, b, empty_score=1.0)[0]
                                                                     for a, b in zip(m32, m8)]))}
    if c32 is not None and c32.shape[1] == 3:  # normal, benign, malignant
        mal = lambda c: c[:, 2] / np.maximum(c[:, 1] + c[:, 2], 1e-12)
        d_mal, d_normal = np.abs(mal(c32) - mal(c8)), np.abs(c32[:, 0] - c8[:, 0])
        res.update(malignancy_change_mean=float(d_mal.mean()), malignancy_change_max=float(d_mal.max()),
                   normal_change_mean=float(d_normal.mean()), normal_change_max=float(d_normal.max()),
                   malignancy_crosses_half=float(np.mean((mal(c32) >= 0.5) != (mal(c8) >= 0.5))))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="trained model (.safetensors)")
    ap.add_argument("--out", default="", help="file to write (default: <checkpoint stem>.int8.onnx beside it)")
    ap.add_argument("--n_images", type=int, default=CALIBRATION_IMAGES, help="calibration images (training split)")
    ap.add_argument("--check", type=int, default=0, help="compare INT8 with fp32 on this many training images "
                                                         "that the calibration did not use")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dataset import DataError
    from model import CheckpointError
    try:
        if args.out or args.n_images != CALIBRATION_IMAGES:
            out = quantize_checkpoint(args.checkpoint, args.out or None, args.n_images)
        else:
            out = ensure_int8(args.checkpoint)
        log.info("%s (%.1f MB): %s", out, out.stat().st_size / 2 ** 20, quantization_info(out))
        if args.check:
            print(json.dumps(compare(args.checkpoint, args.check), indent=1))
    except (DataError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
