"""DisBack and the score-distillation methods it builds on: the tasks that do one iteration (score fitting,
distillation), the degradation path and the reader of its nodes, the target schedules, stage 1's node placement,
DMD2's GAN head and LoRA networks."""
