"""Quality measures. Point data: sliced Wasserstein distance (SWD), MMD, mode coverage."""

from disback.metrics.points import PointMetrics, mmd, mode_coverage, sliced_wasserstein

__all__ = ["PointMetrics", "mmd", "mode_coverage", "sliced_wasserstein"]
