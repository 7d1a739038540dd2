"""Speed of what is shipped, from one run on one machine: every shipped model's inference (a naive PyTorch loop,
the PyTorch backend, ONNX Runtime fp32 and INT8), the web page from upload to result, and training with the
default model's recipe against a naive loop; beside the machine's measured compute ceiling.

    python bench.py                                   # every shipped model (reproduce.MODELS): 3-4 min on 2 cores
    python bench.py --models default                  # one model (reproduce.py's names)
    python bench.py --data_dir data/BUSI              # train on real BUSI images (default: synthetic phantoms)
    python bench.py --quick                           # tiny settings and a tiny model, one process (the tests)

Inference, for each model at its own input size, on the six scans of samples/ (resized as predict.py does):
  naive       eager PyTorch: contiguous tensors, torch.no_grad, the model as loaded
  torch fp32  predict.py --backend torch (backends.predict_logits: inference_mode, channels_last)
  ONNX fp32   predict.py --backend onnx (export_onnx.py, ONNX Runtime with all graph optimizations)
  ONNX INT8   predict.py --backend onnx-int8 (quantize.py; the .int8.onnx is built before timing if missing)
batched: images/s over infer_images images in batches of batch_size (normalization included); latency: the median
of latency_runs calls with one image; the paths take turns in two blocks, so that a slow spell hits them alike.
GFLOP/s counts the fp32 model's FLOPs (torch.utils.flop_counter), also for INT8, so that the paths compare with
the fp32 ceiling on one scale.
Page: app.py's upload-to-result of a 500x500 scan over HTTP on this machine (app.run_benchmark), with and without
the uncertainty, with the torch and the INT8 backends; for the INT8 run with the uncertainty also where the time
goes (decoding, network, post-processing, pictures and JSON, HTTP and JSON transport).
Training: the default model's recipe (its model, loss, optimizer and schedule, augmentation, channels_last, batch
size and image size) as train.py runs it (the set in memory as uint8, batched augmentation on the device) against
a naive loop (a per-sample Dataset with PIL augmentation of the same kinds, DataLoader(num_workers=0), contiguous
tensors; the same model, loss and optimizer). Only the encoder's starting weights differ (random: no download).
Ceiling: the best of a large sgemm (numpy, torch) and a large oneDNN 3x3 convolution, in GFLOP/s.
Each part runs in its own process (so its peak memory is its own); rates are medians after warm-up; the load
average is printed per part: on a shared machine the numbers are only as good as the quiet they were measured in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "BENCH_RESULT "
# Every line bench.py promises to print (the tests check them).
LINES = ("machine:", "load average", "compute ceiling:", "| model", "| page", "| training", "targets:")
PATHS = ("naive", "torch fp32", "ONNX fp32", "ONNX INT8")
BACKEND_OF = {"torch fp32": "torch", "ONNX fp32": "onnx", "ONNX INT8": "onnx-int8"}
TARGETS = {"int8_batched_x": 1.5, "int8_latency_x": 1.4, "page_s": 0.15, "train_x": 1.25}
PAGE_RUNS = (("torch", True), ("torch", False), ("onnx-int8", True), ("onnx-int8", False))


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def loadavg() -> str:
    try:
        return "%.2f/%.2f/%.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, warmup: int, dev: torch.device = torch.device("cpu")) -> list[float]:
    """Wall seconds of each of n calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


def median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_int8_flags() -> str:
    """The CPU's 8-bit dot-product instructions (what INT8 speed depends on)."""
    try:
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "").split()
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return ", ".join(found) if found else "no VNNI (INT8 gains less)"


def shipped_checkpoints(names: str) -> list[Path]:
    """The files of reproduce.MODELS (all, or the comma-separated names; 'default' is predict.py's)."""
    import reproduce
    keys = list(reproduce.MODELS) if names in ("", "all") else [reproduce.resolve(n.strip()) for n in names.split(",")]
    return [ROOT / reproduce.MODELS[k].file for k in keys]


def default_checkpoint() -> Path:
    import predict
    return ROOT / predict.checkpoint


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

def sample_images(size: int, n: int) -> np.ndarray:
    """n network-size images (uint8 N x 1 x S x S): the scans of samples/ in turn, resized as predict.py does."""
    from dataset import load_image, resize_image
    files = sorted((ROOT / "samples").glob("*.png"))
    base = [resize_image(load_image(f), size)[None] for f in files]
    return np.stack([base[i % len(base)] for i in range(n)])


def synthetic_set(n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """n phantoms at a non-square 'native' resolution (1.25 x wider than tall, like scans): images, masks, classes."""
    from dataset import CLASS_NAMES
    from phantom import make_phantom
    imgs, masks, labels = [], [], []
    for i in range(n):
        img, mask = make_phantom(CLASS_NAMES[i % 3], size, int(size * 1.25), seed=seed + i)
        imgs.append(img)
        masks.append(mask)
        labels.append(i % 3)
    return imgs, masks, labels


def busi_samples(data_dir: str, n: int) -> list:
    """n samples spread evenly over the sorted BUSI listing (all classes), or all when n <= 0."""
    import dataset
    samples = dataset.discover(data_dir)
    if 0 < n < len(samples):
        samples = [samples[int(i * len(samples) / n)] for i in range(n)]
    return samples


def project_data(args, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The training set preprocessed once into memory: (uint8 N x 1 x S x S, uint8 N x C x S x S, class index N,
    seconds)."""
    import dataset
    t = time.perf_counter()
    if args.data_dir:
        loaded = dataset.load_set(busi_samples(args.data_dir, args.n_images), size)
        images, targets = loaded.images, loaded.targets
        labels = [dataset.CLASS_NAMES.index(s.label) for s in loaded.samples]
    else:
        imgs, masks, labels = synthetic_set(args.n_images, size, args.seed)
        images = np.stack([dataset.resize_image(im, size)[None] for im in imgs])
        targets = np.zeros((len(imgs), len(dataset.LESION_CLASSES), size, size), np.uint8)
        for i, (m, c) in enumerate(zip(masks, labels)):
            if c > 0:
                targets[i, c - 1] = dataset.resize_mask(m, size)
    return torch.as_tensor(images), torch.as_tensor(targets), torch.tensor(labels), time.perf_counter() - t


class NaiveDataset(torch.utils.data.Dataset):
    """The usual per-sample Dataset: each item resized and augmented with PIL on the fly (decoded from its
    files on every access when built from BUSI samples): flips, rotation, zoom, shift, brightness, contrast,
    gamma, blur, speckle, and with scanner=True also a down-up resampling and a depth gain ramp, as the recipe's
    scanner augmentation has. Variant 0 of each image is left unaugmented. Items: (image, target, class)."""

    def __init__(self, size: int, expand: int, seed: int, samples=None, images=None, masks=None, labels=None,
                 scanner: bool = False):
        self.size, self.expand, self.seed, self.scanner = size, expand, seed, scanner
        self.samples, self.images, self.masks, self.labels = samples, images, masks, labels
        self.n = len(samples) if samples is not None else len(images)
        self.calls = 0

    def __len__(self) -> int:
        return self.n * self.expand

    def _raw(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        import dataset
        if self.samples is not None:
            s = self.samples[i]
            grey = dataset.load_image(s.image)
            mask = dataset.load_mask_union(s.masks, grey.shape)
            return grey, mask, dataset.CLASS_NAMES.index(s.label)
        return self.images[i], self.masks[i], self.labels[i]

    def _augment(self, img, msk, rng):
        from PIL import Image, ImageEnhance, ImageFilter
        size = self.size
        if rng.random() < 0.5:
            img, msk = img.transpose(Image.FLIP_LEFT_RIGHT), msk.transpose(Image.FLIP_LEFT_RIGHT)
        angle = math.radians(rng.uniform(-15, 15))
        zoom = rng.uniform(0.8, 1.4) if self.scanner else rng.uniform(0.85, 1.2)
        tx, ty = rng.uniform(-0.08, 0.08, 2) * size
        c, s_ = math.cos(angle) / zoom, math.sin(angle) / zoom
        cx = cy = size / 2
        coeffs = (c, -s_, cx - c * cx + s_ * cy - tx, s_, c, cy - s_ * cx - c * cy - ty)
        img = img.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        msk = msk.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        if self.scanner and rng.random() < 0.3:  # a scanner of lower resolution
            small = max(8, int(size * rng.uniform(0.35, 0.8)))
            img = img.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15) if self.scanner else rng.uniform(0.9, 1.1))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.5) if self.scanner else rng.uniform(0.8, 1.25))
        gamma = rng.uniform(0.5, 1.8) if self.scanner else rng.uniform(0.7, 1.4)
        img = img.point([round(255 * (v / 255) ** gamma) for v in range(256)])
        if rng.random() < (0.3 if self.scanner else 0.25):
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))
        a = np.asarray(img, dtype=np.float32) / 255
        if self.scanner:  # depth gain ramp
            a = a * (1 + rng.uniform(-0.5, 0.5) * np.linspace(-0.5, 0.5, size, dtype=np.float32))[:, None]
        a = np.clip(a * (1 + rng.uniform(0, 0.25) * rng.standard_normal(a.shape).astype(np.float32)), 0, 1)
        return a, msk

    def __getitem__(self, k: int):
        from PIL import Image
        import dataset
        i, variant = k % self.n, k // self.n
        grey, mask, cls = self._raw(i)
        size = self.size
        img = Image.fromarray(grey).resize((size, size), Image.BILINEAR)
        msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
        if variant > 0:
            self.calls += 1
            a, msk = self._augment(img, msk, np.random.default_rng((self.seed, k, self.calls)))
        else:
            a = np.asarray(img, dtype=np.float32) / 255
        x = torch.from_numpy(dataset.normalize(a * 255).astype(np.float32))[None]
        y = torch.zeros(len(dataset.LESION_CLASSES), size, size)
        if cls > 0:
            y[cls - 1] = torch.from_numpy(np.asarray(msk) >= 128).float()
        return x, y, cls


# ---------------------------------------------------------------------------------------------------------
# Inference of one shipped model (own process)
# ---------------------------------------------------------------------------------------------------------

def forward_gflop(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs per image (convolutions and matmuls, torch.utils.flop_counter), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 1, size, size))
    return fc.get_total_flops() / 1e9


def run_infer(args, checkpoint: Path, dev: torch.device) -> dict:
    """Batched images/s and single-image latency of each path of PATHS for one checkpoint."""
    import predict
    from backends import split_output
    from dataset import normalize
    from model import load_checkpoint
    res = {"load_start": loadavg(), "checkpoint": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT)
                                                     else checkpoint), "paths": {}}
    model, meta = load_checkpoint(checkpoint, "cpu")
    size, bs = int(meta["image_size"]), args.batch_size
    res.update(image_size=size, encoder=meta.get("encoder"), head=bool(meta.get("head")))
    res["gflop"] = forward_gflop(model.eval(), size)
    imgs = sample_images(size, args.infer_images)
    naive_model = model.to(dev).eval()

    def naive(batch: np.ndarray, batch_size: int, _tta: bool = False):
        with torch.no_grad():
            outs = [naive_model(normalize(torch.from_numpy(batch[i:i + batch_size]).float()).to(dev))
                    for i in range(0, len(batch), batch_size)]
        sync(dev)
        return outs

    predictors = {"naive": naive}
    for path, backend in BACKEND_OF.items():
        if path == "ONNX INT8" and args.no_int8:
            res["paths"][path] = {"skipped": "--no_int8"}
            continue
        try:
            predictors[path] = predict.load_predictor(str(checkpoint), torch.device("cpu") if "ONNX" in path
                                                      else dev, backend)[0]
        except Exception as e:  # noqa: BLE001 - e.g. INT8 without the training images to calibrate on
            res["paths"][path] = {"skipped": f"{type(e).__name__}: {e}"}
    # two blocks in which the paths take turns (A B C D, A B C D), so that a slower spell of the machine is
    # unlikely to hit one path only
    batched = {path: [] for path in predictors}
    single = {path: [] for path in predictors}
    for fn in predictors.values():
        timed(lambda: fn(imgs, bs, False), 0, 1, dev)
    for _ in range(2):
        for path, fn in predictors.items():
            batched[path] += timed(lambda: fn(imgs, bs, False), max(1, -(-args.infer_repeats // 2)), 0, dev)
            single[path] += timed(lambda: fn(imgs[:1], 1, False), max(1, -(-args.latency_runs // 2)), 1, dev)
    for path in predictors:
        res["paths"][path] = {"ips": len(imgs) / median(batched[path]), "latency_ms": 1000 * median(single[path])}
    probs = {p: torch.sigmoid(split_output(predictors[p](imgs[:4], bs, False))[0].float().cpu())
             for p in ("torch fp32", "ONNX fp32", "ONNX INT8") if p in predictors}
    if "ONNX fp32" in probs:
        res["onnx_max_prob_diff"] = float((probs["ONNX fp32"] - probs["torch fp32"]).abs().max())
    if "ONNX INT8" in probs and "ONNX fp32" in probs:
        res["int8_mean_prob_diff"] = float((probs["ONNX INT8"] - probs["ONNX fp32"]).abs().mean())
    res.update(rss_mib=peak_rss_mib(), load_end=loadavg())
    return res


# ---------------------------------------------------------------------------------------------------------
# The web page (own process)
# ---------------------------------------------------------------------------------------------------------

def run_page(args, checkpoint: Path, dev: torch.device) -> dict:
    """app.run_benchmark for each of PAGE_RUNS; the INT8 run with the uncertainty also split into its parts."""
    import app
    import predict
    res = {"load_start": loadavg(), "checkpoint": checkpoint.name, "runs": []}
    parts: dict[str, list[float]] = {}

    def clocked(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts.setdefault(name, []).append(time.perf_counter() - t)
        return wrapper

    plain = (app.decode_upload, predict.read_out, app.result_json, predict.load_predictor)
    for backend, uncertain in PAGE_RUNS:
        if backend == "onnx-int8" and args.no_int8:
            continue
        cfg = app.default_settings(checkpoint=str(checkpoint), checkpoint_dir=str(checkpoint.parent),
                                   device=str(dev), backend=backend, uncertainty=uncertain)
        split = backend == "onnx-int8" and uncertain
        if split:  # where the time of an upload goes: each step timed, the network inside the predictor
            parts.clear()
            app.decode_upload = clocked("decode", app.decode_upload)
            predict.read_out = clocked("read_out", predict.read_out)
            app.result_json = clocked("pictures and JSON", app.result_json)
            def load_clocked(*a, **k):
                predictor, meta = plain[3](*a, **k)
                return clocked("network", predictor), meta
            predict.load_predictor = load_clocked
        try:
            r = app.run_benchmark(cfg, args.page_uploads, boxes=False)
        except Exception as e:  # noqa: BLE001 - e.g. INT8 without the training images to calibrate on
            r = {"backend": backend, "uncertainty": uncertain, "skipped": f"{type(e).__name__}: {e}"}
        finally:
            app.decode_upload, predict.read_out, app.result_json, predict.load_predictor = plain
        res["runs"].append(r)
        if split and "median_s" in r:
            keep = args.page_uploads  # the warm-up upload is left out
            mean = {k: 1000 * float(np.mean(v[-keep:])) for k, v in parts.items()}
            res["parts_ms"] = {"decode": mean.get("decode", 0.0), "network": mean.get("network", 0.0),
                               "post-processing": mean.get("read_out", 0.0) - mean.get("network", 0.0),
                               "pictures and JSON": mean.get("pictures and JSON", 0.0)}
            res["parts_ms"]["HTTP and JSON transport"] = 1000 * r["mean_s"] - sum(res["parts_ms"].values())
    res.update(rss_mib=peak_rss_mib(), load_end=loadavg())
    return res


# ---------------------------------------------------------------------------------------------------------
# Training with the default's recipe (own process per path)
# ---------------------------------------------------------------------------------------------------------

def recipe_settings(args) -> dict:
    """train.py's settings of the default model's recipe (its last recipe file), the encoder without starting
    weights (no download) and, with --quick, tiny sizes."""
    import reproduce
    spec = reproduce.MODELS[reproduce.resolve("default")]
    cfg = reproduce.recipe_cfg(spec.recipes[-1])
    cfg.update(encoder_weights="", init_from="")
    if args.train_image_size:
        cfg["image_size"] = args.train_image_size
    if args.train_batch_size:
        cfg["batch_size"] = args.train_batch_size
    cfg["recipe"] = spec.recipes[-1]
    return cfg


def _train_step_fn(cfg: dict, model, batches, dev: torch.device):
    """One optimizer step as train.train_step takes it: (next batch) -> None."""
    import train
    opt = train.make_optimizer(cfg, model.parameters())
    sched = train.make_scheduler(cfg, opt, 1000)
    loss_fn = train.make_loss(cfg)
    use_amp = bool(cfg["amp"]) and dev.type == "cuda"

    def step() -> None:
        x, y, labels = batches()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
        loss = loss_fn(out, y, labels)
        if not torch.isfinite(loss):
            raise RuntimeError("loss not finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg["lr_schedule"] == "onecycle":
            sched.step()
        float(loss.detach())
    return step


def run_train_project(args, dev: torch.device) -> dict:
    """The recipe's path: train.make_batch (in-memory uint8 set, batched augmentation) and train.py's step."""
    import train
    from augment import AugmentConfig, expanded_order
    cfg = recipe_settings(args)
    res = {"load_start": loadavg()}
    images, targets, labels, res["decode_s"] = project_data(args, cfg["image_size"])
    images, targets, labels = images.to(dev), targets.to(dev), labels.to(dev)
    bs, aug = cfg["batch_size"], AugmentConfig.preset(cfg["augment"])
    idx_all, var_all = expanded_order(len(images), max(2, cfg["expand"]), train.epoch_generator(args.seed, 1))
    n_batches = len(idx_all) // bs
    counter = iter(range(10 ** 9))

    def batch():
        b = next(counter) % n_batches
        idx, var = idx_all[b * bs:(b + 1) * bs], var_all[b * bs:(b + 1) * bs]
        x, y = train.make_batch(idx, var, train.epoch_generator(args.seed, 1, b), images, targets,
                                cfg["channels_last"], aug)
        return x, y, labels[idx.to(dev)]

    res["pipeline_ips"] = bs / median(timed(batch, args.pipeline_batches, 1, dev))
    torch.manual_seed(args.seed)
    model = train.make_model(cfg).to(dev).train()
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    step = _train_step_fn(cfg, model, batch, dev)
    res["train_ips"] = bs / median(timed(step, args.train_steps, args.warmup, dev))
    res.update(rss_mib=peak_rss_mib(), load_end=loadavg(), n_images=len(images), batch_size=bs,
               image_size=cfg["image_size"], encoder=cfg["encoder"], recipe=cfg["recipe"],
               channels_last=bool(cfg["channels_last"]))
    res["train_gflop"] = train_gflop(cfg)
    return res


def train_gflop(cfg: dict) -> float:
    """Forward + backward FLOPs per training image of the recipe's model, in GFLOP: 3 x the forward's (the backward
    computes the gradients of the inputs and of the weights, each a forward's worth). torch.utils.flop_counter
    agrees for plain convolutions but counts the backward of depthwise ones as if they were dense (8.6 x the
    forward for EfficientNet-Lite0)."""
    import train
    return 3 * forward_gflop(train.make_model(cfg).eval(), cfg["image_size"])


def run_train_naive(args, dev: torch.device) -> dict:
    """The naive loop: per-sample Dataset with PIL augmentation, DataLoader(num_workers=0), contiguous tensors,
    the recipe's model, loss and optimizer."""
    import train
    cfg = recipe_settings(args)
    res = {"load_start": loadavg()}
    size, bs = cfg["image_size"], cfg["batch_size"]
    scanner = cfg["augment"] == "scanner"
    if args.data_dir:
        ds = NaiveDataset(size, max(2, cfg["expand"]), args.seed, samples=busi_samples(args.data_dir, args.n_images),
                          scanner=scanner)
    else:
        imgs, masks, labels = synthetic_set(args.n_images, size, args.seed)
        ds = NaiveDataset(size, max(2, cfg["expand"]), args.seed, images=imgs, masks=masks, labels=labels,
                          scanner=scanner)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    it = iter(())

    def batch():
        nonlocal it
        try:
            x, y, c = next(it)
        except StopIteration:
            it = iter(loader)
            x, y, c = next(it)
        return x.to(dev), y.to(dev), c.to(dev)

    res["pipeline_ips"] = bs / median(timed(batch, args.pipeline_batches, 1, dev))
    torch.manual_seed(args.seed)
    model = train.make_model(cfg).to(dev).train()
    step = _train_step_fn(cfg, model, batch, dev)
    res["train_ips"] = bs / median(timed(step, args.train_steps, args.warmup, dev))
    res.update(rss_mib=peak_rss_mib(), load_end=loadavg())
    return res


# ---------------------------------------------------------------------------------------------------------
# Ceiling (main process)
# ---------------------------------------------------------------------------------------------------------

def ceiling(args, dev: torch.device) -> dict:
    """GFLOP/s of a large sgemm (numpy, torch) and of a large 3x3 convolution (oneDNN on the CPU)."""
    import torch.nn.functional as F
    n, reps = args.sgemm_n, args.ceiling_reps
    flop = 2 * n ** 3
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    try:  # numpy's BLAS gets the same number of threads as torch (threadpoolctl comes with scikit-learn)
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(torch.get_num_threads(), user_api="blas")
    except ImportError:
        import contextlib
        limit = contextlib.nullcontext()
    with limit:
        out = {"numpy_sgemm": flop / min(timed(lambda: a @ b, reps, 1)) / 1e9}
    ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
    out["torch_sgemm"] = flop / min(timed(lambda: ta @ tb, reps, 1, dev)) / 1e9
    c, hw, nb = args.conv_channels, args.conv_size, 8
    x = torch.randn(nb, c, hw, hw, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        best = min(timed(lambda: F.conv2d(x, w, padding=1), reps, 1, dev))
    out["conv3x3"] = 2 * nb * c * hw * hw * c * 9 / best / 1e9
    return out


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------

def run_worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    kind, _, arg = args.worker.partition(":")
    if kind == "infer":
        res = run_infer(args, Path(arg), dev)
    elif kind == "page":
        res = run_page(args, Path(arg), dev)
    elif kind == "train_project":
        res = run_train_project(args, dev)
    elif kind == "train_naive":
        res = run_train_naive(args, dev)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    print(RESULT_TAG + json.dumps(res), flush=True)


def spawn(name: str, argv: list[str], args) -> dict:
    """A worker's result: in this process (--in_process, --quick), else in a process of its own."""
    if args.in_process:
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run_worker(argparse.Namespace(**{**vars(args), "worker": name}))
        text = buf.getvalue()
    else:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name],
                              capture_output=True, text=True, cwd=str(ROOT))
        text = proc.stdout
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"bench.py: the {name} run failed (exit {proc.returncode})")
    for line in text.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit(f"bench.py: the {name} run printed no result")


def fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(args, dev: torch.device, ceil: dict, infer: list[dict], page: dict | None, train_p: dict | None,
           train_n: dict | None) -> dict:
    """Print the tables and the targets; returns the targets' verdicts."""
    top = max(ceil["numpy_sgemm"], ceil["torch_sgemm"], ceil["conv3x3"])
    print(f"machine: {cpu_name()} ({cpu_int8_flags()}), {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads{', ' + torch.cuda.get_device_name() if dev.type == 'cuda' else ''}), "
          f"onnxruntime {_ort_version()}, device {dev.type}")
    parts = [(f"infer {Path(r['checkpoint']).stem}", r) for r in infer] + \
            [(n, r) for n, r in (("page", page), ("train project", train_p), ("train naive", train_n)) if r]
    print("load average (1/5/15 min; start -> end of each part): "
          + "; ".join(f"{n} {r['load_start']} -> {r['load_end']}" for n, r in parts))
    busy = max([float(r[k].split("/")[0]) for _, r in parts for k in ("load_start", "load_end") if r[k] != "n/a"]
               or [0.0])
    if busy > (os.cpu_count() or 1) + 0.5:
        print(f"WARNING: the load average reached {busy:.1f} on {os.cpu_count()} CPUs: other processes took CPU "
              f"time from this run, so its rates are low and noisy; rerun on a quiet machine")
    print(f"compute ceiling: numpy sgemm {ceil['numpy_sgemm']:.0f} GFLOP/s, torch sgemm {ceil['torch_sgemm']:.0f}, "
          f"oneDNN conv3x3 {ceil['conv3x3']:.0f} (n={args.sgemm_n}, best of {args.ceiling_reps}); best {top:.0f}")
    print()
    print(f"| model (input, fp32 GFLOP/image) | path | batched images/s (batch {args.batch_size}) | vs naive | "
          f"vs ONNX fp32 | single-image latency ms | vs naive | vs ONNX fp32 | GFLOP/s (% of ceiling) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in infer:
        label = f"{Path(r['checkpoint']).stem} ({r['image_size']} px, {r['gflop']:.2f})"
        p = r["paths"]
        naive, onnx = p.get("naive", {}), p.get("ONNX fp32", {})
        for path in PATHS:
            q = p.get(path, {})
            if "skipped" in q:
                print(f"| {label} | {path} | skipped: {q['skipped'][:120]} | | | | | | |")
                continue
            ips, lat = q.get("ips"), q.get("latency_ms")
            gfs = ips * r["gflop"] if ips else None
            print(f"| {label} | {path} | {fmt(ips, 1)} | {ratio(ips, naive.get('ips'))} | "
                  f"{ratio(ips, onnx.get('ips')) if path != 'ONNX fp32' else '-'} | {fmt(lat, 1)} | "
                  f"{ratio(naive.get('latency_ms'), lat)} | "
                  f"{ratio(onnx.get('latency_ms'), lat) if path != 'ONNX fp32' else '-'} | "
                  f"{fmt(gfs, 0)} ({fmt(100 * gfs / top if gfs else None, 0)}%) |")
    diffs = "; ".join(f"{Path(r['checkpoint']).stem}: ONNX fp32 vs torch max {fmt(r.get('onnx_max_prob_diff'), 6)}"
                      f", INT8 vs fp32 mean {fmt(r.get('int8_mean_prob_diff'), 4)}" for r in infer)
    print(f"probability differences on 4 images: {diffs}")
    print()
    if page:
        print(f"| page: upload to result of a 500x500 scan, {page['checkpoint']} | median s | best s |")
        print("|---|---|---|")
        for r in page["runs"]:
            what = f"{r['backend']}, {'with' if r['uncertainty'] else 'without'} the uncertainty"
            if "skipped" in r:
                print(f"| {what} | skipped: {r['skipped'][:120]} | |")
            else:
                print(f"| {what} | {r['median_s']:.3f} | {r['best_s']:.3f} |")
        if page.get("parts_ms"):
            print("where an upload's time goes (onnx-int8, with the uncertainty; means, ms): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in page["parts_ms"].items()))
        print()
    if train_p:
        tf = train_p["train_gflop"]
        print(f"| training: {train_p['recipe']} ({train_p['encoder']}, {train_p['image_size']} px, batch "
              f"{train_p['batch_size']}, {train_p['n_images']} {'BUSI' if args.data_dir else 'phantom'} images) | "
              f"images/s | vs naive | GFLOP/s (% of ceiling) | data pipeline images/s | peak memory MiB |")
        print("|---|---|---|---|---|---|")
        for name, r in (("recipe's path (train.py)", train_p), ("naive loop", train_n)):
            if r:
                g = r["train_ips"] * tf
                vs = ratio(r["train_ips"], train_n["train_ips"]) if train_n else "-"
                print(f"| {name} | {r['train_ips']:.2f} | {vs} | {g:.0f} ({100 * g / top:.0f}%) | "
                      f"{r['pipeline_ips']:.1f} | {r['rss_mib']:.0f} |")
        print(f"(training: {tf:.2f} GFLOP per image, forward and backward: 3 x the forward)")
        print()
    return judge(args, dev, infer, page, train_p, train_n)


def _ort_version() -> str:
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return "absent"


def judge(args, dev: torch.device, infer: list[dict], page: dict | None, train_p: dict | None,
          train_n: dict | None) -> dict:
    """The issue's targets, judged for the default model on the CPU."""
    default = next((r for r in infer if Path(r["checkpoint"]).name == default_checkpoint().name), None)
    if args.quick or dev.type != "cpu" or default is None:
        print("targets: not judged (they are for the default model on the CPU, without --quick)")
        return {}
    ok = lambda c: "met" if c else "NOT met"
    out, lines = {}, []
    p = default["paths"]
    q8, q32 = p.get("ONNX INT8", {}), p.get("ONNX fp32", {})
    if "ips" in q8 and "ips" in q32:
        b, l_ = q8["ips"] / q32["ips"], q32["latency_ms"] / q8["latency_ms"]
        out.update(int8_batched_x=b, int8_latency_x=l_)
        lines += [f"INT8 batched >= {TARGETS['int8_batched_x']}x ONNX fp32 {ok(b >= TARGETS['int8_batched_x'])} "
                  f"({b:.2f}x)", f"INT8 latency >= {TARGETS['int8_latency_x']}x {ok(l_ >= TARGETS['int8_latency_x'])} "
                  f"({l_:.2f}x)"]
    run = next((r for r in (page or {}).get("runs", []) if r["backend"] == "onnx-int8" and r["uncertainty"]
                and "median_s" in r), None)
    if run:
        out["page_s"] = run["median_s"]
        lines.append(f"page with the uncertainty (INT8) <= {TARGETS['page_s']} s "
                     f"{ok(run['median_s'] <= TARGETS['page_s'])} ({run['median_s']:.3f} s)")
    if train_p and train_n:
        x = train_p["train_ips"] / train_n["train_ips"]
        out["train_x"] = x
        lines.append(f"training >= {TARGETS['train_x']}x naive {ok(x >= TARGETS['train_x'])} ({x:.2f}x)")
    print(f"targets: {', '.join(lines) if lines else 'nothing measured to judge'}")
    return out


def quick_checkpoint(folder: Path) -> Path:
    """A tiny random-weight checkpoint (ResNet18 UNet, 64 px) with a phantom training set and split, so that
    every path (INT8 calibration included) runs in seconds."""
    import dataset
    from model import build_model, save_checkpoint
    from phantom import write_busi_tree
    tree = write_busi_tree(folder / "phantoms", per_class=4, height=48, width=60, seed=3)
    samples = dataset.discover(str(tree))
    split_path = folder / "split.json"
    dataset.save_json_atomic(split_path, dataset.make_split(samples, 0.25, 0))
    torch.manual_seed(0)
    model = build_model("resnet18", None, len(dataset.LESION_CLASSES), 1)
    meta = {**dataset.preprocessing_meta(64), "encoder": "resnet18", "classes": len(dataset.LESION_CLASSES),
            "threshold": 0.5, "epoch": 0, "split_file": str(split_path), "fold": 0,
            "train_config": {"data_dir": str(tree)}}
    path = folder / "quick.safetensors"
    save_checkpoint(path, model.eval(), meta)
    return path


QUICK = dict(threads=1, n_images=6, warmup=1, train_steps=2, infer_images=4, infer_repeats=1, latency_runs=2,
             pipeline_batches=2, page_uploads=1, sgemm_n=256, ceiling_reps=2, conv_channels=16, conv_size=32,
             train_image_size=64, train_batch_size=2, batch_size=2)


def parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="all", help="shipped models to time: all, or names as reproduce.py takes "
                                                    "them (default, busi_unet_resnet18, ...), comma-separated")
    ap.add_argument("--checkpoint", default="", help="time these .safetensors files instead (comma-separated; the "
                                                     "page uses the first)")
    ap.add_argument("--data_dir", default="", help="BUSI folder for the training part (default: synthetic phantoms)")
    ap.add_argument("--n_images", type=int, default=48, help="images in the training set (BUSI: spread over the "
                                                             "listing; <= 0: all)")
    ap.add_argument("--batch_size", type=int, default=8, help="inference batch")
    ap.add_argument("--infer_images", type=int, default=32, help="images per batched-inference pass")
    ap.add_argument("--infer_repeats", type=int, default=6, help="timed batched-inference passes per path")
    ap.add_argument("--latency_runs", type=int, default=16, help="timed single-image predictions per path")
    ap.add_argument("--page_uploads", type=int, default=10, help="timed uploads per page configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    ap.add_argument("--train_steps", type=int, default=8, help="timed training steps")
    ap.add_argument("--pipeline_batches", type=int, default=10, help="timed batches of each data pipeline alone")
    ap.add_argument("--train_image_size", type=int, default=0, help="training image size (0: the recipe's)")
    ap.add_argument("--train_batch_size", type=int, default=0, help="training batch (0: the recipe's)")
    ap.add_argument("--sgemm_n", type=int, default=2048, help="matrix size of the sgemm ceiling")
    ap.add_argument("--ceiling_reps", type=int, default=5)
    ap.add_argument("--conv_channels", type=int, default=64)
    ap.add_argument("--conv_size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda (ONNX Runtime: always CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_int8", action="store_true", help="skip the INT8 paths")
    ap.add_argument("--no_page", action="store_true", help="skip the web page")
    ap.add_argument("--no_train", action="store_true", help="skip training")
    ap.add_argument("--in_process", action="store_true", help="run the parts in this process (peak memory is "
                                                              "then cumulative)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="tiny settings and a tiny model, one process: a smoke test")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in ap._actions}
        for k, v in QUICK.items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
        args.in_process = True  # one interpreter: seconds, not a process start per part
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoints = [Path(c).resolve() for c in args.checkpoint.split(",")]
        elif args.quick:
            checkpoints = [quick_checkpoint(Path(tmp))]
        else:
            checkpoints = shipped_checkpoints(args.models)
        print(f"bench.py: load average at start {loadavg()}; ceiling ...", file=sys.stderr, flush=True)
        ceil = ceiling(args, dev)
        infer = []
        for ck in checkpoints:
            print(f"bench.py: inference of {ck.name} ... (load {loadavg()})", file=sys.stderr, flush=True)
            infer.append(spawn(f"infer:{ck}", argv, args))
        page_ck = checkpoints[0] if (args.checkpoint or args.quick) else default_checkpoint()
        page = None
        if not args.no_page:
            print(f"bench.py: page ... (load {loadavg()})", file=sys.stderr, flush=True)
            page = spawn(f"page:{page_ck}", argv, args)
        train_p = train_n = None
        if not args.no_train:
            print(f"bench.py: training ... (load {loadavg()})", file=sys.stderr, flush=True)
            train_p = spawn("train_project", argv, args)
            train_n = spawn("train_naive", argv, args)
        verdicts = report(args, dev, ceil, infer, page, train_p, train_n)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ceiling": ceil, "inference": infer, "page": page,
                                               "train_project": train_p, "train_naive": train_n,
                                               "targets": verdicts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
