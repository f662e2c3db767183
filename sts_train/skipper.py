"""Layer Dynamic Skipper: skip whole decoder layers in forward and backward.

A transformers 5.x decoder layer maps ``hidden_states -> hidden_states`` (mask and rotary
embeddings are computed once outside the layers), so returning the input unchanged is exactly
the model with that layer removed. The skipper patches each layer *instance's* ``forward``
(never wraps the module, which would rename its parameters) and delegates to the class's own
forward when the layer runs, so gradient checkpointing still applies to the layers that run.
A skipped layer's parameters take no part in the graph: they end the step with
``grad is None`` and AdamW leaves them untouched.

Only modules in training mode skip: evaluation and generation run dense.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch.nn as nn


class LayerSkipper:
    """Holds the set of layers to skip for the current optimizer step.

    Args:
        layers: the decoder layers, in order (``model_parts(model).decoder_layers``).

    Use ``skipper.set_skipped({2, 5})`` before a step (the same set for all micro-batches of
    one optimizer step), or ``with skipper.skipping({2}):`` for a probe. ``remove()`` restores
    the original forwards.
    """

    def __init__(self, layers: Iterable[nn.Module]):
        self.layers = list(layers)
        self.skipped: frozenset[int] = frozenset()
        self.force = False  # skip also in eval mode (profiler probes)
        for index, layer in enumerate(self.layers):
            if "forward" in vars(layer):
                raise RuntimeError(f"decoder layer {index} already has a patched forward")
            layer.forward = self._make_forward(index, layer.forward)

    def _make_forward(self, index: int, run_layer):
        def forward(hidden_states, *args, **kwargs):
            if index in self.skipped and (self.force or self.layers[index].training):
                return hidden_states
            return run_layer(hidden_states, *args, **kwargs)

        return forward

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def set_skipped(self, layers: Iterable[int]) -> None:
        """Skip these layer indices from now on (an empty iterable runs all layers)."""
        skipped = frozenset(int(i) for i in layers)
        bad = [i for i in skipped if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {sorted(bad)} out of range for {self.num_layers} layers")
        self.skipped = skipped

    @contextmanager
    def skipping(self, layers: Iterable[int], force: bool = True) -> Iterator[None]:
        """Temporarily skip ``layers`` (also in eval mode when ``force``)."""
        previous, previous_force = self.skipped, self.force
        self.set_skipped(layers)
        self.force = force
        try:
            yield
        finally:
            self.skipped, self.force = previous, previous_force

    def remove(self) -> None:
        """Restore the layers' own forwards."""
        for layer in self.layers:
            vars(layer).pop("forward", None)
        self.skipped = frozenset()
