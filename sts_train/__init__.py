"""sts_train: stage-aware sparse training of LLaVA-style models on the Hugging Face Trainer.

Owns the schedule contract (:mod:`sts_train.schedule`) and the model adapters
(:mod:`sts_train.adapters`) that :mod:`sts_profile` builds on.
"""

__version__ = "0.1.0"
