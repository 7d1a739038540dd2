"""Train the lesion-segmentation UNet on breast ultrasound images.

    python train.py --data_dir data/BUSI                         # the original recipe (200 epochs, 7x)
    python train.py --data_dir data/BUSI --epochs 5 --image_size 128
    python train.py --path_to_images imgs/ --path_to_masks masks/
    python train.py --resume                                     # continue out_dir exactly where it stopped
    python train.py --init_from runs/resnet18/best.safetensors --out_dir runs/retrained

Defaults are the original recipe: 256x256 grey images normalized with mean 0.5 / std 0.5, the training set
expanded 7x by augmentation, RMSProp lr 1e-3, pixel-wise binary cross-entropy, ReduceLROnPlateau (x0.1
after 5 epochs without improvement of the validation loss), 200 epochs.

out_dir receives: best.safetensors (lowest validation loss), last.safetensors (every epoch), resume.pt
(optimizer, scheduler, epoch, RNG), split.json, log.csv; the loss graph goes to loss_graph/<run>.png.
Ctrl-C saves a resumable state. Under torchrun the same script trains with DistributedDataParallel.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dataset
from augment import AugmentConfig, augment_batch, expanded_order
from dataset import DataError
from model import CheckpointError, WeightsUnavailableError

log = logging.getLogger("train")

# ---- settings (edit here, or override on the command line: --epochs 10 --no-augment)
data_dir = "data/BUSI"        # BUSI class-folder layout: benign/, malignant/, normal/ with *_mask*.png
path_to_images = ""           # or: a folder of images (the original repo's layout) ...
path_to_masks = ""            # ... and a folder of masks matched to the images by file name
manifest = ""                 # or: a CSV with columns image,mask,label (paths relative to the CSV)
default_label = ""            # label for two-folder data whose file names hold no class name
out_dir = "runs/resnet18"     # checkpoints, split, log of this run
loss_graph_dir = "loss_graph" # the loss curve PNG of the run goes here
split_file = ""               # split JSON; empty: out_dir/split.json (made once, then reused)
val_fraction = 0.2            # validation share per class (the original used 516/128 images)
folds = 0                     # K for K-fold cross-validation (0: one train/validation split)
fold = 0                      # with folds: which fold is the validation set
seed = 42                     # seeds the split, the weights, the augmentation
encoder = "resnet18"          # resnet18, resnet34, resnet50, densenet121, efficientnet-lite0
encoder_weights = ""          # '' (none), 'imagenet', or a file with an encoder state dict
init_from = ""                # checkpoint whose weights start this run ("retrained from previous weights")
image_size = 256              # network input size (the shipped recipe may train at 128 first)
epochs = 200                  # total number of epochs
batch_size = 8                # images per step
lr = 0.001                    # learning rate
optimizer = "rmsprop"         # rmsprop (the original), adam, adamw
weight_decay = 0.0            # L2 penalty
lr_factor = 0.1               # ReduceLROnPlateau: multiply the lr by this ...
lr_patience = 5               # ... after this many epochs without a lower validation loss
expand = 7                    # training set expansion by augmentation (1: no augmentation)
threshold = 0.5               # lesion probability threshold stored in the checkpoint
device = "auto"               # auto (cuda, then mps, then cpu), cpu, cuda, mps
amp = True                    # bf16 autocast on CUDA
channels_last = True          # channels_last memory format
compile = False               # torch.compile the model (pays only for long runs)
num_threads = 0               # CPU threads for torch (0: torch's default)
sync_bn = False               # SyncBatchNorm under torchrun
resume = False                # continue the run in out_dir from resume.pt
overwrite = False             # allow starting a new run in an out_dir that already holds one
max_steps = 0                 # stop after this many optimizer steps in total (0: no limit; for tests)
save_every_steps = 0          # also save a resumable state every N steps (0: only at epoch ends)
progress = True               # tqdm progress bars
# ---- end of settings

LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_dice_all_b", "val_accuracy", "lr",
              "seconds", "image_size"]


class TrainingError(Exception):
    """Training cannot go on (diverged, output folder unusable); the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------

def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def check_out_dir(cfg: dict, is_main: bool) -> Path:
    """Refuse to overwrite an earlier run, and fail early on an unwritable folder or a full disk."""
    out = Path(cfg["out_dir"])
    if not is_main:
        return out
    existing = [p.name for p in (out / "log.csv", out / "last.safetensors", out / "resume.pt") if p.exists()]
    if existing and not (cfg["resume"] or cfg["overwrite"]):
        raise TrainingError(f"{out}: already holds a run ({', '.join(existing)}); use --resume to continue it, "
                            f"--overwrite to start again there, or another --out_dir")
    if cfg["resume"] and not (out / "resume.pt").exists():
        raise TrainingError(f"{out}/resume.pt: nothing to resume")
    for folder in (out, Path(cfg["loss_graph_dir"])):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write_test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise TrainingError(f"{folder}: output folder is not writable ({e.strerror})") from None
    free = shutil.disk_usage(out).free
    need = 400 * 2 ** 20  # best + last + resume state of the largest listed encoder, with room to spare
    if free < need:
        raise TrainingError(f"{out}: only {free / 2 ** 20:.0f} MiB free on this disk; checkpoints need about "
                            f"{need / 2 ** 20:.0f} MiB")
    return out


def prepare_data(cfg: dict, out: Path, is_main: bool = True):
    """Discover, decode into memory, drop duplicates, split. Returns (train set, val set, split path, split)."""
    samples = dataset.discover(cfg["data_dir"], cfg["path_to_images"], cfg["path_to_masks"], cfg["manifest"],
                               cfg["default_label"])
    loaded = dataset.load_set(samples, cfg["image_size"], progress=cfg["progress"] and is_main)
    keep, report = dataset.resolve_duplicates(loaded.samples, loaded.hashes)
    loaded = loaded.subset(keep)
    split_path = Path(cfg["split_file"] or out / "split.json")
    if is_main:
        split = dataset.load_or_make_split(split_path, loaded.samples, cfg["val_fraction"], cfg["seed"],
                                           cfg["folds"], report)
    else:  # the other ranks make the same split in memory; only rank 0 writes it
        split = json.loads(split_path.read_text()) if split_path.exists() else \
            dataset.make_split(loaded.samples, cfg["val_fraction"], cfg["seed"], cfg["folds"])
    train_keys, val_keys = dataset.select_fold(split, cfg["fold"])
    index = {s.key: i for i, s in enumerate(loaded.samples)}
    train = loaded.subset([index[k] for k in train_keys if k in index])
    val = loaded.subset([index[k] for k in val_keys if k in index])
    if len(train) < 2 or len(val) < 1:
        raise DataError(f"too few images to train: {len(train)} for training, {len(val)} for validation")
    log.info("data: %d training and %d validation images (%s)", len(train), len(val),
             ", ".join(f"{c} {sum(s.label == c for s in train.samples)}/{sum(s.label == c for s in val.samples)}"
                       for c in dataset.CLASS_NAMES))
    return train, val, split_path, split


def make_model(cfg: dict):
    from model import build_model, load_checkpoint
    if cfg["init_from"]:
        model, meta = load_checkpoint(cfg["init_from"])
        if meta["encoder"] != cfg["encoder"]:
            raise CheckpointError(f"{cfg['init_from']}: encoder {meta['encoder']} but this run asks for "
                                  f"{cfg['encoder']}; pass --encoder {meta['encoder']}")
        log.info("starting from the weights of %s", cfg["init_from"])
        return model.train()
    return build_model(cfg["encoder"], cfg["encoder_weights"] or None, len(dataset.LESION_CLASSES), 1)


def make_optimizer(cfg: dict, params):
    name = cfg["optimizer"].lower()
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"optimizer must be rmsprop, adam or adamw, got {cfg['optimizer']!r}")


def checkpoint_meta(cfg: dict, split_path: Path, epoch: int, metrics: dict) -> dict:
    return {**dataset.preprocessing_meta(cfg["image_size"]), "encoder": cfg["encoder"],
            "classes": len(dataset.LESION_CLASSES), "threshold": cfg["threshold"], "epoch": epoch,
            "split_file": str(split_path), "fold": cfg["fold"], "metrics": metrics,
            "train_config": {k: v for k, v in cfg.items()}, "augment": AugmentConfig().to_dict(),
            "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------------
# Logs and plots
# ---------------------------------------------------------------------------------------------------------

def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_log(path: Path, rows: list[dict]) -> None:
    from model import atomic_write_bytes
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_losses(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [float(r["train_loss"]) for r in rows], label="train loss")
    ax.plot(ep, [float(r["val_loss"]) for r in rows], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("pixel-wise BCE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(ep, [float(r["val_dice"]) for r in rows], color="tab:green", alpha=0.5, ls="--", label="val lesion Dice")
    ax2.set_ylabel("validation lesion Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    from model import atomic_write_bytes
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def epoch_generator(seed_: int, epoch: int, batch: int = -1) -> torch.Generator:
    """Seeded generators: one per epoch for the order, one per global batch for its augmentation, so a run
    resumed at any batch, or split over several processes, draws exactly the same numbers."""
    return torch.Generator().manual_seed((seed_ * 1_000_003 + epoch) * 1_000_003 + batch + 1)


def make_batch(idx: torch.Tensor, variant: torch.Tensor, g: torch.Generator, images_dev: torch.Tensor,
               targets_dev: torch.Tensor, channels_last_: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a batch from the in-memory set and augment the variants > 0, on the training device."""
    idx = idx.to(images_dev.device)
    x = images_dev[idx].float() / 255.0
    y = targets_dev[idx].float()
    aug = (variant > 0).to(images_dev.device)
    if bool(aug.any()):
        xa, ya = augment_batch(x[aug], y[aug], g)
        x[aug], y[aug] = xa, ya
    x = dataset.normalize(x * 255.0)
    if channels_last_:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def validate(model, val, device, cfg) -> tuple[float, dict, dict]:
    from evaluate import evaluate_set, headline
    from predict import predict_logits
    model.eval()
    predictor = lambda imgs, bs, tta_: predict_logits(model, imgs, device, bs, tta_, cfg["channels_last"])
    _, summary = evaluate_set(predictor, val, cfg["threshold"], batch_size=max(8, cfg["batch_size"]),
                              with_hd95=False)
    model.train()
    return summary["val_loss"], headline(summary), summary


def train_model(cfg: dict) -> dict:
    """Run (or resume) one training; returns the final metrics. See the module docstring for the outputs."""
    rank, world, local_rank = dist_info()
    is_main = rank == 0
    distributed = world > 1
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    dev = _device(cfg["device"], local_rank, distributed)
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    out = check_out_dir(cfg, is_main)
    if distributed:
        torch.distributed.barrier()
    train, val, split_path, _ = prepare_data(cfg, out, is_main)
    torch.manual_seed(cfg["seed"])
    model = make_model(cfg).to(dev)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if distributed and cfg["sync_bn"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(cfg, model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg["lr_factor"],
                                                       patience=cfg["lr_patience"])
    start_epoch, start_batch, best_loss, step = 1, 0, math.inf, 0
    running = [0.0, 0]
    if cfg["resume"]:
        from model import load_checkpoint, load_resume_state
        state = load_resume_state(out / "resume.pt")
        weights, _ = load_checkpoint(out / "resume.safetensors")
        model.load_state_dict(weights.state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        best_loss, step = float(state["best_val_loss"]), int(state["step"])
        running = [float(state["running_loss"]), int(state["running_count"])]
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming %s at epoch %d, batch %d (step %d)", out, start_epoch, start_batch, step)
    train_model_ = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model_ = DDP(model, device_ids=[local_rank] if dev.type == "cuda" else None)
    if cfg["compile"]:
        train_model_ = torch.compile(train_model_)
    images_dev = torch.as_tensor(train.images).to(dev)
    targets_dev = torch.as_tensor(train.targets).to(dev)
    use_amp = cfg["amp"] and dev.type == "cuda"
    log_path = out / "log.csv"
    rows = [r for r in read_log(log_path) if int(r["epoch"]) < start_epoch] if cfg["resume"] else []
    graph = Path(cfg["loss_graph_dir"]) / f"{out.name}.png"
    metrics: dict = {}
    run_cfg = dict(cfg)

    def save_state(epoch: int, batch: int) -> None:
        """Everything needed to continue exactly here: weights, optimizer, scheduler, position, RNG."""
        from model import save_checkpoint, save_resume_state
        save_checkpoint(out / "resume.safetensors", model, checkpoint_meta(run_cfg, split_path, epoch, metrics))
        save_resume_state(out / "resume.pt", {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "batch": batch,
            "step": step, "best_val_loss": best_loss, "running_loss": running[0], "running_count": running[1],
            "torch_rng": torch.get_rng_state()})

    interrupted = {"flag": False}
    old_handler = signal.getsignal(signal.SIGINT)
    if is_main and threading_main():
        signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg["epochs"] + 1):
            t0 = time.time()
            idx_all, var_all = expanded_order(len(train), cfg["expand"], epoch_generator(cfg["seed"], epoch))
            # rank r takes the r-th slice of each global batch (global batch = batch_size * world size)
            n_batches = len(idx_all) // (cfg["batch_size"] * world)
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch or not cfg["resume"]:
                running = [0.0, 0]
            from tqdm import tqdm
            bar = tqdm(range(first, n_batches), desc=f"epoch {epoch}/{cfg['epochs']}", unit="batch",
                       disable=not (cfg["progress"] and is_main), leave=False)
            for b in bar:
                lo = (b * world + rank) * cfg["batch_size"]
                sel = slice(lo, lo + cfg["batch_size"])
                x, y = make_batch(idx_all[sel], var_all[sel], epoch_generator(cfg["seed"], epoch, b * world + rank),
                                  images_dev, targets_dev, cfg["channels_last"])
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = train_model_(x)
                loss = F.binary_cross_entropy_with_logits(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(f"the loss became {float(loss)} at epoch {epoch}, batch {b}; training "
                                        f"stopped. The last good checkpoint in {out} is kept. Try a lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                running[0] += float(loss.detach())
                running[1] += 1
                bar.set_postfix(loss=f"{running[0] / running[1]:.4f}")
                stop_now = interrupted["flag"] or (cfg["max_steps"] and step >= cfg["max_steps"])
                periodic = cfg["save_every_steps"] and step % cfg["save_every_steps"] == 0
                if is_main and (stop_now or periodic) and b + 1 < n_batches:
                    save_state(epoch, b + 1)
                if stop_now and b + 1 < n_batches:
                    why = "interrupted (Ctrl-C)" if interrupted["flag"] else f"max_steps={cfg['max_steps']} reached"
                    log.info("%s: saved a resumable state in %s (continue with --resume)", why, out)
                    return metrics
            bar.close()
            train_loss = _reduce_mean(running[0] / max(1, running[1]), distributed, dev)
            val_loss, metrics, _ = validate(model, val, dev, cfg)
            sched.step(val_loss)
            row = {"epoch": epoch, "train_loss": f"{train_loss:.6f}", "val_loss": f"{val_loss:.6f}",
                   "val_dice": f"{metrics['dice']:.4f}", "val_iou": f"{metrics['iou']:.4f}",
                   "val_dice_all_b": f"{metrics['dice_all_b']:.4f}", "val_accuracy": f"{metrics['accuracy']:.4f}",
                   "lr": f"{opt.param_groups[0]['lr']:.3g}", "seconds": f"{time.time() - t0:.1f}",
                   "image_size": cfg["image_size"]}
            metrics = {**metrics, "val_loss": val_loss, "train_loss": train_loss}
            log.info("epoch %d: train loss %.4f, val loss %.4f, val lesion Dice %.4f IoU %.4f, accuracy %.3f, lr %s, %.0fs",
                     epoch, train_loss, val_loss, metrics["dice"], metrics["iou"], metrics["accuracy"], row["lr"],
                     time.time() - t0)
            if is_main:
                from model import save_checkpoint
                rows.append(row)
                meta = checkpoint_meta(run_cfg, split_path, epoch, metrics)
                if val_loss < best_loss:
                    best_loss = val_loss
                    save_checkpoint(out / "best.safetensors", model, meta)
                save_checkpoint(out / "last.safetensors", model, meta)
                running = [0.0, 0]
                save_state(epoch + 1, 0)
                write_log(log_path, rows)
                plot_losses(rows, graph, f"{out.name}: {cfg['encoder']} UNet, {cfg['image_size']}px")
            if interrupted["flag"] or (cfg["max_steps"] and step >= cfg["max_steps"]):
                log.info("stopped after epoch %d; continue with --resume", epoch)
                break
    finally:
        if is_main and threading_main():
            signal.signal(signal.SIGINT, old_handler)
        if distributed:
            torch.distributed.destroy_process_group()
    return metrics


def _reduce_mean(value: float, distributed: bool, dev) -> float:
    if not distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return float(t) / torch.distributed.get_world_size()


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _device(name: str, local_rank: int, distributed: bool) -> torch.device:
    from predict import pick_device
    dev = pick_device(name)
    if dev.type == "cuda" and distributed:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return dev


def default_settings(**overrides) -> dict:
    """The settings with their defaults from this file, some replaced (for tests and notebooks)."""
    from cli import parse_settings
    cfg = parse_settings(__file__, [])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise KeyError(f"unknown settings {sorted(unknown)}")
    return {**cfg, **overrides}


def main(argv: list[str] | None = None) -> int:
    from cli import parse_settings
    cfg = parse_settings(__file__, argv, __doc__)
    rank = dist_info()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        train_model(cfg)
    except (DataError, CheckpointError, WeightsUnavailableError, TrainingError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
