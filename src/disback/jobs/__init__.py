"""The jobs a user runs on top of the stages: the demo (both runs, summary.json), its report, sampling a saved model,
and the export of a one-step generator as a diffusers pipeline."""
