"""Writes the user-style data set of BENCHMARKS.md's "data no issue names" section: a 5-arm pinwheel of 3,000 points,
in metres around (300, -75), as a CSV with a header.   python benchmarks/pinwheel.py runs/pinwheel.csv"""

import sys

import numpy as np

rng = np.random.default_rng(7)
n, arms = 3000, 5
r = rng.normal(1.0, 0.25, n).clip(0.1)
theta = rng.integers(arms, size=n) * 2 * np.pi / arms + 1.3 * r + rng.normal(0, 0.08, n)
points = np.stack([r * np.cos(theta), r * np.sin(theta)], 1) * 40 + np.array([300.0, -75.0])
np.savetxt(sys.argv[1] if len(sys.argv) > 1 else "pinwheel.csv", points, delimiter=",", header="x_m,y_m", comments="")
