"""sts_profile: measure layer and visual-token redundancy across a run's checkpoints and
derive a stage schedule for :mod:`sts_train`."""

__version__ = "0.1.0"
