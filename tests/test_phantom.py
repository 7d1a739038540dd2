"""phantom.py: the synthetic images look the way their class says."""
from __future__ import annotations

import numpy as np
import pytest

from phantom import make_phantom, write_busi_tree


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


@pytest.mark.parametrize("seed", range(5))
def test_classes_have_their_typical_shape(seed):
    img, mask = make_phantom("normal", 128, 160, seed)
    assert img.shape == (128, 160) and img.dtype == np.uint8 and not mask.any()
    _, benign = make_phantom("benign", 128, 160, seed)
    h, w = _extent(benign)
    assert w > h                      # wider than tall
    _, malignant = make_phantom("malignant", 128, 160, seed)
    h, w = _extent(malignant)
    assert h > w                      # taller than wide


def test_lesion_is_hypoechoic_and_phantoms_are_deterministic():
    img, mask = make_phantom("benign", 128, 160, 3)
    assert img[mask].mean() < 0.5 * img[~mask].mean()
    img2, mask2 = make_phantom("benign", 128, 160, 3)
    assert np.array_equal(img, img2) and np.array_equal(mask, mask2)
    with pytest.raises(ValueError):
        make_phantom("cyst")


def test_busi_tree_layout(tmp_path):
    import dataset
    write_busi_tree(tmp_path, per_class=2, height=48, width=64)
    samples = dataset.discover_busi(tmp_path)
    assert len(samples) == 6 and {s.label for s in samples} == set(dataset.CLASS_NAMES)
