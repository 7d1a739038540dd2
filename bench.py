"""Speed of training, inference and the data pipeline, against a naive baseline and the machine's ceiling.

    python bench.py                                  # synthetic phantoms, 256x256, batch 8 (a few minutes on 2 cores)
    python bench.py --data_dir ../shared/data/BUSI   # the real images (a subset: --n_images)
    python bench.py --cpu_bf16                       # also the project path with bf16 autocast on the CPU (AMX)
    python bench.py --compile                        # also the project path under torch.compile (compile time counted)
    python bench.py --quick                          # tiny settings, one process, seconds (used by the tests)

It prints, from one run on one machine, a markdown table:
  (a) the project's path: the whole set in memory as one uint8 tensor, batches augmented with tensor ops
      (train.make_batch -> augment.augment_batch), channels_last, the optimizer step; inference through
      predict.predict_logits (inference_mode, channels_last) and through ONNX Runtime;
  (b) a naive baseline: eager PyTorch, contiguous tensors, a per-sample Dataset + DataLoader(num_workers=0)
      with on-the-fly PIL augmentation (with --data_dir it also decodes every file on every access);
and a/b; then the measured compute ceiling (a large sgemm with numpy and torch, and a large oneDNN 3x3
convolution), the model's FLOPs per image (torch.utils.flop_counter) and the fraction of the ceiling reached.
Each path runs in its own process, so its peak memory (ru_maxrss; torch.cuda.max_memory_allocated on CUDA)
is its own. Throughputs are the median over timed batches, after warm-up. The load average is printed with
each path: on a shared machine the numbers are only as good as the quiet they were measured in.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "BENCH_RESULT "
# Every line bench.py promises to print (the tests check them).
LINES = ("machine:", "load average", "compute ceiling:", "model FLOPs per image:", "| training images/s",
         "| batched inference images/s", "| single-image latency ms", "| data pipeline images/s",
         "| peak memory MiB", "fraction of the ceiling:", "CPU seconds per image", "original recipe", "targets:")
TARGETS = {"train": 2.9, "infer": 11.0, "latency_ms": 150.0, "pipeline_x": 10.0, "gpu_recipe_min": 10.0}
BUSI_TRAIN_IMAGES = 624  # BUSI's 780 images less duplicates, 80 % for training (the original recipe's split)


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


_LAST_CPU: list[float] = []


def timed(fn, n: int, warmup: int, dev: torch.device) -> list[float]:
    """Wall seconds of each of n calls of fn after `warmup` untimed calls (their process CPU seconds, all
    threads, go to last_cpu())."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    _LAST_CPU[:] = cpu
    return out


def last_cpu() -> float:
    """Median process CPU seconds of the calls timed last."""
    return median(_LAST_CPU)


def median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def peak_memory_mib(dev: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10
    out = {"rss_mib": rss_mib}
    if dev.type == "cuda":
        out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


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


def has_cpu_bf16() -> bool:
    """bf16 matrix units (AMX) or AVX512-BF16: bf16 autocast can pay on this CPU."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

def synthetic_set(n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """n phantoms at a non-square 'native' resolution (1.25 x wider than tall, like scans): images, masks, classes."""
    from phantom import make_phantom
    from dataset import CLASS_NAMES
    imgs, masks, labels = [], [], []
    for i in range(n):
        label = CLASS_NAMES[i % 3]
        img, mask = make_phantom(label, size, int(size * 1.25), seed=seed + i)
        imgs.append(img); masks.append(mask); labels.append(i % 3)
    return imgs, masks, labels


def busi_samples(data_dir: str, n: int) -> list:
    """n samples spread evenly over the sorted BUSI listing (all classes), or all when n <= 0."""
    import dataset
    samples = dataset.discover(data_dir)
    if 0 < n < len(samples):
        step = len(samples) / n
        samples = [samples[int(i * step)] for i in range(n)]
    return samples


def project_data(args) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The whole set preprocessed once into memory: (uint8 N x 1 x S x S, uint8 N x C x S x S, seconds)."""
    import dataset
    t = time.perf_counter()
    if args.data_dir:
        loaded = dataset.load_set(busi_samples(args.data_dir, args.n_images), args.image_size)
        images, targets = loaded.images, loaded.targets
    else:
        imgs, masks, labels = synthetic_set(args.n_images, args.image_size, args.seed)
        images = np.stack([dataset.resize_image(im, args.image_size)[None] for im in imgs])
        targets = np.zeros((len(imgs), len(dataset.LESION_CLASSES), args.image_size, args.image_size), np.uint8)
        for i, (m, c) in enumerate(zip(masks, labels)):
            if c > 0:
                targets[i, c - 1] = dataset.resize_mask(m, args.image_size)
    return torch.as_tensor(images), torch.as_tensor(targets), time.perf_counter() - t


class NaiveDataset(torch.utils.data.Dataset):
    """The usual per-sample Dataset: each item resized and augmented with PIL on the fly (decoded from its
    files on every access when built from BUSI samples). Variant 0 of each image is left unaugmented."""

    def __init__(self, size: int, expand: int, seed: int, samples=None, images=None, masks=None, labels=None):
        self.size, self.expand, self.seed = size, expand, seed
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
            return grey, mask, (s.lesion_index + 1) if s.lesion_index is not None else 0
        return self.images[i], self.masks[i], self.labels[i]

    def __getitem__(self, k: int):
        from PIL import Image, ImageEnhance, ImageFilter
        import dataset
        i, variant = k % self.n, k // self.n
        grey, mask, cls = self._raw(i)
        size = self.size
        img = Image.fromarray(grey).resize((size, size), Image.BILINEAR)
        msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
        if variant > 0:
            rng = np.random.default_rng((self.seed, k, self.calls))
            self.calls += 1
            if rng.random() < 0.5:
                img, msk = img.transpose(Image.FLIP_LEFT_RIGHT), msk.transpose(Image.FLIP_LEFT_RIGHT)
            angle = math.radians(rng.uniform(-15, 15))
            zoom = rng.uniform(0.85, 1.2)
            tx, ty = rng.uniform(-0.08, 0.08, 2) * size
            c, s_ = math.cos(angle) / zoom, math.sin(angle) / zoom
            cx = cy = size / 2
            coeffs = (c, -s_, cx - c * cx + s_ * cy - tx, s_, c, cy - s_ * cx - c * cy - ty)
            img = img.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
            msk = msk.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.25))
            gamma = rng.uniform(0.7, 1.4)
            img = img.point([round(255 * (v / 255) ** gamma) for v in range(256)])
            if rng.random() < 0.25:
                img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
            a = np.asarray(img, dtype=np.float32) / 255
            a = np.clip(a * (1 + rng.uniform(0, 0.15) * rng.standard_normal(a.shape).astype(np.float32)), 0, 1)
        else:
            a = np.asarray(img, dtype=np.float32) / 255
        x = torch.from_numpy(dataset.normalize(a * 255).astype(np.float32))[None]
        y = torch.zeros(len(dataset.LESION_CLASSES), size, size)
        if cls > 0:
            y[cls - 1] = torch.from_numpy(np.asarray(msk) >= 128).float()
        return x, y


def naive_dataset(args, expand: int) -> NaiveDataset:
    if args.data_dir:
        return NaiveDataset(args.image_size, expand, args.seed, samples=busi_samples(args.data_dir, args.n_images))
    imgs, masks, labels = synthetic_set(args.n_images, args.image_size, args.seed)
    return NaiveDataset(args.image_size, expand, args.seed, images=imgs, masks=masks, labels=labels)


# ---------------------------------------------------------------------------------------------------------
# The paths (each runs in its own process)
# ---------------------------------------------------------------------------------------------------------

def new_model(args, dev: torch.device, channels_last: bool):
    from model import build_model
    import dataset
    torch.manual_seed(args.seed)
    model = build_model(args.encoder, None, len(dataset.LESION_CLASSES), 1).to(dev)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def run_project(args, dev: torch.device, variant: str) -> dict:
    """The project's path: train.make_batch + the training step of train.py; predict.predict_logits."""
    import train
    from augment import expanded_order
    from backends import predict_logits
    bf16 = variant == "bf16"
    use_amp = dev.type == "cuda" or bf16           # train.py: bf16 autocast on CUDA; here also on the CPU if asked
    amp_dev = dev.type
    res = {"load_start": loadavg()}
    images, targets, res["decode_s"] = project_data(args)
    images_dev, targets_dev = images.to(dev), targets.to(dev)
    n, bs = len(images), args.batch_size
    epoch_g = train.epoch_generator(args.seed, 1)
    idx_all, var_all = expanded_order(n, args.expand, epoch_g)
    n_batches = len(idx_all) // bs

    def batch(b: int):
        sel = slice((b % n_batches) * bs, (b % n_batches) * bs + bs)
        return train.make_batch(idx_all[sel], var_all[sel], train.epoch_generator(args.seed, 1, b), images_dev,
                                targets_dev, True)

    # data pipeline alone (what the model waits for)
    counter = iter(range(10 ** 9))
    ts = timed(lambda: batch(next(counter)), args.pipeline_batches, 1, dev)
    res["pipeline_ips"] = bs / median(ts)

    # training step, as in train.py's loop
    model = new_model(args, dev, True).train()
    cfg = {"optimizer": "rmsprop", "lr": 1e-3, "weight_decay": 0.0}
    opt = train.make_optimizer(cfg, model.parameters())
    step_model = model
    if variant == "compile":
        step_model = torch.compile(model)

    def step() -> None:
        x, y = batch(next(counter))
        with torch.autocast(amp_dev, dtype=torch.bfloat16, enabled=use_amp):
            logits = step_model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        if not torch.isfinite(loss):
            raise RuntimeError("loss not finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())

    if variant == "compile":
        t = time.perf_counter()
        step()
        sync(dev)
        res["compile_s"] = time.perf_counter() - t
    ts = timed(step, args.train_steps, args.warmup, dev)
    res["train_ips"] = bs / median(ts)
    res["train_cpu_s"] = last_cpu() / bs
    res["train_steps"] = len(ts)

    # inference
    model.eval()
    infer_model = model
    if variant == "compile":
        t = time.perf_counter()
        infer_model = torch.compile(model)
        with torch.inference_mode():
            infer_model(torch.zeros(bs, 1, args.image_size, args.image_size, device=dev).contiguous(
                memory_format=torch.channels_last))
        res["compile_infer_s"] = time.perf_counter() - t
    imgs = images[torch.arange(args.infer_images) % n]

    def infer(batch_images, batch_size, channels_last=True):
        with torch.autocast(amp_dev, dtype=torch.bfloat16, enabled=use_amp):
            return predict_logits(infer_model, batch_images, dev, batch_size, False, channels_last)

    ts = timed(lambda: infer(imgs, bs), max(1, args.infer_repeats), 1, dev)
    res["infer_ips"] = len(imgs) / median(ts)
    res["infer_cpu_s"] = last_cpu() / len(imgs)
    ts = timed(lambda: infer(imgs[:1], 1), args.latency_runs, 2, dev)
    res["latency_ms"] = 1000 * median(ts)
    if variant == "fp32":
        model_c = model.to(memory_format=torch.contiguous_format)
        infer_model = model_c
        ts = timed(lambda: infer(imgs, bs, False), max(1, args.infer_repeats), 1, dev)
        res["infer_contiguous_ips"] = len(imgs) / median(ts)
        ts = timed(lambda: infer(imgs[:1], 1, False), args.latency_runs, 2, dev)
        res["latency_contiguous_ms"] = 1000 * median(ts)
    res.update(memory=peak_memory_mib(dev), load_end=loadavg(), n_images=n)
    return res


def run_naive(args, dev: torch.device) -> dict:
    """The naive baseline: per-sample Dataset with PIL augmentation, DataLoader(num_workers=0), eager,
    contiguous tensors; inference in no_grad on contiguous batches."""
    res = {"load_start": loadavg()}
    bs = args.batch_size
    ds = naive_dataset(args, args.expand)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, drop_last=True,
                                         generator=g)
    it = iter(())

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    ts = timed(next_batch, args.pipeline_batches, 1, dev)
    res["pipeline_ips"] = bs / median(ts)

    model = new_model(args, dev, False).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)

    def step() -> None:
        x, y = next_batch()
        x, y = x.to(dev), y.to(dev)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        float(loss.detach())

    ts = timed(step, args.train_steps, args.warmup, dev)
    res["train_ips"] = bs / median(ts)
    res["train_cpu_s"] = last_cpu() / bs

    model.eval()
    plain = NaiveDataset(args.image_size, 1, args.seed, images=ds.images, masks=ds.masks, labels=ds.labels,
                         samples=ds.samples)
    items = [plain[i % len(plain)][0] for i in range(args.infer_images)]  # decoded once: inference alone

    def infer(xs: list[torch.Tensor], batch_size: int) -> None:
        with torch.no_grad():
            for i in range(0, len(xs), batch_size):
                model(torch.stack(xs[i:i + batch_size]).to(dev)).cpu()

    ts = timed(lambda: infer(items, bs), max(1, args.infer_repeats), 1, dev)
    res["infer_ips"] = len(items) / median(ts)
    res["infer_cpu_s"] = last_cpu() / len(items)
    ts = timed(lambda: infer(items[:1], 1), args.latency_runs, 2, dev)
    res["latency_ms"] = 1000 * median(ts)
    res.update(memory=peak_memory_mib(dev), load_end=loadavg())
    return res


def run_onnx(args, dev: torch.device) -> dict:
    """ONNX Runtime (CPU) inference of the same model, through export_onnx's predictor."""
    import backends
    import export_onnx
    from backends import predict_logits
    res = {"load_start": loadavg()}
    images, _, _ = project_data(args)
    n, bs = len(images), args.batch_size
    model = new_model(args, torch.device("cpu"), False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = export_onnx.export_model(model, Path(tmp) / "bench.onnx", args.image_size)
        res["export_s"] = time.perf_counter() - t
        session = backends.make_session(path, args.threads)
    predictor = backends.session_predictor(session)
    imgs = images[torch.arange(args.infer_images) % n]
    ref = torch.sigmoid(predict_logits(model, imgs[:2], torch.device("cpu"), bs, False, False))
    res["max_prob_diff"] = float((torch.sigmoid(predictor(imgs[:2], bs, False)) - ref).abs().max())
    ts = timed(lambda: predictor(imgs, bs, False), max(1, args.infer_repeats), 1, dev)
    res["infer_ips"] = len(imgs) / median(ts)
    res["infer_cpu_s"] = last_cpu() / len(imgs)
    ts = timed(lambda: predictor(imgs[:1], 1, False), args.latency_runs, 2, dev)
    res["latency_ms"] = 1000 * median(ts)
    res.update(memory=peak_memory_mib(torch.device("cpu")), load_end=loadavg())
    return res


# ---------------------------------------------------------------------------------------------------------
# Ceiling and FLOPs (main process)
# ---------------------------------------------------------------------------------------------------------

def ceiling(args, dev: torch.device) -> dict:
    """GFLOP/s of a large sgemm (numpy, torch) and of a large 3x3 convolution (oneDNN on the CPU)."""
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
        out = {"numpy_sgemm": flop / min(timed(lambda: a @ b, reps, 1, torch.device("cpu"))) / 1e9}
    ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
    out["torch_sgemm"] = flop / min(timed(lambda: ta @ tb, reps, 1, dev)) / 1e9
    if args.cpu_bf16 or dev.type == "cuda":
        ha, hb = ta.bfloat16(), tb.bfloat16()
        out["torch_bf16_gemm"] = flop / min(timed(lambda: ha @ hb, reps, 1, dev)) / 1e9
    c, hw, nb = args.conv_channels, args.conv_size, 8
    x = torch.randn(nb, c, hw, hw, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out["conv3x3"] = 2 * nb * c * hw * hw * c * 9 / min(
            timed(lambda: F.conv2d(x, w, padding=1), reps, 1, dev)) / 1e9
    return out


def model_flops(args) -> dict:
    """Forward and forward+backward FLOPs per image (convolutions and matmuls, torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = new_model(args, torch.device("cpu"), False)
    s = args.image_size
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 1, s, s))
    fwd = fc.get_total_flops()
    model.train()
    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(2, 1, s, s)).sum().backward()
    return {"forward_gflop": fwd / 1e9, "train_gflop": fc.get_total_flops() / 2 / 1e9}


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------

def run_worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    name = args.worker
    if name.startswith("project"):
        res = run_project(args, dev, name.partition("_")[2] or "fp32")
    elif name == "naive":
        res = run_naive(args, dev)
    elif name == "onnx":
        res = run_onnx(args, dev)
    else:
        raise SystemExit(f"unknown worker {name}")
    print(RESULT_TAG + json.dumps(res), flush=True)


def spawn(name: str, argv: list[str], in_process: bool, args) -> dict:
    if in_process:
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run_worker(argparse.Namespace(**{**vars(args), "worker": name}))
        text = buf.getvalue()
    else:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv],
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


def report(args, dev, ceil: dict, flops: dict, r: dict) -> dict:
    p, nv, ox = r["project"], r.get("naive"), r.get("onnx")
    extras = {k: v for k, v in r.items() if k.startswith("project_")}
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads"
          f"{', ' + torch.cuda.get_device_name() if dev.type == 'cuda' else ''}), device {dev.type}, "
          f"data {'BUSI ' + args.data_dir if args.data_dir else 'synthetic phantoms'} ({p['n_images']} images), "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, expand {args.expand}")
    loads = "; ".join(f"{k} {v['load_start']} -> {v['load_end']}" for k, v in r.items())
    print(f"load average (1/5/15 min; start -> end of each path): {loads}")
    busy = max(float(v[k].split("/")[0]) for v in r.values() for k in ("load_start", "load_end")
               if v[k] != "n/a") if r else 0.0
    if busy > (os.cpu_count() or 1) + 0.5:
        print(f"WARNING: the load average reached {busy:.1f} on {os.cpu_count()} CPUs: other processes took CPU "
              f"time from this run, so its rates are low and noisy; rerun on a quiet machine")
    top = max(ceil["numpy_sgemm"], ceil["torch_sgemm"])
    extra_ceil = f", torch bf16 gemm {ceil['torch_bf16_gemm']:.0f}" if "torch_bf16_gemm" in ceil else ""
    nominal = f"; nominal peak {args.peak_gflops:.0f} (given)" if args.peak_gflops else ""
    print(f"compute ceiling: numpy sgemm {ceil['numpy_sgemm']:.0f} GFLOP/s, torch sgemm {ceil['torch_sgemm']:.0f}"
          f", oneDNN conv3x3 {ceil['conv3x3']:.0f}{extra_ceil} (n={args.sgemm_n}, best of {args.ceiling_reps})"
          f"{nominal}")
    print(f"model FLOPs per image: forward {flops['forward_gflop']:.2f} GFLOP, forward+backward "
          f"{flops['train_gflop']:.2f} GFLOP ({args.encoder} UNet, {args.image_size}px)")
    cols = ["project (a)", "naive (b)", "a/b speed-up"] + [f"{k} ({'bf16 autocast' if k.endswith('bf16') else k[8:]})"
                                                 for k in extras] + ["project, contiguous", "ONNX Runtime"]
    print()
    print("| metric | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    nvg = lambda k: nv.get(k) if nv else None
    oxg = lambda k: ox.get(k) if ox else None

    def row(label, key, digits=2, contiguous_key=None, onnx_key=None, lower_better=False):
        a, b = p.get(key), nvg(key)
        rat = ratio(b, a) if lower_better else ratio(a, b)
        cells = [fmt(a, digits), fmt(b, digits), rat] + [fmt(e.get(key), digits) for e in extras.values()]
        cells += [fmt(p.get(contiguous_key), digits) if contiguous_key else "-",
                  fmt(oxg(onnx_key), digits) if onnx_key else "-"]
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("training images/s", "train_ips")
    row("batched inference images/s", "infer_ips", contiguous_key="infer_contiguous_ips", onnx_key="infer_ips")
    row("single-image latency ms", "latency_ms", 1, "latency_contiguous_ms", "latency_ms", lower_better=True)
    row("data pipeline images/s", "pipeline_ips", 1)
    mem = lambda d: d["memory"]["rss_mib"] if d else None
    cells = [fmt(mem(p), 0), fmt(mem(nv), 0), "-"] + [fmt(mem(e), 0) for e in extras.values()] + ["-", fmt(mem(ox), 0)]
    print("| peak memory MiB | " + " | ".join(cells) + " |")
    if dev.type == "cuda":
        cm = lambda d: d["memory"].get("cuda_mib") if d else None
        cells = [fmt(cm(p), 0), fmt(cm(nv), 0), "-"] + [fmt(cm(e), 0) for e in extras.values()] + ["-", "-"]
        print("| peak CUDA memory MiB | " + " | ".join(cells) + " |")
    print()
    tf, ff = flops["train_gflop"], flops["forward_gflop"]
    frac = lambda ips, f, c: f"{100 * ips * f / c:.0f}%"
    line = (f"fraction of the ceiling: training {p['train_ips'] * tf:.0f} GFLOP/s = {frac(p['train_ips'], tf, top)}, "
            f"batched inference {p['infer_ips'] * ff:.0f} GFLOP/s = {frac(p['infer_ips'], ff, top)} of the best "
            f"sgemm ({top:.0f} GFLOP/s)")
    if args.peak_gflops:
        line += (f"; of the nominal peak: training {frac(p['train_ips'], tf, args.peak_gflops)}, "
                 f"inference {frac(p['infer_ips'], ff, args.peak_gflops)}")
    for k, e in extras.items():
        line += f"; {k}: training {e['train_ips'] * tf:.0f} GFLOP/s, inference {e['infer_ips'] * ff:.0f} GFLOP/s"
    print(line)
    if "compile" in "".join(extras):
        e = extras["project_compile"]
        print(f"torch.compile: first training step (compile) {e['compile_s']:.1f} s, inference compile "
              f"{e.get('compile_infer_s', float('nan')):.1f} s")
    cpu_cells = []
    for key, what in (("train_cpu_s", "training"), ("infer_cpu_s", "batched inference")):
        vals = ", ".join(f"{k} {v[key]:.3f}" for k, v in r.items() if v.get(key))
        cpu_cells.append(f"{what}: {vals}")
    print(f"CPU seconds per image (process time, all threads; per-core work when run with --threads 1, which a "
          f"busy machine disturbs least): {'; '.join(cpu_cells)}")
    if ox:
        print(f"ONNX: export {ox['export_s']:.1f} s, max |probability difference| vs PyTorch {ox['max_prob_diff']:.1e}")
    n_train = int(0.8 * p["n_images"]) if args.data_dir and args.n_images <= 0 else BUSI_TRAIN_IMAGES
    recipe_images = n_train * 7 * 200
    best_train = max([p["train_ips"]] + [e["train_ips"] for e in extras.values()])
    print(f"original recipe (≈{n_train} training images x 7 x 200 epochs = {recipe_images} images, without "
          f"validation): {recipe_images / p['train_ips'] / 60:.0f} min at the project's rate"
          + (f", {recipe_images / best_train / 60:.0f} min at the best variant's" if best_train > p["train_ips"] else "")
          + (f"; naive {recipe_images / nv['train_ips'] / 60:.0f} min" if nv else ""))
    ok = lambda c: "met" if c else "NOT met"
    checks = [f"training >= {TARGETS['train']} img/s {ok(p['train_ips'] >= TARGETS['train'])}",
              f"batched inference >= {TARGETS['infer']:.0f} img/s "
              f"{ok(max(p['infer_ips'], oxg('infer_ips') or 0) >= TARGETS['infer'])}",
              f"latency <= {TARGETS['latency_ms']:.0f} ms "
              f"{ok(min(p['latency_ms'], oxg('latency_ms') or 1e9) <= TARGETS['latency_ms'])}",
              f"pipeline >= {TARGETS['pipeline_x']:.0f}x training "
              f"{ok(p['pipeline_ips'] >= TARGETS['pipeline_x'] * p['train_ips'])} "
              f"({p['pipeline_ips'] / p['train_ips']:.0f}x)"]
    if dev.type == "cuda":
        checks.append(f"original recipe < {TARGETS['gpu_recipe_min']:.0f} min "
                      f"{ok(recipe_images / p['train_ips'] / 60 < TARGETS['gpu_recipe_min'])}")
    if args.image_size != 256 or args.batch_size != 8:
        print(f"targets: not judged (they are defined for 256x256 and batch 8; this run is {args.image_size}x"
              f"{args.image_size}, batch {args.batch_size})")
    else:
        print(f"targets: {', '.join(checks)} (the CPU targets are for fp32 on the 2-core machine)")
    return {"ceiling": ceil, "flops": flops, "paths": r}


QUICK = dict(threads=1, image_size=64, batch_size=2, n_images=6, warmup=1, train_steps=2, infer_images=4, infer_repeats=1,
             latency_runs=2, pipeline_batches=2, sgemm_n=256, ceiling_reps=2, conv_channels=16, conv_size=32)


def parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default="", help="BUSI folder (default: synthetic phantoms)")
    ap.add_argument("--n_images", type=int, default=48, help="images in the set (BUSI: spread over the listing; "
                                                             "<= 0: all)")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--expand", type=int, default=7, help="augmentation expansion (variants > 0 are augmented)")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    ap.add_argument("--train_steps", type=int, default=6, help="timed training steps")
    ap.add_argument("--infer_images", type=int, default=32, help="images per batched-inference pass")
    ap.add_argument("--infer_repeats", type=int, default=3, help="timed batched-inference passes")
    ap.add_argument("--latency_runs", type=int, default=10, help="timed single-image predictions")
    ap.add_argument("--pipeline_batches", type=int, default=20, help="timed batches of the data pipeline alone")
    ap.add_argument("--sgemm_n", type=int, default=2048, help="matrix size of the sgemm ceiling")
    ap.add_argument("--ceiling_reps", type=int, default=5)
    ap.add_argument("--conv_channels", type=int, default=64)
    ap.add_argument("--conv_size", type=int, default=128)
    ap.add_argument("--peak_gflops", type=float, default=0.0, help="nominal fp32 peak to compare with, if known "
                                                                    "(cores x GHz x FLOP/cycle)")
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also measure the project path under torch.compile")
    ap.add_argument("--cpu_bf16", action="store_true", help="also measure the project path with bf16 autocast")
    ap.add_argument("--no_naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--no_onnx", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--in_process", action="store_true", help="run the paths in this process (peak memory is "
                                                              "then cumulative)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="tiny settings, all paths in this process: a smoke test")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in ap._actions}
        for k, v in QUICK.items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
        args.in_process = True  # one interpreter: seconds, not a process start per path
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
    print(f"bench.py: load average at start {loadavg()}; ceiling and FLOPs ...", file=sys.stderr, flush=True)
    ceil = ceiling(args, dev)
    flops = model_flops(args)
    names = ["project"] + (["project_compile"] if args.compile else []) + \
            (["project_bf16"] if args.cpu_bf16 and dev.type == "cpu" else []) + \
            ([] if args.no_naive else ["naive"]) + ([] if args.no_onnx else ["onnx"])
    results = {}
    for name in names:
        print(f"bench.py: {name} ... (load {loadavg()})", file=sys.stderr, flush=True)
        results[name] = spawn(name, argv, args.in_process, args)
    out = report(args, dev, ceil, flops, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
