"""Train the lesion-segmentation UNet on breast ultrasound images.

    python train.py --data_dir data/BUSI                         # the original recipe (200 epochs, 7x)
    python train.py --data_dir data/BUSI --epochs 5 --image_size 128
    python train.py --path_to_images imgs/ --path_to_masks masks/
    python train.py --resume                                     # continue out_dir exactly where it stopped
    python train.py --init_from runs/resnet18/best.safetensors --out_dir runs/retrained
    torchrun --standalone --nproc_per_node 4 train.py --data_dir data/BUSI --batch_size 2 --sync_bn   # 4 GPUs

Defaults are the original recipe: 256x256 grey images normalized with mean 0.5 / std 0.5, the training set
expanded 7x by augmentation, RMSProp lr 1e-3, pixel-wise binary cross-entropy, ReduceLROnPlateau (x0.1
after 5 epochs without improvement of the validation loss), 200 epochs.

out_dir receives: best.safetensors (lowest validation loss), last.safetensors (every epoch), resume.pt
(weights, optimizer, scheduler, position, RNG: one file loaded with weights_only=True), split.json, log.csv;
the loss graph goes to loss_graph/<run>.png. Every file is written atomically (temporary file, fsync,
rename), resume.pt last, so a kill at any moment leaves a run that --resume continues exactly.
Ctrl-C saves a resumable state. Under torchrun the same script trains with DistributedDataParallel (nccl on
CUDA, gloo on CPU): batch_size is per process, so one step sees batch_size x processes images, taken in
the same order as one process would; validation is split over the processes and gathered; only rank 0
writes files; --resume continues with any number of processes.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import glob
import io
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import dataset
from augment import AugmentConfig, augment_batch, expanded_order
from dataset import DataError
from model import CheckpointError, WeightsUnavailableError, atomic_write_bytes

log = logging.getLogger("train")

# ---- settings (edit here, or in a recipe file: python train.py configs/x.py; then the command line: --epochs 10)
config = ""                   # recipe file the settings came from (python train.py configs/x.py); stored in the checkpoint
data_dir = "data/BUSI"        # BUSI class-folder layout: benign/, malignant/, normal/ with *_mask*.png
path_to_images = ""           # or: a folder of images (the original repo's layout) ...
path_to_masks = ""            # ... and a folder of masks matched to the images by file name
manifest = ""                 # or: a CSV with columns image,mask,label (paths relative to the CSV)
default_label = ""            # label for two-folder data whose file names hold no class name
sources = ""                  # or several sources in one run: "busi=data/BUSI;uclm=data/BUS-UCLM/manifest.csv;mine=imgs,masks"
balance_sources = False       # multi-source runs: draw every source equally often in an epoch
group_near_duplicates = True  # a new split keeps near-duplicate scans (and a manifest's patients) on one side
out_dir = "runs/resnet18"     # checkpoints, split, log of this run
loss_graph_dir = "loss_graph" # the loss curve PNG of the run goes here
split_file = ""               # split JSON; empty: out_dir/split.json (made once, then reused)
val_fraction = 0.2            # validation share per class (the original used 516/128 images)
val_always = ""               # a new split puts these images (a glob of files, e.g. samples/*.png; matched by file name) in validation
folds = 0                     # K for K-fold cross-validation (0: one train/validation split)
fold = 0                      # with folds: which fold is the validation set
seed = 42                     # seeds the split, the weights, the augmentation
encoder = "resnet18"          # resnet18, resnet34, resnet50, densenet121, efficientnet-lite0/1/2, mobilenet_v2
encoder_weights = ""          # '' (none), 'imagenet', or a file with an encoder state dict
init_from = ""                # checkpoint whose weights start this run ("retrained from previous weights")
image_size = 256              # network input size (the shipped recipe may train at 128 first)
epochs = 200                  # total number of epochs
batch_size = 8                # images per step (under torchrun: per process; a step sees batch_size x processes)
lr = 0.001                    # learning rate
optimizer = "rmsprop"         # rmsprop (the original), adam, adamw
weight_decay = 0.0            # L2 penalty
lr_factor = 0.1               # ReduceLROnPlateau: multiply the lr by this ...
lr_patience = 5               # ... after this many epochs without a lower validation loss
expand = 7                    # training set expansion by augmentation (1: no augmentation)
draws_per_epoch = 0           # images drawn per epoch (0: every training image expand times); fixed, runs on different data get the same budget
threshold = 0.5               # lesion probability threshold stored in the checkpoint
min_area = 0.0                # smallest lesion component kept, in pixels of the network input (stored in the checkpoint)
loss = "bce"                  # bce (the recipe's pixel-wise BCE), bce+dice (+ SMP's soft Dice per lesion channel), bce+union_dice (+ soft Dice of the union of the lesion channels)
head = False                  # add a classification head for the image label (normal / benign / malignant)
class_agnostic = False        # one lesion channel (any lesion) instead of one per lesion class; the label comes from the head (needs head)
head_weight = 0.2             # weight of the head's cross-entropy in the loss
augment = "recipe"            # augmentation ranges: recipe, scanner (gain, contrast, speckle size, resolution, depth ramp), or none
lr_schedule = "plateau"       # plateau (ReduceLROnPlateau on the validation loss, the recipe) or onecycle (warm-up, then cosine decay per step)
device = "auto"               # auto (cuda, then mps, then cpu), cpu, cuda, mps
amp = True                    # bf16 autocast on CUDA
cpu_bf16 = False              # bf16 autocast on CPUs with AMX (about 2x faster on such CPUs; off: fp32 as the original)
channels_last = True          # channels_last memory format
compile = False               # torch.compile the model (pays only for long runs)
num_threads = 0               # CPU threads for torch (0: torch's default)
sync_bn = False               # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)
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
    existing = [p.name for p in (out / "log.csv", out / "best.safetensors", out / "last.safetensors",
                                 out / "resume.pt", out / "resume.safetensors") if p.exists()]
    if existing and not (cfg["resume"] or cfg["overwrite"]):
        raise TrainingError(f"{out}: already holds a run ({', '.join(existing)}); use --resume to continue it, "
                            f"--overwrite to start again there, or another --out_dir")
    if cfg["resume"] and not (out / "resume.pt").exists():
        raise TrainingError(f"{out}/resume.pt: nothing to resume")
    stale = [p for p in out.glob("*.tmp") if p.name.startswith(("best.", "last.", "resume.", "log.", "split."))]
    for p in stale:  # half-written temporary files of a killed run (the real files were never touched)
        p.unlink(missing_ok=True)
    if stale:
        log.info("%s: removed %d unfinished temporary file(s) of an interrupted run", out, len(stale))
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
    if cfg["folds"] < 0 or cfg["folds"] == 1 or (cfg["folds"] and not 0 <= cfg["fold"] < cfg["folds"]):
        raise DataError(f"folds must be 0 (one train/validation split) or K >= 2 with 0 <= fold < K; got "
                        f"folds={cfg['folds']}, fold={cfg['fold']}")
    samples = dataset.discover_all(cfg["sources"], data_dir=cfg["data_dir"], path_to_images=cfg["path_to_images"],
                                   path_to_masks=cfg["path_to_masks"], manifest=cfg["manifest"],
                                   default_label=cfg["default_label"])
    loaded = dataset.load_set(samples, cfg["image_size"], progress=cfg["progress"] and is_main)
    keep, report = dataset.resolve_duplicates(loaded.samples, loaded.hashes)
    loaded = loaded.subset(keep)
    split_path = Path(cfg["split_file"] or out / "split.json")
    groups = None
    if cfg["group_near_duplicates"] and _new_or_grouped_split(split_path):
        keep, near = dataset.resolve_near_duplicates(loaded.samples, loaded.phashes)
        loaded = loaded.subset(keep)
        groups = dataset.split_groups(loaded.samples, near["groups"])
        report = {**report, "near_duplicates_conflicting": near.pop("conflicting_labels"), "near_duplicates": near}
    # rank 0 reads (or makes and writes) the split file; under torchrun the other ranks receive its split
    split = _on_rank0(dataset.load_or_make_split, split_path, loaded.samples, cfg["val_fraction"], cfg["seed"],
                      cfg["folds"], report, groups, val_always_names(cfg["val_always"]))
    if "folds" not in split and cfg["fold"] != 0:
        raise DataError(f"fold={cfg['fold']} was asked but {split_path} holds one train/validation split, not "
                        f"folds; pass --folds K (with a new split_file or out_dir)")
    try:
        train_keys, val_keys = dataset.select_fold(split, cfg["fold"])
    except ValueError as e:  # fold out of range
        raise DataError(f"{split_path}: {e}") from None
    index = {s.key: i for i, s in enumerate(loaded.samples)}
    train = loaded.subset([index[k] for k in train_keys if k in index])
    val = loaded.subset([index[k] for k in val_keys if k in index])
    if len(train) < 2 or len(val) < 1:
        raise DataError(f"too few images to train: {len(train)} for training, {len(val)} for validation")
    log.info("data: %d training and %d validation images (%s)", len(train), len(val),
             ", ".join(f"{c} {sum(s.label == c for s in train.samples)}/{sum(s.label == c for s in val.samples)}"
                       for c in dataset.CLASS_NAMES))
    return train, val, split_path, split


def val_always_names(pattern: str) -> frozenset[str]:
    """The file names of the val_always glob; a glob that matches nothing is an error (a typo would be silent)."""
    if not pattern:
        return frozenset()
    names = frozenset(Path(p).name for p in glob.glob(pattern))
    if not names:
        raise DataError(f"val_always: no file matches {pattern!r}")
    return names


def _new_or_grouped_split(path: Path) -> bool:
    """True unless path holds a split made without near-duplicate groups (old split files keep their images)."""
    try:
        return not path.exists() or "grouped" in dataset.read_split(path)
    except (OSError, DataError):
        return True  # load_or_make_split reports the unreadable file


def make_model(cfg: dict):
    from model import build_model, load_checkpoint
    if cfg["init_from"]:
        model, meta = load_checkpoint(cfg["init_from"])
        if meta["encoder"] != cfg["encoder"]:
            raise CheckpointError(f"{cfg['init_from']}: encoder {meta['encoder']} but this run asks for "
                                  f"{cfg['encoder']}; pass --encoder {meta['encoder']}")
        if bool(meta.get("head")) != bool(cfg["head"]):
            raise CheckpointError(f"{cfg['init_from']}: {'has' if meta.get('head') else 'has no'} classification "
                                  f"head but this run asks for {'one' if cfg['head'] else 'none'}; pass "
                                  f"--{'' if meta.get('head') else 'no-'}head")
        log.info("starting from the weights of %s", cfg["init_from"])
        return model.train()
    if cfg["class_agnostic"] and not cfg["head"]:
        raise TrainingError("class_agnostic (one lesion channel) needs the classification head for the label: "
                            "add --head")
    return build_model(cfg["encoder"], cfg["encoder_weights"] or None, lesion_channels(cfg), 1,
                       len(dataset.CLASS_NAMES) if cfg["head"] else 0)


def lesion_channels(cfg: dict) -> int:
    """Output channels: one per lesion class, or one for any lesion (class_agnostic)."""
    return 1 if cfg.get("class_agnostic") else len(dataset.LESION_CLASSES)


LOSSES = ("bce", "bce+dice", "bce+union_dice")


def union_dice_loss(seg: torch.Tensor, y: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice of the lesion, whatever its class: the union probability (max over the lesion channels, as
    predict.decide thresholds it) against the union of the targets, pooled over the batch (normal images add
    only their false-positive mass)."""
    p = torch.sigmoid(seg).amax(1)
    t = y.amax(1)
    inter = (p * t).sum()
    return 1 - (2 * inter + smooth) / (p.sum() + t.sum() + smooth)


def make_loss(cfg: dict):
    """The training loss of a network output against lesion targets y (N x C x S x S) and image labels (N):
    pixel-wise BCE (the recipe), + soft Dice: per lesion channel (bce+dice: SMP's multilabel DiceLoss, which
    leaves channels without lesion pixels in the batch out) or of the union of the lesion channels
    (bce+union_dice: finding the lesion counts, not its class), + head_weight x cross-entropy of the head."""
    from backends import split_output
    if cfg["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    dice = None
    if cfg["loss"] == "bce+dice":
        from segmentation_models_pytorch.losses import DiceLoss
        dice = DiceLoss("multilabel", from_logits=True)
    elif cfg["loss"] == "bce+union_dice":
        dice = union_dice_loss

    def loss_fn(out, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seg, cls = split_output(out)
        loss = F.binary_cross_entropy_with_logits(seg.float(), y)
        if dice is not None:
            loss = loss + dice(seg.float(), y)
        if cls is not None and cfg["head_weight"] > 0:
            loss = loss + cfg["head_weight"] * F.cross_entropy(cls.float(), labels)
        return loss
    return loss_fn


def make_scheduler(cfg: dict, opt, steps_per_epoch: int):
    """ReduceLROnPlateau on the validation loss (the recipe; stepped once an epoch), or one-cycle: a warm-up
    over the first 10% of all steps to lr, then cosine decay to lr/1e4 (stepped every step)."""
    if cfg["lr_schedule"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg["lr_factor"],
                                                          patience=cfg["lr_patience"])
    if cfg["lr_schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], pct_start=0.1,
                                                   total_steps=max(1, cfg["epochs"] * max(1, steps_per_epoch)))
    raise ValueError(f"lr_schedule must be plateau or onecycle, got {cfg['lr_schedule']!r}")


def balanced_order(train, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The epoch's draws re-drawn so that every source is drawn equally often (uniform within a source)."""
    names = [s.source for s in train.samples]
    sizes = {n: names.count(n) for n in set(names)}
    weights = torch.tensor([1.0 / sizes[n] for n in names], dtype=torch.float64)
    return torch.multinomial(weights, len(idx), replacement=True, generator=g)


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
    meta = {**dataset.preprocessing_meta(cfg["image_size"]), "encoder": cfg["encoder"],
            "classes": lesion_channels(cfg), "threshold": cfg["threshold"], "min_area": cfg["min_area"],
            "epoch": epoch, "split_file": str(split_path), "fold": cfg["fold"], "metrics": metrics,
            "train_config": {k: v for k, v in cfg.items()}, "augment": AugmentConfig.preset(cfg["augment"]).to_dict(),
            "torch": torch.__version__, "recipe": recipe_provenance(cfg["config"])}
    if cfg["head"]:
        meta.update(head=list(dataset.CLASS_NAMES), normal_gate=1.0)
    return meta


@functools.lru_cache(maxsize=None)
def recipe_provenance(config_file: str) -> dict:
    """How a checkpoint was made beyond its settings: the recipe file's name and full text (if any), and the
    git commit of this code (with dirty = uncommitted changes), so read_checkpoint_meta tells it exactly."""
    import subprocess
    here = Path(__file__).resolve().parent
    from cli import recipe_chain
    out = {"file": config_file, "text": "", "git_commit": "", "git_dirty": None}
    if config_file:  # the recipe's text, after the text of each file it builds on (base = ...)
        try:
            out["text"] = "".join(f"# ---- {p}\n{p.read_text(encoding='utf-8')}" for p in recipe_chain(config_file))
        except OSError:
            pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---------------------------------------------------------------------------------------------------------
# Logs and plots
# ---------------------------------------------------------------------------------------------------------

def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    extra = sorted({k for r in rows for k in r} - set(LOG_FIELDS))  # per-source figures of multi-source runs
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS + extra, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_losses(rows: list[dict], path: Path, title: str, train_loss: str = "bce") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [float(r["train_loss"]) for r in rows], label="train loss")
    ax.plot(ep, [float(r["val_loss"]) for r in rows], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("pixel-wise BCE" if train_loss == "bce" else f"loss (train: {train_loss}; validation: BCE)")
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def epoch_generator(seed_: int, epoch: int, batch: int = -1) -> torch.Generator:
    """Seeded generators: one per epoch for the order, one per batch of one process for its augmentation, so
    a run resumed at any batch draws exactly the same numbers. The data order of an epoch does not depend on
    the number of processes; the augmentation's random numbers do (batch index = sample position // batch
    size), so runs with expand > 1 on different numbers of processes see differently augmented variants."""
    return torch.Generator().manual_seed((seed_ * 1_000_003 + epoch) * 1_000_003 + batch + 1)


def make_batch(idx: torch.Tensor, variant: torch.Tensor, g: torch.Generator, images_dev: torch.Tensor,
               targets_dev: torch.Tensor, channels_last_: bool,
               aug_cfg: AugmentConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a batch from the in-memory set and augment the variants > 0, on the training device."""
    idx = idx.to(images_dev.device)
    x = images_dev[idx].float() / 255.0
    y = targets_dev[idx].float()
    aug = (variant > 0).to(images_dev.device)
    if aug_cfg == AugmentConfig.preset("none"):
        aug = torch.zeros_like(aug)
    if bool(aug.any()):
        xa, ya = augment_batch(x[aug], y[aug], g, aug_cfg)
        x[aug], y[aug] = xa, ya
    x = dataset.normalize(x * 255.0)
    if channels_last_:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def validate(model, val, device, cfg, rank: int = 0, world: int = 1) -> tuple[float, dict, dict]:
    """Validation loss and metrics. Under torchrun each rank scores a contiguous share of the validation
    images; the per-image rows and BCE sums are gathered so that every rank returns the same numbers."""
    from evaluate import evaluate_set, headline, summarize
    from backends import predict_logits
    model.eval()
    predictor = lambda imgs, bs, tta_: predict_logits(model, imgs, device, bs, tta_, cfg["channels_last"])
    part = val if world == 1 else val.subset(list(range(len(val) * rank // world, len(val) * (rank + 1) // world)))
    rows, summary = evaluate_set(predictor, part, cfg["threshold"], batch_size=max(8, cfg["batch_size"]),
                                 with_hd95=False, min_area=cfg["min_area"])
    model.train()
    if world > 1:
        # evaluate_set gives the BCE sum divided by the pixel count (or by 1 for an empty share)
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (rows, summary["val_loss"] * max(1, part.targets.size),
                                                     int(part.targets.size)))
        rows = [r for share in shares for r in share[0]]  # rank order = the validation set's order
        summary = summarize(rows)
        summary["val_loss"] = math.fsum(share[1] for share in shares) / max(1, sum(share[2] for share in shares))
    metrics = headline(summary)
    for name in sorted({s.source for s in val.samples if s.source}):  # multi-source runs: figures per source
        part_rows = [r for r in rows if r["file"].startswith(name + "/")]
        if part_rows:
            metrics.update({f"{k}_{name}": v for k, v in headline(summarize(part_rows)).items()})
    return summary["val_loss"], metrics, summary


def train_model(cfg: dict) -> dict:
    """Run (or resume) one training; returns the final metrics. See the module docstring for the outputs.

    Under torchrun (WORLD_SIZE > 1): DistributedDataParallel over nccl (CUDA) or gloo (CPU); each rank trains
    on its slice of every global batch of batch_size x world images; only rank 0 writes files."""
    rank, world, local_rank = dist_info()
    distributed = world > 1
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    dev = _device(cfg["device"], local_rank, distributed)
    if not distributed:
        return _train(cfg, dev, 0, 1)
    if dev.type not in ("cuda", "cpu"):
        raise TrainingError(f"training under torchrun needs CUDA (nccl) or the CPU (gloo), not {dev.type}; "
                            f"pass --device cpu")
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    ok = False
    try:
        metrics = _train(cfg, dev, rank, world)
        ok = True
        return metrics
    finally:
        if ok:
            torch.distributed.barrier()  # rank 0 may still be writing: leave together
        torch.distributed.destroy_process_group()


@dataclass
class RunState:
    """One training run: what set-up made of the settings (data, network, optimizer, ...) and where the run
    stands (epoch position, step, best validation loss, the epoch's running loss). The epoch loop and the
    functions beside it read and advance it."""
    cfg: dict
    dev: torch.device
    rank: int                     # this process under torchrun (0 outside it)
    world: int                    # number of processes (1 outside torchrun)
    out: Path                     # out_dir
    train: dataset.LoadedSet
    val: dataset.LoadedSet
    split_path: Path
    model: torch.nn.Module        # the bare network: validated and saved
    opt: torch.optim.Optimizer
    sched: object                 # ReduceLROnPlateau (stepped per epoch) or OneCycleLR (stepped per step)
    loss_fn: Callable
    aug_cfg: AugmentConfig
    global_batch: int             # images per optimizer step, over all ranks
    step_model: torch.nn.Module | None = None  # what the steps run: model, wrapped by DDP and/or torch.compile
    images_dev: torch.Tensor | None = None      # the training set on the device: images, lesion targets, labels
    targets_dev: torch.Tensor | None = None
    labels_dev: torch.Tensor | None = None
    use_amp: bool = False         # bf16 autocast
    rows: list[dict] = field(default_factory=list)  # log.csv so far
    # where the run stands
    start_epoch: int = 1
    start_sample: int = 0         # draws of start_epoch already trained on before a resume
    step: int = 0                 # optimizer steps so far, over all sessions
    best_loss: float = math.inf   # lowest validation loss so far (best.safetensors)
    # [sum of the per-step losses, their count] in this epoch: this rank's in this session (running), and
    # those of the epoch's steps before a resume (carried; global steps: identical on all ranks)
    running: list = field(default_factory=lambda: [0.0, 0])
    carried: list = field(default_factory=lambda: [0.0, 0])
    interrupted: bool = False     # Ctrl-C was pressed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _train(cfg: dict, dev: torch.device, rank: int, world: int) -> dict:
    """The training loop: set-up, then per epoch its steps and its bookkeeping (validation, log, files)."""
    run = setup_run(cfg, dev, rank, world)
    metrics: dict = {}
    with ctrl_c_stops(run):
        for epoch in range(run.start_epoch, cfg["epochs"] + 1):
            t0 = time.time()
            idx, variant = epoch_order(run, epoch)
            offset = run.start_sample if epoch == run.start_epoch else 0  # draws already trained on (resume)
            if epoch != run.start_epoch or not cfg["resume"]:
                run.carried = [0.0, 0]
            run.running = [0.0, 0]
            if not train_epoch(run, epoch, idx, variant, offset):
                return metrics  # stopped inside the epoch (Ctrl-C, max_steps) after saving a resumable state
            metrics = end_epoch(run, epoch, t0)
            if run.distributed:
                run.interrupted = _sum_over_ranks([float(run.interrupted)], dev)[0] > 0
            if run.interrupted or (cfg["max_steps"] and run.step >= cfg["max_steps"]):
                log.info("stopped after epoch %d; continue with --resume", epoch)
                break
    return metrics


# ---- set-up of a run: data, model, optimizer, scheduler, loss, resume state, distributed plumbing

def setup_run(cfg: dict, dev: torch.device, rank: int, world: int) -> RunState:
    """Everything the loop needs, in the order that keeps the random numbers of earlier runs: out_dir, data,
    seeded weights, optimizer, scheduler, loss, resume state, DDP / compile, the training set on the device."""
    out = _on_rank0(check_out_dir, cfg, True)
    train, val, split_path, _ = prepare_data(cfg, out, rank == 0)
    torch.manual_seed(cfg["seed"])
    model = make_model(cfg).to(dev)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cfg["sync_bn"]:
        model = convert_sync_bn(model, dev)
    opt = make_optimizer(cfg, model.parameters())
    global_batch = cfg["batch_size"] * world
    sched = make_scheduler(cfg, opt, epoch_draws(cfg, len(train)) // global_batch)
    run = RunState(cfg, dev, rank, world, out, train, val, split_path, model, opt, sched, make_loss(cfg),
                   AugmentConfig.preset(cfg["augment"]), global_batch)
    if cfg["resume"]:
        restore_run(run)
    run.step_model = wrap_model(run)
    run.images_dev = torch.as_tensor(train.images).to(dev)
    run.labels_dev = torch.tensor([dataset.CLASS_NAMES.index(s.label) for s in train.samples], device=dev)
    run.targets_dev = torch.as_tensor(train.targets).to(dev)
    if cfg["class_agnostic"]:  # one channel: the union of the lesion classes
        run.targets_dev = run.targets_dev.amax(1, keepdim=True)
    run.use_amp = (cfg["amp"] and dev.type == "cuda") or (cfg["cpu_bf16"] and dev.type == "cpu" and _cpu_has_amx())
    if cfg["resume"]:
        run.rows = [r for r in read_log(out / "log.csv") if int(r["epoch"]) < run.start_epoch]
    return run


def _load_resume(out: Path) -> tuple[dict, dict, int]:
    """(resume.pt state, the weights saved with it, batch size of the run that saved them)."""
    from model import load_checkpoint, load_resume_state
    state = load_resume_state(out / "resume.pt")
    needed = ("optimizer", "scheduler", "epoch", "step", "best_val_loss", "running_loss", "running_count", "torch_rng")
    lacking = [k for k in needed if not isinstance(state, dict) or k not in state]
    if lacking:
        raise CheckpointError(f"{out / 'resume.pt'}: not a resume state of this tool (lacks {', '.join(lacking)})")
    if "model" in state:  # weights saved in the same atomic file as the optimizer: a kill never splits them
        return state, state.pop("model"), 0
    weights, meta = load_checkpoint(out / "resume.safetensors")  # resume files written before that
    return state, weights.state_dict(), int(meta.get("train_config", {}).get("batch_size", 0))


def restore_run(run: RunState) -> None:
    """Continue where resume.pt stopped: weights, optimizer, scheduler, RNG, position, best and running loss."""
    cfg, out, opt = run.cfg, run.out, run.opt
    # rank 0 reads resume.pt (out_dir need not be shared between machines); every rank gets its content
    state, weights, saved_bs = _on_rank0(_load_resume, out)
    try:
        if state.get("optimizer_class", type(opt).__name__) != type(opt).__name__:
            raise ValueError(f"saved by {state['optimizer_class']}, this run uses {type(opt).__name__}")
        run.model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{out / 'resume.pt'}: does not fit this run (other encoder or optimizer?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    run.start_epoch = int(state["epoch"])
    # position in the epoch as samples consumed: valid with any batch size and number of processes
    # (files from before torchrun support count single-process batches of the saved batch size)
    run.start_sample = int(state["samples"]) if "samples" in state else \
        int(state["batch"]) * (saved_bs or cfg["batch_size"])
    run.best_loss, run.step = float(state["best_val_loss"]), int(state["step"])
    run.carried = [float(state["running_loss"]), int(state["running_count"])]
    saved_gb = int(state.get("global_batch", saved_bs or cfg["batch_size"]))
    log.info("resuming %s at epoch %d after %d of its training samples (step %d); global batch %d "
             "(%d per process x %d)%s", out, run.start_epoch, run.start_sample, run.step, run.global_batch,
             cfg["batch_size"], run.world, f", was {saved_gb}" if saved_gb != run.global_batch else "")


def wrap_model(run: RunState) -> torch.nn.Module:
    """The model the training steps run: DistributedDataParallel under torchrun, then torch.compile if asked."""
    step_model = run.model
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # static_graph: some encoders hold parameters the UNet never uses (efficientnet-lite0's conv_head);
        # DDP must know, or it leaves their bucket un-averaged and fails on the next step
        step_model = DDP(run.model, device_ids=[run.dev.index] if run.dev.type == "cuda" else None,
                         static_graph=True)
        if run.rank:  # stochastic layers (drop path) draw different numbers on each rank; rank 0 keeps its stream
            torch.manual_seed((run.cfg["seed"] * 1_000_003 + run.step) * 1_000_003 + run.rank)
    if run.cfg["compile"]:
        step_model = torch.compile(step_model)
    return step_model


@contextlib.contextmanager
def ctrl_c_stops(run: RunState):
    """Ctrl-C sets run.interrupted: the run stops at the next step and saves a resumable state. Under torchrun
    every rank gets Ctrl-C; they agree on stopping at the same step."""
    old_handler = signal.getsignal(signal.SIGINT)
    if threading_main():
        signal.signal(signal.SIGINT, lambda *_: setattr(run, "interrupted", True))
    try:
        yield
    finally:
        if threading_main():
            signal.signal(signal.SIGINT, old_handler)


# ---- the steps of an epoch

def epoch_draws(cfg: dict, n_train: int) -> int:
    """Draws in one epoch: draws_per_epoch when set, else every training image expand times."""
    return cfg["draws_per_epoch"] or n_train * cfg["expand"]


def epoch_order(run: RunState, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's draws: (image index, augmentation variant) each, the same for any number of processes."""
    cfg = run.cfg
    idx, variant = expanded_order(len(run.train), cfg["expand"], epoch_generator(cfg["seed"], epoch))
    if cfg["draws_per_epoch"]:  # a fixed budget: the shuffled expanded set, repeated or cut to this many draws
        reps = -(-cfg["draws_per_epoch"] // len(idx))
        idx, variant = idx.repeat(reps)[:cfg["draws_per_epoch"]], variant.repeat(reps)[:cfg["draws_per_epoch"]]
    if cfg["balance_sources"]:
        idx = balanced_order(run.train, idx, epoch_generator(cfg["seed"], epoch, -2))
    return idx, variant


def train_epoch(run: RunState, epoch: int, idx: torch.Tensor, variant: torch.Tensor, offset: int) -> bool:
    """The epoch's optimizer steps from draw `offset` on. A global batch is global_batch consecutive draws,
    and rank r takes the r-th slice of batch_size of each. Saves a resumable state every save_every_steps;
    returns False when it stopped inside the epoch (Ctrl-C, max_steps), after saving one."""
    cfg = run.cfg
    n_batches = (len(idx) - offset) // run.global_batch
    from tqdm import tqdm
    bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg['epochs']}", unit="batch",
               disable=not (cfg["progress"] and run.is_main), leave=False)
    for b in bar:
        lo = offset + b * run.global_batch + run.rank * cfg["batch_size"]
        stop_signal = train_step(run, epoch, b, idx[lo:lo + cfg["batch_size"]], variant[lo:lo + cfg["batch_size"]],
                                 lo // cfg["batch_size"])
        bar.set_postfix(loss=f"{run.running[0] / run.running[1]:.4f}")
        stop_now = stop_signal or (cfg["max_steps"] and run.step >= cfg["max_steps"])
        periodic = cfg["save_every_steps"] and run.step % cfg["save_every_steps"] == 0
        if (stop_now or periodic) and b + 1 < n_batches:
            _check_finite(run.model, run.out, f"epoch {epoch}, batch {b}")  # same weights on every rank
            running_total = epoch_loss_total(run)  # every rank takes part; rank 0 saves
            if run.is_main:
                save_state(run, epoch, offset + (b + 1) * run.global_batch, running_total)
        if stop_now and b + 1 < n_batches:
            why = "interrupted (Ctrl-C)" if stop_signal else f"max_steps={cfg['max_steps']} reached"
            log.info("%s: saved a resumable state in %s (continue with --resume)", why, run.out)
            return False
    bar.close()
    return True


def train_step(run: RunState, epoch: int, b: int, idx: torch.Tensor, variant: torch.Tensor, aug_batch: int) -> bool:
    """One optimizer step on this rank's draws (idx, variant) of batch b; aug_batch seeds their augmentation.
    Stops on a non-finite loss on any rank; returns whether Ctrl-C (on any rank) asks to stop."""
    cfg = run.cfg
    x, y = make_batch(idx, variant, epoch_generator(cfg["seed"], epoch, aug_batch), run.images_dev,
                      run.targets_dev, cfg["channels_last"], run.aug_cfg)
    with torch.autocast(run.dev.type, dtype=torch.bfloat16, enabled=run.use_amp):
        out_ = run.step_model(x)
    loss = run.loss_fn(out_, y, run.labels_dev[idx.to(run.dev)])
    if run.distributed:  # one small all-reduce per step: every rank stops at the same step
        bad, stop_signal = (v > 0 for v in _sum_over_ranks(
            [float(not torch.isfinite(loss)), float(run.interrupted)], run.dev))
    else:
        bad, stop_signal = not torch.isfinite(loss), run.interrupted
    if bad:
        raise TrainingError(f"the loss became {float(loss.detach())} at epoch {epoch}, batch {b}"
                            f"{' on one of the processes' if run.distributed else ''}; training "
                            f"stopped. The last good checkpoint in {run.out} is kept. Try a lower --lr")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if cfg["lr_schedule"] == "onecycle":
        run.sched.step()
    run.step += 1
    run.running[0] += float(loss.detach())
    run.running[1] += 1
    return stop_signal


def epoch_loss_total(run: RunState) -> list[float]:
    """(sum of the per-step training losses of this epoch, number of steps), a step's loss being the mean over
    the ranks' batches: the same numbers as one process with the whole global batch."""
    total = _sum_over_ranks(run.running, run.dev)
    return [run.carried[0] + total[0] / run.world, run.carried[1] + round(total[1] / run.world)]


# ---- the end of an epoch: validation, log, checkpoints, loss graph, resume state

def end_epoch(run: RunState, epoch: int, t0: float) -> dict:
    """Validate, step the plateau scheduler, log the epoch; rank 0 writes its files. Returns its metrics."""
    cfg, out = run.cfg, run.out
    running_total = epoch_loss_total(run)
    train_loss = running_total[0] / max(1, running_total[1])
    val_loss, metrics, _ = validate(run.model, run.val, run.dev, cfg, run.rank, run.world)  # same on every rank
    if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
        raise TrainingError(f"the loss became non-finite in epoch {epoch} (train {train_loss}, validation "
                            f"{val_loss}); training stopped. The last good checkpoint in {out} is kept. "
                            f"Try a lower --lr")
    _check_finite(run.model, out, f"the end of epoch {epoch}")
    if cfg["lr_schedule"] == "plateau":
        run.sched.step(val_loss)
    row = log_row(run, epoch, train_loss, val_loss, metrics, t0)
    metrics = {**metrics, "val_loss": val_loss, "train_loss": train_loss}
    log.info("epoch %d: train loss %.4f, val loss %.4f, val lesion Dice %.4f IoU %.4f, accuracy %.3f, lr %s, %.0fs",
             epoch, train_loss, val_loss, metrics["dice"], metrics["iou"], metrics["accuracy"], row["lr"],
             time.time() - t0)
    improved = val_loss < run.best_loss
    run.best_loss = min(run.best_loss, val_loss)
    run.running = [0.0, 0]
    if run.is_main:
        save_epoch(run, epoch, row, metrics, improved)
    return metrics


def log_row(run: RunState, epoch: int, train_loss: float, val_loss: float, metrics: dict, t0: float) -> dict:
    """The epoch's row of log.csv (LOG_FIELDS, then the per-source figures of multi-source runs)."""
    row = {"epoch": epoch, "train_loss": f"{train_loss:.6f}", "val_loss": f"{val_loss:.6f}",
           "val_dice": f"{metrics['dice']:.4f}", "val_iou": f"{metrics['iou']:.4f}",
           "val_dice_all_b": f"{metrics['dice_all_b']:.4f}", "val_accuracy": f"{metrics['accuracy']:.4f}",
           "lr": f"{run.opt.param_groups[0]['lr']:.3g}", "seconds": f"{time.time() - t0:.1f}",
           "image_size": run.cfg["image_size"]}
    source_names = {s.source for s in run.val.samples if s.source}
    row.update({f"val_{k}": f"{v:.4f}" for k, v in metrics.items() if k.rsplit("_", 1)[-1] in source_names})
    return row


def save_epoch(run: RunState, epoch: int, row: dict, metrics: dict, improved: bool) -> None:
    """Rank 0's files at the end of an epoch: best and last checkpoints, log.csv, loss graph, resume state."""
    from model import save_checkpoint
    cfg, out = run.cfg, run.out
    run.rows.append(row)
    meta = checkpoint_meta(cfg, run.split_path, epoch, metrics)
    if improved:
        save_checkpoint(out / "best.safetensors", run.model, meta)
    save_checkpoint(out / "last.safetensors", run.model, meta)
    write_log(out / "log.csv", run.rows)
    plot_losses(run.rows, Path(cfg["loss_graph_dir"]) / f"{out.name}.png",
                f"{out.name}: {cfg['encoder']} UNet, {cfg['image_size']}px",
                cfg["loss"] + (" + head CE" if cfg["head"] else ""))
    save_state(run, epoch + 1, 0, run.running)  # last: a kill before this redoes the end of the epoch


def save_state(run: RunState, epoch: int, samples: int, running_total: list[float]) -> None:
    """Everything needed to continue exactly here: weights, optimizer, scheduler, position, RNG.
    samples: training samples of this epoch already used (any batch size / world size can go on)."""
    from model import save_resume_state
    save_resume_state(run.out / "resume.pt", {  # one file, written atomically: weights, optimizer, position
        "model": {k: v.detach().to("cpu") for k, v in run.model.state_dict().items()},
        "optimizer": run.opt.state_dict(), "optimizer_class": type(run.opt).__name__,
        "scheduler": run.sched.state_dict(), "epoch": epoch, "batch": samples // run.global_batch,
        "samples": samples, "global_batch": run.global_batch, "world_size": run.world, "step": run.step,
        "best_val_loss": run.best_loss, "running_loss": float(running_total[0]),
        "running_count": int(running_total[1]), "torch_rng": torch.get_rng_state()})


def _check_finite(model, out: Path, where: str) -> None:
    """Stop before saving weights that hold NaN or infinity (the previous checkpoints stay as they are)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingError(f"the weights became non-finite at {where} (e.g. {bad[0]}); training stopped. The last "
                            f"good checkpoint in {out} is kept. Try a lower --lr")


# ---------------------------------------------------------------------------------------------------------
# torchrun / DistributedDataParallel helpers (all of them are no-ops in a plain single process)
# ---------------------------------------------------------------------------------------------------------

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_ranks(values: list[float], dev) -> list[float]:
    """Element-wise sum over all ranks (float64); the values themselves outside torchrun."""
    if not _dist_ready():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return t.tolist()


_SHARED_ERRORS = (DataError, CheckpointError, WeightsUnavailableError)  # + TrainingError, defined above


def _on_rank0(fn, *args):
    """Run fn on rank 0 only and hand its result to every rank (rank 0's files need not be visible to the
    other machines). An expected error on rank 0 (bad out_dir, bad split file) is raised on every rank, so
    that all of them stop with rank 0's message instead of waiting for it."""
    if not _dist_ready():
        return fn(*args)
    box = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args))
        except (TrainingError, *_SHARED_ERRORS) as e:
            box[0] = ("error", type(e).__name__, str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        cls = {c.__name__: c for c in (TrainingError, *_SHARED_ERRORS)}[box[0][1]]
        err = cls(box[0][2])
        err.from_rank0 = True  # main() lets rank 0 alone report it
        raise err
    return box[0][1]


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of every rank's loss reaches every rank's inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def _sync_bn_now(bn: torch.nn.Module) -> bool:
    return bn.training and _dist_ready() and torch.distributed.get_world_size() > 1


def _global_batch_norm(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch normalization of x (N x C x H x W) with the mean and variance of the global batch over all ranks,
    updating bn's running statistics as BatchNorm does (unbiased variance). Two differentiable all-reduces
    (mean, then centred sum of squares), so the gradient flows through every rank's images, as in
    torch.nn.SyncBatchNorm."""
    c = x.shape[1]
    n = torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)
    torch.distributed.all_reduce(n)
    count = float(n)
    mean = _SumOverRanks.apply(x.sum((0, 2, 3))) / count
    centred = x - mean.view(1, c, 1, 1)
    var = _SumOverRanks.apply((centred * centred).sum((0, 2, 3))) / count
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (count / max(1.0, count - 1)), alpha=m)
    y = centred * torch.rsqrt(var + bn.eps).view(1, c, 1, 1)
    if bn.affine:
        y = y * bn.weight.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1)
    return y


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch while training under torchrun: SyncBatchNorm for
    CPU/gloo, which torch.nn.SyncBatchNorm does not support. Same parameters and buffers as BatchNorm2d, so
    checkpoints are unchanged; a plain BatchNorm2d outside training or outside torchrun."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_batch_norm(self, x) if _sync_bn_now(self) else super().forward(x)


_GLOBAL_NORM_ACT: dict[type, type] = {}


def _global_norm_act_class(cls: type) -> type:
    """The same for timm's BatchNormAct2d (efficientnet-lite0): normalization, then its drop and act."""
    if cls not in _GLOBAL_NORM_ACT:
        def forward(self, x):
            return self.act(self.drop(_global_batch_norm(self, x))) if _sync_bn_now(self) else cls.forward(self, x)
        _GLOBAL_NORM_ACT[cls] = type(f"Global{cls.__name__}", (cls,), {"forward": forward})
    return _GLOBAL_NORM_ACT[cls]


def convert_sync_bn(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """BatchNorm layers -> global-batch statistics: SyncBatchNorm on CUDA (timm's converter, which also turns
    its BatchNormAct2d into SyncBatchNormAct instead of dropping the activation), GlobalBatchNorm2d on CPU."""
    if dev.type == "cuda":
        try:
            from timm.layers import convert_sync_batchnorm
        except ImportError:
            convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
        return convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
        elif isinstance(m, torch.nn.BatchNorm2d) and hasattr(m, "act") and hasattr(m, "drop"):
            m.__class__ = _global_norm_act_class(type(m))
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            raise TrainingError(f"--sync_bn on the CPU does not support {type(m).__name__} layers")
    return model


def _cpu_has_amx() -> bool:
    """True on CPUs with AMX-BF16 tiles (Sapphire Rapids and later), where bf16 autocast pays."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _device(name: str, local_rank: int, distributed: bool) -> torch.device:
    from backends import pick_device
    dev = pick_device(name)
    if dev.type == "cuda" and distributed:
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                                f"device(s); use --nproc_per_node {torch.cuda.device_count()} or fewer")
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
    from cli import RecipeError, parse_settings
    rank = dist_info()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_settings(__file__, argv, __doc__)
    except RecipeError as e:
        log.error("%s", e)
        return 2
    try:
        train_model(cfg)
    except (DataError, CheckpointError, WeightsUnavailableError, TrainingError) as e:
        if not getattr(e, "from_rank0", False) or rank == 0:  # rank 0's errors are reported once, by rank 0
            log.error("%s%s", f"rank {rank}: " if dist_info()[1] > 1 and rank else "", e)
        return 1
    except OSError as e:  # e.g. the disk filled up while saving: files are written atomically, earlier ones stay
        log.error("%s: cannot write (%s); training stopped, the files written before are kept; continue with "
                  "--resume once there is room", e.filename or cfg["out_dir"], e.strerror or e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
