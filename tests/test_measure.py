"""measure.py on synthetic masks of known geometry: ellipse diameters and orientation, circle and star cues,
several lesions, pixel sizes (square, not square, per region), and the wording of sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import ellipse, polygon

from dicom_io import PixelSize
from measure import NOTE, TOO_SMALL, cue_values, measure_lesions, size_text


def ellipse_mask(a: float, b: float, angle_deg: float, shape=(320, 320), centre=None) -> np.ndarray:
    """An ellipse with semi-axes a (its long axis at angle_deg to the horizontal, counter-clockwise on screen)
    and b."""
    m = np.zeros(shape, bool)
    r0, c0 = centre or (shape[0] / 2, shape[1] / 2)
    rr, cc = ellipse(r0, c0, b, a, shape=shape, rotation=math.radians(angle_deg))
    m[rr, cc] = True
    return m


def polar_mask(radius, size=300) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    r = radius(t)
    m = np.zeros((size, size), bool)
    rr, cc = polygon(size / 2 + r * np.sin(t), size / 2 + r * np.cos(t), m.shape)
    m[rr, cc] = True
    return m


@pytest.mark.parametrize("angle", [0, 20, 70, 90, 160])
def test_ellipse_diameters_within_2_percent_and_orientation(angle):
    a, b = 90, 45
    (lesion,) = measure_lesions(ellipse_mask(a, b, angle))
    assert lesion["long_diameter"]["px"] == pytest.approx(2 * a, rel=0.02)
    assert lesion["perpendicular_diameter"]["px"] == pytest.approx(2 * b, rel=0.02)
    folded = min(angle % 180, 180 - angle % 180)  # the angle of a line to the horizontal, 0..90
    assert lesion["orientation"]["long_axis_angle_deg"] == pytest.approx(folded, abs=1.5)
    assert lesion["orientation"]["term"] == ("parallel" if folded < 45 else "not parallel")
    assert lesion["shape"]["term"] == "oval" and lesion["margin"]["term"] == "circumscribed"
    assert lesion["shape"]["axis_ratio"] == pytest.approx(b / a, rel=0.02)
    (r0, c0), (r1, c1) = lesion["long_diameter"]["ends_row_col"]
    assert math.hypot(r1 - r0, c1 - c0) == pytest.approx(lesion["long_diameter"]["px"], rel=1e-3)
    (p0, q0), (p1, q1) = lesion["perpendicular_diameter"]["ends_row_col"]
    dot = (r1 - r0) * (p1 - p0) + (c1 - c0) * (q1 - q0)
    assert abs(dot) / (math.hypot(r1 - r0, c1 - c0) * math.hypot(p1 - p0, q1 - q0)) < 0.02  # perpendicular


def test_longest_diameter_is_regionprops_feret_diameter():
    from skimage.measure import regionprops
    m = ellipse_mask(70, 30, 33) | ellipse_mask(20, 20, 0, centre=(200, 120))
    (region,) = regionprops(m.astype(np.uint8))
    assert measure_lesions(m)[0]["long_diameter"]["px"] == pytest.approx(region.feret_diameter_max, abs=0.01)


def test_circle_is_round_and_circumscribed():
    (lesion,) = measure_lesions(polar_mask(lambda t: 50 + 0 * t))
    assert lesion["shape"]["term"] == "round" and lesion["margin"]["term"] == "circumscribed"
    assert lesion["long_diameter"]["px"] == pytest.approx(100, rel=0.02)
    assert lesion["perpendicular_diameter"]["px"] == pytest.approx(100, rel=0.02)
    assert lesion["area"]["px"] == pytest.approx(math.pi * 50 ** 2, rel=0.02)


def test_star_is_irregular_and_not_circumscribed():
    (lesion,) = measure_lesions(polar_mask(lambda t: 70 * (0.55 + 0.45 * np.cos(5 * t))))
    assert lesion["shape"]["term"] == "irregular" and lesion["margin"]["term"] == "not circumscribed"
    assert lesion["shape"]["solidity"] < 0.8 and lesion["margin"]["convexity"] < 0.8


def test_microlobulated_outline_is_not_circumscribed():
    (lesion,) = measure_lesions(polar_mask(lambda t: 60 * (1 + 0.05 * np.cos(20 * t))))
    assert lesion["margin"]["term"] == "not circumscribed"


def test_several_lesions_largest_first_and_tiny_ones_get_no_words():
    m = ellipse_mask(40, 20, 0, centre=(80, 80)) | ellipse_mask(60, 30, 0, centre=(220, 200))
    m[10:14, 300:304] = True
    lesions = measure_lesions(m)
    assert [x["lesion"] for x in lesions] == [1, 2, 3]
    assert [x["area"]["px"] for x in lesions] == sorted((x["area"]["px"] for x in lesions), reverse=True)
    assert lesions[2]["shape"]["term"] == TOO_SMALL and lesions[2]["area"]["px"] == 16
    assert measure_lesions(np.zeros((10, 10), bool)) == []


def test_millimetres_from_the_pixel_size_of_each_lesion():
    m = ellipse_mask(50, 25, 0, centre=(100, 80)) | ellipse_mask(50, 25, 0, centre=(100, 240))
    size_at = lambda r, c: PixelSize(0.1, 0.1, "left") if c < 160 else None  # noqa: E731
    left, right = sorted(measure_lesions(m, size_at), key=lambda x: x["centroid_row_col"][1])
    assert left["long_diameter"]["mm"] == pytest.approx(left["long_diameter"]["px"] * 0.1, rel=1e-6)
    assert left["area"]["mm2"] == pytest.approx(left["area"]["px"] * 0.01, rel=1e-3)
    assert left["pixel_size"]["source"] == "left"
    assert right["long_diameter"]["mm"] is None and right["area"]["mm2"] is None  # never a guessed mm value
    assert size_text(left).endswith(" mm") and size_text(right).endswith("px (pixel size unknown)")


def test_pixels_that_are_not_square():
    # 200 x 100 pixels drawn as an ellipse, with pixels twice as tall as wide: a circle 40 mm across
    m = ellipse_mask(100, 50, 0)
    (lesion,) = measure_lesions(m, lambda r, c: PixelSize(0.4, 0.2, "test"))
    assert lesion["long_diameter"]["mm"] == pytest.approx(40, rel=0.02)
    assert lesion["perpendicular_diameter"]["mm"] == pytest.approx(40, rel=0.02)
    assert lesion["orientation"]["height_width_ratio"] == pytest.approx(1.0, rel=0.03)


def test_cue_values_and_the_note():
    (lesion,) = measure_lesions(ellipse_mask(40, 20, 10))
    cues = cue_values(lesion)
    assert set(cues) >= {"solidity", "convexity", "height_width_ratio", "long_diameter_px"}
    assert all(math.isfinite(v) for v in cues.values())
    assert all(math.isnan(v) for v in cue_values(None).values())
    assert "not a diagnosis" in NOTE and "BI-RADS" in NOTE
