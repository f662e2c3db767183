"""Functional probes: what really happens to the loss when a layer or visual tokens go.

Cosine scores only moderately predict impact, so these run the model again with the trainer's
own sparsity machinery (:class:`sts_train.skipper.LayerSkipper`,
:class:`sts_train.compress.TokenCompressor`, both forced on in eval mode): the probe measures
exactly what training with the schedule would do.

Over the supervised positions ``n`` of all batches (labels != -100, shifted as in causal LM
training), with ``p`` the dense and ``p~`` the probed next-token distribution::

    dense_loss          = mean_n  -log p(y_n)
    skip_loss_delta[l]  = mean_n  -log p~(y_n | layer l skipped)  - dense_loss
    skip_kl[l]          = mean_n  sum_v p(v) (log p(v) - log p~(v))          (KL(dense || skipped))
    compress_loss_delta[method, r] = mean_n -log p~(y_n | visual tokens compressed to r) - dense_loss

``compress_loss_delta_se`` and ``skip_loss_delta_se`` are the standard errors of those deltas
over the calibration samples (``m`` of them with supervised tokens): with ``d_i`` the sample's
summed NLL increase and ``n_i`` its supervised tokens, the delta is the ratio ``sum d / sum n``
and its linearised standard error is ``sqrt(m / (m - 1) * sum_i (d_i - delta * n_i)^2) / sum n``
(NaN below two samples). The derivation reads them to tell options apart from probe noise.

Skipping layer ``l`` returns its input unchanged, which is exactly the model with the layer
removed. ``random`` compression uses a generator seeded from (seed, batch index, keep ratio),
so repeated analyses give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from sts_train.compress import COMPRESSORS, TokenCompressor
from sts_train.errors import ScheduleError
from sts_train.skipper import LayerSkipper

KEEP_RATIOS = (0.5, 0.25, 0.125)
IGNORE_INDEX = -100


def supervised_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float32) at the positions that predict a supervised token.

    Returns:
        ``(log_probs (n, V), targets (n,))`` where position ``i`` predicts ``labels[i + 1]``.
    """
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    return F.log_softmax(shift_logits[keep].float(), dim=-1), shift_labels[keep]


def rows_nll(log_probs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``labels``: ``(sum of -log p(target) over its supervised positions, their
    count)``, from :func:`supervised_logprobs`' output for those labels."""
    keep = labels[:, 1:] != IGNORE_INDEX
    nll = -log_probs.gather(-1, targets[:, None])[:, 0]
    return nll.new_zeros(labels.shape[0]).index_add_(0, keep.nonzero()[:, 0], nll), keep.sum(1)


def ratio_se(increase: list[float], counts: list[int]) -> float:
    """Linearised standard error of ``sum(increase) / sum(counts)`` over samples with counts > 0."""
    pairs = [(d, n) for d, n in zip(increase, counts) if n > 0]
    m, total = len(pairs), sum(n for _, n in pairs)
    if m < 2:
        return math.nan
    ratio = sum(d for d, _ in pairs) / total
    return math.sqrt(m / (m - 1) * sum((d - ratio * n) ** 2 for d, n in pairs)) / total


def kl_sum(dense_log_probs: torch.Tensor, probe_log_probs: torch.Tensor) -> float:
    """Sum over positions of ``KL(dense || probe)``."""
    return float((dense_log_probs.exp() * (dense_log_probs - probe_log_probs)).sum())


class ProbeRunner:
    """Layer-skip and token-compression probes, accumulated over batches.

    Args:
        model: the model (eval mode); the skipper and compressor are attached until ``remove()``.
        parts: its :class:`sts_train.adapters.ModelParts`.
        pad_token_id: id that fills re-padded rows after compression.
        skip_layers: probe skipping each decoder layer.
        methods: compressor methods to probe (default: all of ``COMPRESSORS``).
        keep_ratios: visual-token keep ratios to probe.
        seed: seed of the ``random`` compressor's generators.

    Call ``run_batch(batch, dense_logits, batch_index)`` per batch with the logits of the
    dense forward (the passive collection's), then ``layer_rows()`` / ``token_rows()``.
    """

    def __init__(self, model, parts, pad_token_id: int, *, skip_layers: bool = True,
                 methods: Iterable[str] | None = None, keep_ratios: Iterable[float] = KEEP_RATIOS,
                 seed: int = 0):
        self.model, self.parts, self.seed = model, parts, seed
        self.skip_layers = skip_layers
        self.methods = list(COMPRESSORS if methods is None else methods)
        self.keep_ratios = tuple(keep_ratios)
        self.skipper = LayerSkipper(parts.decoder_layers)
        self.compressor = TokenCompressor(model, parts, pad_token_id)
        self.compressor.force = True
        self.notes: list[str] = []
        # per calibration sample (the totals are their sums): supervised tokens, dense NLL sum,
        # NLL sum with each layer skipped and per (method, ratio); KL sums per skipped layer
        self._row_tokens: list[int] = []
        self._row_dense: list[float] = []
        self._row_skip: dict[int, list[float]] = {layer: [] for layer in range(parts.num_layers)}
        self._skip_kl = dict.fromkeys(self._row_skip, 0.0)
        self._row_compress: dict[tuple[str, float], list[float]] = {
            (m, r): [] for m in self.methods for r in self.keep_ratios}
        self._failed: set[str] = set()

    def _forward(self, batch: dict):
        with torch.no_grad():
            return self.model(**batch)

    def run_batch(self, batch: dict, dense_logits: torch.Tensor, batch_index: int) -> None:
        """Accumulate every probe on one batch."""
        labels = batch["labels"]
        dense_lp, targets = supervised_logprobs(dense_logits, labels)
        if targets.numel() == 0:
            return
        dense_rows, row_tokens = rows_nll(dense_lp, targets, labels)
        self._row_tokens += row_tokens.tolist()
        self._row_dense += dense_rows.tolist()
        if self.skip_layers:
            for layer in range(self.parts.num_layers):
                with self.skipper.skipping({layer}, force=True):
                    logits = self._forward(batch).logits
                probe_lp, _ = supervised_logprobs(logits, labels)
                self._row_skip[layer] += rows_nll(probe_lp, targets, labels)[0].tolist()
                self._skip_kl[layer] += kl_sum(dense_lp, probe_lp)
        if "pixel_values" not in batch:
            for rows in self._row_compress.values():  # nothing to compress: the loss is the dense loss
                rows += dense_rows.tolist()
            return
        for method in self.methods:
            if method in self._failed:
                continue
            for r_index, ratio in enumerate(self.keep_ratios):
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index * 1009 + r_index)
                self.compressor.set(method, ratio, generator=generator)
                try:
                    out = self._forward(batch)
                except ScheduleError as exc:  # text_guided on samples without instruction text
                    self._failed.add(method)
                    self.notes.append(f"token probe {method!r} left out: {exc}")
                    break
                finally:
                    self.compressor.set(None, 1.0)
                # the same supervised tokens per row: compression drops only image placeholders,
                # which are all unsupervised
                rows, counts = rows_nll(*supervised_logprobs(out.logits, out.llm_labels), out.llm_labels)
                if not torch.equal(counts, row_tokens):
                    raise RuntimeError(f"token probe {method!r} changed the supervised tokens per row")
                self._row_compress[(method, ratio)] += rows.tolist()

    def _delta_and_se(self, rows: list[float]) -> tuple[float, float]:
        """Loss change over the dense loss of a probe's per-sample NLL sums, and its s.e."""
        increase = [r - d for r, d in zip(rows, self._row_dense)]
        return sum(increase) / sum(self._row_tokens), ratio_se(increase, self._row_tokens)

    def layer_rows(self) -> list[dict]:
        """Rows ``{layer, token_type="all", metric, value}`` of skip_loss_delta (with its
        skip_loss_delta_se) and skip_kl."""
        if not self.skip_layers or not self._row_tokens:
            return []
        rows = []
        for layer, probe in self._row_skip.items():
            delta, se = self._delta_and_se(probe)
            rows += [{"layer": layer, "token_type": "all", "metric": "skip_loss_delta", "value": delta},
                     {"layer": layer, "token_type": "all", "metric": "skip_loss_delta_se", "value": se},
                     {"layer": layer, "token_type": "all", "metric": "skip_kl",
                      "value": self._skip_kl[layer] / sum(self._row_tokens)}]
        return rows

    def token_rows(self) -> list[dict]:
        """Rows ``{layer=-1, metric, method, keep_ratio, threshold, value}``: dense_loss, and
        compress_loss_delta with its compress_loss_delta_se per method and keep ratio."""
        nan = math.nan
        if not self._row_tokens:
            return []
        rows = [{"layer": -1, "metric": "dense_loss", "method": "", "keep_ratio": nan,
                 "threshold": nan, "value": sum(self._row_dense) / sum(self._row_tokens)}]
        for (method, ratio), probe in self._row_compress.items():
            if method in self._failed:
                continue
            delta, se = self._delta_and_se(probe)
            rows += [{"layer": -1, "metric": metric, "method": method, "keep_ratio": ratio, "threshold": nan,
                      "value": value} for metric, value in (("compress_loss_delta", delta),
                                                            ("compress_loss_delta_se", se))]
        return rows

    def remove(self) -> None:
        """Detach the skipper and the compressor."""
        self.skipper.remove()
        self.compressor.remove()
