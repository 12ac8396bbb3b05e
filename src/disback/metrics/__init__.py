"""Quality measures. Points: sliced Wasserstein distance (SWD), MMD, mode coverage. Images: the Fréchet distance on
the features of a classifier trained on the data set (the offline default, not Inception FID) or of Inception
(Inception FID, as NVlabs/edm computes it). Text: a CLIP score of images against their prompts."""

from __future__ import annotations

from disback.metrics.points import PointMetrics, mmd, mode_coverage, sliced_wasserstein

__all__ = ["PointMetrics", "build_metrics", "mmd", "mode_coverage", "sliced_wasserstein"]


def build_metrics(
    data, projections: int, features: str = "classifier", classifier_steps: int = 1500, reference: str = ""
):
    """The measures for this data: PointMetrics for points, ImageMetrics for images (against the held-out images, or
    against ``reference``: an .npz of mu/sigma, a path or a URL, such as EDM's FID reference statistics)."""
    if data.kind == "points":
        return PointMetrics(data.reference, projections, data.modes, data.mode_std)
    if data.kind == "latents":  # text-to-image: no offline measure of prompt-conditioned images; losses are logged
        return lambda samples: {}
    from disback.metrics.images import ImageMetrics, image_features

    fn, info = image_features(features, data.train, data.labels, classifier_steps)
    if not reference:
        return ImageMetrics(data.reference, fn, info)
    import torch

    from disback.metrics.images import reference_stats
    from disback.storage.fetch import fetch

    file, digest = fetch(reference, what="reference statistics", hint="give an .npz of mu/sigma or its URL")
    dimension = int(fn(torch.as_tensor(data.reference[:2], dtype=torch.float32)).shape[1])
    info = {**info, "reference": str(reference), "reference_sha256": digest}
    return ImageMetrics(reference_stats(file, dimension), fn, info)
