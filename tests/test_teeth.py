"""Teeth and inner-mouth scores (gstalk.metrics.teeth) against hand computations, and eval's
report of them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gstalk.metrics.teeth import INNER_LIP_IDS, inner_mouth_mask, teeth_pixels, teeth_scores


def _landmarks(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """478 MediaPipe points, all at the centre except the inner-lip ring, laid on the
    rectangle (x0, y0)-(x1, y1): 10 upper points left to right, 10 lower right to left."""
    lm = np.full((478, 3), [(x0 + x1) / 2, (y0 + y1) / 2, 0.0], np.float32)
    xs = np.linspace(x0, x1, 10)
    ring = [(x, y0) for x in xs] + [(x, y1) for x in xs[::-1]]
    lm[list(INNER_LIP_IDS), :2] = ring
    return lm


def test_the_inner_mouth_is_the_filled_inner_lip_polygon():
    m = inner_mouth_mask(_landmarks(10, 20, 29, 25), 40, 50)
    want = np.zeros((40, 50), bool)
    want[20:26, 10:30] = True  # OpenCV fills a polygon's boundary pixels too
    np.testing.assert_array_equal(m, want)
    closed = inner_mouth_mask(_landmarks(10, 20, 29, 20), 40, 50)
    assert closed.sum() == 20  # a closed mouth: the one row of the lips' line
    with pytest.raises(ValueError, match="478"):
        inner_mouth_mask(np.zeros((68, 2)), 40, 50)


def test_teeth_are_the_bright_unsaturated_pixels_inside_the_mask():
    img = np.zeros((4, 4, 3), np.uint8)
    img[0, 0] = (240, 235, 230)  # enamel: V 0.94, S 0.04
    img[0, 1] = (200, 60, 70)  # lip: S 0.70
    img[0, 2] = (90, 90, 90)  # shadow: V 0.35
    img[0, 3] = (116, 116, 116)  # grey at V 0.455: counts
    img[1, 0] = (255, 160, 150)  # S 0.41: counts
    img[1, 1] = (255, 130, 150)  # S 0.49: does not
    img[2, 2] = (250, 250, 250)  # white, but outside the mask
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    got = teeth_pixels(img, mask)
    want = np.zeros((4, 4), bool)
    want[0, 0] = want[0, 3] = want[1, 0] = True
    np.testing.assert_array_equal(got, want)


def test_teeth_scores_count_each_images_own_teeth_and_the_inner_mouth_psnr():
    h, w = 40, 50
    truth_lm = _landmarks(10, 20, 29, 25)  # 6 x 20 px inner mouth
    truth = np.full((h, w, 3), (180, 120, 100), np.uint8)  # skin
    truth[20:26, 10:30] = (60, 20, 30)  # dark mouth
    truth[20:23, 12:28] = (235, 230, 225)  # upper teeth: 3 x 16 = 48 px
    render = truth.copy()
    render[20:23, 20:28] = (60, 20, 30)  # half the teeth missing: 24 px
    render_lm = _landmarks(10, 20, 29, 24)  # the render's own (narrower) mouth
    s = teeth_scores([render, truth], [render_lm, truth_lm], [truth, truth], [truth_lm, truth_lm])
    assert s["teeth_px_truth"] == 48.0 and s["teeth_frames_truth"] == 2.0
    assert s["teeth_px"] == (24 + 48) / 2
    assert s["teeth_ratio"] == pytest.approx(72 / 96)
    diff = (np.float64([235, 230, 225]) - np.float64([60, 20, 30])) / 255.0  # 24 px differ, in frame 1
    mse = 24 * (diff ** 2).sum() / (3 * 2 * 120)
    assert s["inner_mouth_psnr"] == pytest.approx(-10 * math.log10(mse))
    assert s["inner_mouth_px"] == 120.0
    none = teeth_scores([render], [render_lm], [render * 0], [truth_lm])  # a black frame: no teeth
    assert math.isnan(none["teeth_ratio"]) and none["teeth_frames_truth"] == 0.0
    with pytest.raises(ValueError, match="as many"):
        teeth_scores([render], [render_lm, truth_lm], [truth], [truth_lm])


def test_the_eval_report_has_the_teeth_table():
    from gstalk.stages.evaluate import teeth_lines

    row = {"teeth_ratio": 0.42, "teeth_px": 78.3, "inner_mouth_psnr": 16.0}
    m = {**row, "teeth_px_truth": 184.4, "teeth_frames_truth": 23.0, "inner_mouth_px": 432.0,
         "codes": {"oracle": {**row, "teeth_ratio": 0.79}}, "baselines": {"coarse": {"psnr": 1.0}}}
    text = "\n".join(teeth_lines(m))
    assert "| fine model | 0.42 | 78.3 | 16.00 |" in text and "| fine model, tracked code (oracle) | 0.79 |" in text
    assert "coarse" not in text and "184.4 per frame, in 23 of the frames" in text
    assert teeth_lines({"baselines": {}}) == []  # metrics written before teeth were measured
