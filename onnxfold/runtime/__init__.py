"""Everything that runs onnxruntime: one session factory, batched runs, per-channel statistics, and
the inputs the runs take (random, from .npz files, or token sequences for language models). Below
every stage."""
