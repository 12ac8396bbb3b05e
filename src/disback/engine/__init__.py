"""The trainer: the one training loop (steps, timing, evaluation, callbacks, progress, the non-finite guard),
checkpoints that resume exactly, and the metrics log. It knows nothing of methods: a task does one iteration."""
