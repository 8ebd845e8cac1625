"""Post-training expert compression: calibrate a trained MoE, prune or merge its experts per layer, write a smaller
run directory (docs/compression.md).

    calibration.py   per-layer statistics from hooks on the MoE layers (any parallel layout)
    experts.py       one layer's experts as tensors; selection, neuron matching, the routed output
    methods/         one file per method, registered by name (frequency, random, reconstruction, merge, dern)
    writer.py        apply a method to every MoE layer; write the run directory
    cli.py           moetrain-compress
"""


class CompressError(ValueError):
    """A compression request the user can fix: one line, nothing written."""
