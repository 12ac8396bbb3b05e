"""The mathematics, with no file I/O: EDM and VP denoisers around any backbone, the one-step generator, the losses in
the papers' notation, the teacher's sampler and the backbones."""
