"""The stages of the main job, one per file, each reading and writing files so that it can run alone:

teacher   data -> teacher.safetensors (or a pretrained diffusers UNet2DModel imported)
degrade   teacher -> degradation path (stage 1, Degradation Recording)
distill   teacher + path -> generator.safetensors (stage 2, Distribution Backtracking; the baseline without a path)

common.py holds what they share (the data source, evaluation noise, batching); starts.py what a run starts from
(--generator, --fake) and how far its generator starts from the teacher; runtime.py the accelerator, the speed options
and the sharding check.
"""

from disback.stages.degrade import load_path_for, record_path
from disback.stages.distill import distill
from disback.stages.starts import check_starts, convert_start, start_far
from disback.stages.teacher import adopt_teacher, import_teacher, train_teacher

__all__ = [
    "adopt_teacher",
    "check_starts",
    "convert_start",
    "distill",
    "import_teacher",
    "load_path_for",
    "record_path",
    "start_far",
    "train_teacher",
]
