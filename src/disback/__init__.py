"""disback: distill a diffusion model into a one-step generator with Distribution Backtracking."""

__version__ = "0.1.0"
