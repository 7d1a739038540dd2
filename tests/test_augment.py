"""augment.py: the mask follows the image exactly; intensity changes leave masks alone; 7x expansion."""
from __future__ import annotations

import torch

from augment import AugmentConfig, augment_batch, expanded_order, intensity, random_affine, warp


def _square_batch(n=6, size=64):
    """A bright square on a dark image, its mask exactly the square, at a known place per image."""
    img = torch.zeros(n, 1, size, size)
    mask = torch.zeros(n, 2, size, size)
    for i in range(n):
        y, x = 8 + 4 * i, 30 - 3 * i
        img[i, 0, y:y + 16, x:x + 20] = 1.0
        mask[i, i % 2, y:y + 16, x:x + 20] = 1.0
    return img, mask


def test_flip_moves_image_and_mask_to_the_known_place():
    img, mask = _square_batch(1)
    cfg = AugmentConfig(hflip=1.0, rotate_deg=0, scale=(1, 1), shift=0)
    theta = random_affine(1, cfg, torch.Generator().manual_seed(0), "cpu")
    out_img, out_mask = warp(img, mask, theta)
    expected = img.flip(-1)
    assert torch.allclose(out_img, expected, atol=1e-5)
    assert torch.equal(out_mask, mask.flip(-1))


def test_geometric_augmentation_keeps_mask_on_the_square():
    img, mask = _square_batch()
    cfg = AugmentConfig(speckle=0.0, blur_p=0.0, brightness=0.0, contrast=(1, 1), gamma=(1, 1))
    for seed in range(5):
        out_img, out_mask = augment_batch(img, mask, torch.Generator().manual_seed(seed), cfg)
        lesion = out_mask.amax(1, keepdim=True) > 0
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        # inside the warped mask the warped image is bright, outside it is dark (bilinear edges aside)
        assert out_img[lesion].mean() > 0.9
        assert out_img[~lesion].mean() < 0.02
        inter = ((out_img > 0.5) & lesion).sum()
        union = ((out_img > 0.5) | lesion).sum()
        assert inter / union > 0.9
        # the class channel travels with its mask
        assert torch.equal(out_mask[0::2, 1].sum((1, 2)) > 0, torch.zeros(3, dtype=torch.bool))


def test_intensity_changes_stay_in_range_and_are_seeded():
    img, _ = _square_batch()
    a = intensity(img * 0.5 + 0.2, AugmentConfig(blur_p=1.0), torch.Generator().manual_seed(3))
    b = intensity(img * 0.5 + 0.2, AugmentConfig(blur_p=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, img * 0.5 + 0.2)


def test_expansion_shows_each_image_once_as_is_and_expand_minus_one_times_augmented():
    idx, variant = expanded_order(10, 7, torch.Generator().manual_seed(0))
    assert len(idx) == 70
    for i in range(10):
        assert sorted(variant[idx == i].tolist()) == list(range(7))
    assert (variant == 0).sum() == 10


def test_scanner_options_off_draw_no_random_numbers_so_the_recipe_is_unchanged():
    from augment import scanner_shift
    x = torch.rand(3, 1, 32, 32)
    g = torch.Generator().manual_seed(4)
    before = g.get_state().clone()
    assert torch.equal(scanner_shift(x, AugmentConfig(), g), x)
    assert torch.equal(g.get_state(), before)
    assert AugmentConfig.preset("recipe") == AugmentConfig()


def test_scanner_preset_changes_images_not_masks_and_stays_in_range():
    from augment import scanner_shift
    img, mask = _square_batch(6)
    cfg = AugmentConfig.preset("scanner")
    out = scanner_shift(img.clone(), AugmentConfig(speckle=0.3, speckle_scales=(4,), downup_p=1.0, depth_ramp=0.5),
                        torch.Generator().manual_seed(1))
    assert out.shape == img.shape and not torch.allclose(out, img)
    xa, ya = augment_batch(img, mask, torch.Generator().manual_seed(2), cfg)
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert set(ya.unique().tolist()) <= {0.0, 1.0}
    # the intensity part never moves the mask: geometry off -> masks identical
    still = AugmentConfig(**{**cfg.to_dict(), "hflip": 0, "rotate_deg": 0, "scale": (1, 1), "shift": 0})
    _, ym = augment_batch(img, mask, torch.Generator().manual_seed(3), still)
    assert torch.equal(ym, mask)


def test_depth_ramp_brightens_one_end_and_darkens_the_other():
    from augment import scanner_shift
    flat = torch.full((4, 1, 40, 20), 0.5)
    out = scanner_shift(flat, AugmentConfig(depth_ramp=0.5), torch.Generator().manual_seed(0))
    top, bottom = out[:, 0, 0].mean(1), out[:, 0, -1].mean(1)
    assert torch.all((top - 0.5) * (bottom - 0.5) <= 0)  # opposite sides of the original grey


def test_example_sheet_is_drawn():
    from augment import example_sheet
    sheet = example_sheet("scanner", n_images=1, variants=2)
    assert sheet.size[0] > 3 * 240 and sheet.mode == "RGB"
