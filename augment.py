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
    # scanner differences (off in the recipe; on in the "scanner" preset). They draw random numbers only when
    # on, so the recipe's augmentation is the same as before they existed.
    speckle_scales: tuple = ()     # coarser speckle: noise drawn at 1/k resolution and upsampled, for each k
    downup_p: float = 0.0          # probability of resampling down then up (lower scanner resolution)
    downup_scale: tuple = (0.35, 0.8)
    depth_ramp: float = 0.0        # brightness x (1 + a * (depth - 0.5)), a in [-depth_ramp, depth_ramp] (TGC)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """'recipe' (the original's ranges), 'scanner' (wider gain, contrast and zoom, speckle of several
        sizes, lower resolutions and depth gain ramps: what differs between scanners and hospitals), or 'none'
        (every draw shows the image as it is: the ablation's no-augmentation arm at the same budget)."""
        if name == "recipe":
            return cls()
        if name == "none":
            return cls(hflip=0.0, rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, brightness=0.0, contrast=(1.0, 1.0),
                       gamma=(1.0, 1.0), speckle=0.0, blur_p=0.0)
        if name == "scanner":
            return cls(scale=(0.8, 1.4), brightness=0.15, contrast=(0.6, 1.5), gamma=(0.5, 1.8), speckle=0.25,
                       blur_p=0.3, blur_sigma=(0.4, 1.6), speckle_scales=(2, 4), downup_p=0.3, depth_ramp=0.5)
        raise ValueError(f"augment must be 'recipe', 'scanner' or 'none', got {name!r}")


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
    return scanner_shift(x, cfg, g).clamp(0, 1)


def scanner_shift(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Coarse speckle, lower resolution and a depth gain ramp on [0,1] images N x 1 x H x W (each only when
    its setting is on)."""
    n, _, h, w = x.shape
    dev, view = x.device, (n, 1, 1, 1)
    for k in cfg.speckle_scales:
        coarse = torch.randn((n, 1, max(1, h // k), max(1, w // k)), generator=g, device="cpu").to(dev, x.dtype)
        noise = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        x = x * (1 + _uniform(n, 0, cfg.speckle, g, dev).view(view) * noise)
    if cfg.downup_p > 0:
        pick = _uniform(n, 0, 1, g, dev) < cfg.downup_p
        factor = _uniform(n, *cfg.downup_scale, g, dev)
        for i in torch.nonzero(pick).flatten().tolist():
            size = (max(8, round(h * float(factor[i]))), max(8, round(w * float(factor[i]))))
            small = F.interpolate(x[i:i + 1], size=size, mode="area")
            x = torch.cat([x[:i], F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), x[i + 1:]])
    if cfg.depth_ramp > 0:
        a = _uniform(n, -cfg.depth_ramp, cfg.depth_ramp, g, dev).view(view)
        depth = torch.linspace(0, 1, h, device=dev, dtype=x.dtype).view(1, 1, h, 1)
        x = x * (1 + a * (depth - 0.5))
    return x


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


def example_sheet(preset: str = "scanner", n_images: int = 3, variants: int = 5, seed: int = 0):
    """A PIL image: phantom scans (left column) and augmented variants of each with their masks outlined."""
    import numpy as np
    from PIL import Image

    from phantom import make_phantom
    rows = []
    g = torch.Generator().manual_seed(seed)
    for k, label in enumerate(("benign", "malignant", "normal")[:n_images]):
        grey, mask = make_phantom(label, 192, 240, seed=seed + k)
        x = torch.from_numpy(grey).float().div(255).expand(variants, 1, *grey.shape).clone()
        y = torch.from_numpy(mask).float().expand(variants, 1, *grey.shape).clone()
        xa, ya = augment_batch(x, y, g, AugmentConfig.preset(preset))
        tiles = [(x[0, 0], y[0, 0])] + [(xa[i, 0], ya[i, 0]) for i in range(variants)]
        row = []
        for img, m in tiles:
            rgb = np.repeat((img.numpy() * 255).astype(np.uint8)[..., None], 3, 2)
            m = m.numpy() > 0.5
            edge = m ^ (np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            rgb[edge & m] = (60, 220, 60)
            row.append(np.pad(rgb, ((2, 2), (2, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(row, 1))
    return Image.fromarray(np.concatenate(rows, 0))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write a picture of augmented phantom scans (first column: as they "
                                             "are; mask outlined in green).")
    ap.add_argument("--preset", default="scanner", help="recipe or scanner")
    ap.add_argument("--out", default="sample_predictions/augment_scanner.png")
    a = ap.parse_args()
    example_sheet(a.preset).save(a.out)
    print(f"wrote {a.out}")
