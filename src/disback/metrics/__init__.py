"""Quality measures. Points: sliced Wasserstein distance (SWD), MMD, mode coverage. Images: an FID-style Fréchet
distance on the features of a classifier trained on the data set (not Inception FID)."""

from __future__ import annotations

from disback.metrics.points import PointMetrics, mmd, mode_coverage, sliced_wasserstein

__all__ = ["PointMetrics", "build_metrics", "mmd", "mode_coverage", "sliced_wasserstein"]


def build_metrics(data, projections: int, features: str = "classifier", classifier_steps: int = 1500):
    """The measures for this data: PointMetrics for points, ImageMetrics for images."""
    if data.kind == "points":
        return PointMetrics(data.reference, projections, data.modes, data.mode_std)
    if data.kind == "latents":  # text-to-image: no offline measure of prompt-conditioned images; losses are logged
        return lambda samples: {}
    from disback.metrics.images import ImageMetrics, classifier_features, plugged_features

    if features == "classifier":
        fn, info = classifier_features(data.train, data.labels, classifier_steps)
    else:
        fn, info = plugged_features(features)
    return ImageMetrics(data.reference, fn, info)
