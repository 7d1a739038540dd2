"""Joint image + mask augmentation on whole batches of tensors, on the training device.

Every geometric change (flip, rotation, scale/crop, shift) is one affine grid applied to the image and to
its mask with the same parameters, so the mask follows the image exactly. Intensity changes (brightness,
contrast, gamma, speckle-like multiplicative noise, blur) touch the image only. No worker processes: the
same code is fast on CPU and GPU.

The original recipe expanded the training set 7x by augmentation. Here an epoch is `expand` passes over
the training images: pass 0 shows them as they are, passes 1..expand-1 show freshly augmented variants.
The validation set is never augmented, and the split is made before any expansion.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Ranges of the random changes (all drawn uniformly, per image)."""
    hflip: float = 0.5             # probability of a horizontal flip (ultrasound has no left/right)
    vflip: float = 0.0             # vertical flips would put the skin at the bottom: off by default
    rotate_deg: float = 15.0       # rotation in [-rotate_deg, rotate_deg]
    scale: tuple = (0.85, 1.2)     # zoom factor (>1 crops into the image)
    shift: float = 0.08            # translation as a fraction of the image size
    brightness: float = 0.1        # added to [0,1] intensities
    contrast: tuple = (0.8, 1.25)  # multiplied around the image mean
    gamma: tuple = (0.7, 1.4)
    speckle: float = 0.15          # std of multiplicative noise x * (1 + s * N(0,1)), s in [0, speckle]
    blur_p: float = 0.25           # probability of a Gaussian blur
    blur_sigma: tuple = (0.4, 1.2)

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device="cpu").to(device) * (hi - lo) + lo


def random_affine(n: int, cfg: AugmentConfig, g: torch.Generator, device) -> torch.Tensor:
    """n x 2 x 3 affine matrices (output -> input sampling coordinates, as F.affine_grid expects)."""
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g, device) * math.pi / 180
    zoom = _uniform(n, *cfg.scale, g, device)
    flip_x = torch.where(_uniform(n, 0, 1, g, device) < cfg.hflip, -1.0, 1.0)
    flip_y = torch.where(_uniform(n, 0, 1, g, device) < cfg.vflip, -1.0, 1.0)
    tx = _uniform(n, -cfg.shift, cfg.shift, g, device) * 2
    ty = _uniform(n, -cfg.shift, cfg.shift, g, device) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, tx], 1),
                         torch.stack([sin * flip_x, cos * flip_y, ty], 1)], 1)
    return theta


def warp(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the same affine to images (bilinear) and masks (bilinear, then >= 0.5: stays binary)."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out_img = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_mask = F.grid_sample(masks.to(images.dtype), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
    return out_img, (out_mask >= 0.5).to(images.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of an N x 1 x H x W batch (separable, radius 3)."""
    n = x.shape[0]
    r = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                   # n x 7
    y = x.transpose(0, 1)                                             # 1 x n x H x W, one group per image
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=n)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=n)
    return y.transpose(0, 1)


def intensity(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, gamma, speckle-like noise and blur on [0,1] images (N x 1 x H x W)."""
    n, dev = images.shape[0], images.device
    view = (n, 1, 1, 1)
    x = images
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, *cfg.contrast, g, dev).view(view) + mean
    x = x + _uniform(n, -cfg.brightness, cfg.brightness, g, dev).view(view)
    x = x.clamp(0, 1) ** _uniform(n, *cfg.gamma, g, dev).view(view)
    noise = torch.randn(x.shape, generator=g, device="cpu").to(dev, x.dtype)
    x = x * (1 + _uniform(n, 0, cfg.speckle, g, dev).view(view) * noise)
    blur = _uniform(n, 0, 1, g, dev) < cfg.blur_p
    if blur.any():
        sig = _uniform(n, *cfg.blur_sigma, g, dev)
        x = torch.where(blur.view(view), _gaussian_blur(x, sig), x)
    return x.clamp(0, 1)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, g: torch.Generator,
                  cfg: AugmentConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: images float N x 1 x H x W in [0,1], masks N x C x H x W in {0,1}.

    Random numbers come from the CPU generator `g`, so a run is reproducible on any device.
    """
    cfg = cfg or AugmentConfig()
    theta = random_affine(images.shape[0], cfg, g, images.device)
    images, masks = warp(images, masks, theta)
    return intensity(images, cfg, g), masks


def expanded_order(n_images: int, expand: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of the expanded training set, shuffled: (image index, variant) for n_images * expand draws.
    Variant 0 is the image as it is; variants 1.. are augmented."""
    perm = torch.randperm(n_images * expand, generator=g)
    return perm % n_images, perm // n_images
