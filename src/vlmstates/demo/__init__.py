"""Demo inputs: the bundled VQA set and tiny randomly initialised checkpoints of the real architectures."""
