from __future__ import annotations

import numpy as np

from disback.metrics.points import PointMetrics, directions, mmd, mode_coverage, sliced_wasserstein


def test_swd_is_zero_for_identical_sets_and_equals_the_shift_average():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 2))
    dirs = directions(2, 512)
    assert sliced_wasserstein(x, x, dirs) == 0.0
    # For a pure shift v, SW1 is the mean of |v . u| over directions: |v| * 2/pi in 2-D.
    v = np.array([3.0, 4.0])
    assert abs(sliced_wasserstein(x, x + v, dirs) - 5.0 * 2 / np.pi) < 1e-2


def test_swd_handles_sets_of_different_sizes():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 2)), rng.standard_normal((3000, 2))
    assert sliced_wasserstein(a, b, directions(2, 64)) < 0.15
    assert sliced_wasserstein(a + 1.0, b, directions(2, 64)) > 0.5


def test_mmd_grows_with_distance():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((400, 2)), rng.standard_normal((400, 2))
    bw = np.array([0.5, 1.0])
    assert mmd(x, y, bw) < mmd(x, y + 0.5, bw) < mmd(x, y + 2.0, bw)


def test_mode_coverage_counts_missing_modes():
    modes = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    rng = np.random.default_rng(3)
    two = np.concatenate([modes[i] + 0.05 * rng.standard_normal((200, 2)) for i in (0, 1)])
    cov = mode_coverage(two, modes, 0.05)
    assert cov["modes"] == 0.5 and cov["high_quality"] > 0.95
    cov = mode_coverage(two + 1.0, modes, 0.05)
    assert cov["high_quality"] == 0.0


def test_metrics_report_nan_for_non_finite_samples():
    m = PointMetrics(np.zeros((20, 2)) + np.arange(20)[:, None], 8)
    assert np.isnan(m(np.full((20, 2), np.nan))["swd"])
