"""Running the network on a batch: one home for the PyTorch and the ONNX Runtime backends.

A predictor is a callable (uint8 images N x 1 x S x S, batch size, tta) -> lesion logits N x C x S x S, or the
tuple (lesion logits, image-label logits N x K) for a model with a classification head. predict.py, evaluate.py,
train.py's validation and bench.py take predictors from here (predict.load_predictor picks the backend);
export_onnx.py writes the ONNX files that session_predictor runs. This module imports neither of them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataset import normalize


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network's output as (lesion logits N x C x S x S, image-label logits N x K or None): models with a
    classification head return both, models without one only the lesion logits."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
                   batch_size: int = 8, tta: bool = False, channels_last: bool = True):
    """Lesion logits at network resolution for uint8 images N x 1 x S x S: N x C x S x S (float32, on CPU);
    for a model with a classification head, the tuple (lesion logits, image-label logits N x K).
    With tta, the logits of the image and of its mirror image are averaged."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # arrays straight from PIL are read-only
    images = torch.as_tensor(images)
    segs, clss = [], []
    for i in range(0, images.shape[0], batch_size):
        x = normalize(images[i:i + batch_size].to(device, non_blocking=True).float())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z, c = split_output(model(x))
        z = z.float()
        if tta:
            z2, c2 = split_output(model(x.flip(-1)))
            z = (z + z2.float().flip(-1)) / 2
            c = None if c is None else (c.float() + c2.float()) / 2
        segs.append(z.cpu())
        if c is not None:
            clss.append(c.float().cpu())
    seg = torch.cat(segs) if segs else torch.zeros(0)
    return (seg, torch.cat(clss)) if clss else seg


def onnx_file_predictor(onnx_path: str | Path, threads: int = 0):
    """session_predictor of an ONNX file on `threads` cores (0: as many as torch uses): one session on all of them
    for single images, one on a single thread that runs the parts of a batch side by side."""
    cores = threads or torch.get_num_threads()
    if cores < 2:
        return session_predictor(make_session(onnx_path, 1))
    return session_predictor(make_session(onnx_path, cores), batch_session=make_session(onnx_path, 1), workers=cores)


def make_session(onnx_path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session; threads 0: as many intra-op threads as torch uses (the CPU's cores)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


def session_predictor(session, batch_size_default: int = 8, batch_session=None, workers: int = 1):
    """(uint8 images N x 1 x S x S as numpy or torch, batch_size, tta) -> torch float32 logits N x C x S x S
    (and, for a model with a classification head, its label logits N x K as a tuple), with
    predict.predict_logits' semantics (dataset.normalize; tta averages with the mirrored image).

    With batch_session (a session on one intra-op thread) and workers > 1, a batch of several images is split
    into `workers` parts that batch_session runs at the same time, one per core; a single image goes to session
    (on all cores). On 2 cores the parts ran the INT8 model's batches and the page's five images faster and
    steadier than one run spread over both cores, whose worker thread also keeps spinning after the run, taking
    the core the next step needs (docs/performance.md)."""
    in_name = session.get_inputs()[0].name
    with_head = len(session.get_outputs()) > 1
    pool = None
    if batch_session is not None and workers > 1:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(workers, thread_name_prefix="onnx")  # session.run releases the GIL

    def run(x: np.ndarray) -> list[np.ndarray]:
        if pool is None or len(x) < 2:
            return session.run(None, {in_name: np.ascontiguousarray(x)})
        parts = [p for p in np.array_split(x, min(workers, len(x))) if len(p)]
        outs = list(pool.map(lambda p: batch_session.run(None, {in_name: np.ascontiguousarray(p)}), parts))
        return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]

    def as_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def predictor(images, batch_size: int = batch_size_default, tta: bool = False):
        images = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images)
        segs, clss = [], []
        for i in range(0, images.shape[0], max(1, int(batch_size))):
            x = normalize(images[i:i + batch_size].float()).numpy()
            z = run(x)
            if tta:
                m = run(x[..., ::-1])
                z = [(z[0] + m[0][..., ::-1]) / 2, *[(a + b) / 2 for a, b in zip(z[1:], m[1:])]]
            segs.append(as_tensor(z[0]))
            clss += [as_tensor(z[1])] if with_head else []
        seg = torch.cat(segs) if segs else torch.zeros(0)
        return (seg, torch.cat(clss)) if clss else seg

    return predictor
