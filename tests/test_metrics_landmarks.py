"""LMD and the blendshape error (gstalk.metrics.landmarks)."""

from __future__ import annotations

import numpy as np
import pytest

from gstalk.metrics.landmarks import MOUTH_IDS, blendshape_error, lmd


def test_lmd_of_a_shifted_set_equals_the_shift_and_centring_removes_it():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 256, (5, 40, 3))
    shifted = target.copy()
    shifted[..., :2] += np.array([3.0, 4.0])
    np.testing.assert_allclose(lmd(shifted, target, centre=False), 5.0)
    np.testing.assert_allclose(lmd(shifted, target), 0.0, atol=1e-9)


def test_lmd_measures_a_shape_change():
    target = np.zeros((1, 4, 2))
    target[0] = [[-1, 0], [1, 0], [0, -1], [0, 1]]
    wider = target * 2.0  # every point 1 px further from the (shared) centre
    assert lmd(wider, target)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lmd(target[:, :3], target)


def test_blendshape_error_known_values():
    names = ("jawOpen", "mouthClose", "other")
    pred = np.array([[0.5, 0.1, 0.9], [0.3, 0.1, 0.9]])
    gt = np.array([[0.4, 0.3, 0.0], [0.3, 0.1, 0.0]])
    e = blendshape_error(pred, gt, names, keys=("jawOpen", "mouthClose", "absent"))
    assert e["jawOpen"] == pytest.approx(0.05) and e["mouthClose"] == pytest.approx(0.1)
    assert e["mean"] == pytest.approx(0.075) and "absent" not in e and "other" not in e


def test_mouth_ids_are_the_40_lip_landmarks():
    assert len(MOUTH_IDS) == 40 and len(set(MOUTH_IDS)) == 40 and max(MOUTH_IDS) < 468
