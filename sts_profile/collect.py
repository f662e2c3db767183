"""Passive redundancy metrics, collected by hooks in one forward pass per batch.

Hooks on every decoder layer (and on the projector) see each batch once; every metric is
accumulated as running sums (float64), so memory does not grow with the number of tokens,
batches or checkpoints. Token types per row: *visual* = positions where
``input_ids == image_token_id``; *text* = every other attended position; padding is excluded.

Per decoder layer ``l`` with input ``x`` and output ``y`` at one token (``<a, b>`` the dot
product)::

    cos                   = <x, y> / (|x| |y|)
    block_influence       = 1 - cos                      (Men et al. 2024, "ShortGPT")
    angular_distance      = arccos(cos) / pi             (Gromov et al. 2024)
    relative_update_norm  = |y - x| / |x|

each averaged over the tokens of a type (``all`` = visual and text pooled).

Text -> visual attention at layer ``l``, for the text queries that come after the row's last
visual token (earlier ones cannot see the image under the causal mask), recomputed from the
layer's own q/k projections and rotary embeddings instead of switching the model to eager
attention::

    A[h, t, :] = softmax_j( <q_ht, k_hj> * scaling  over keys j <= t, not padding )
    text_to_visual_attention = mean_{h,t} sum_{j visual} A[h, t, j]
    m_j = mean_{h,t} A[h, t, j] / sum_{j' visual} mean_{h,t} A[h, t, j']     (per row)
    visual_tokens_for_50pct_mass = (smallest n with top-n sum of m >= 0.5) / N_visual

averaged over rows with an image (``..._90pct_mass`` likewise).

Projector output ``v`` (per image, tokens on the ``rows x cols`` patch grid)::

    neighbor_cosine = mean over right and down neighbour pairs of cos(v_rc, v_r(c+1)), cos(v_rc, v_(r+1)c)
    mergeable_frac(tau) = fraction of tokens i with max_{j != i, same image} cos(v_i, v_j) >= tau
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

TOKEN_TYPES = ("visual", "text")
LAYER_METRICS = ("block_influence", "angular_distance", "relative_update_norm")
MASS_LEVELS = (0.5, 0.9)
MERGE_THRESHOLDS = (0.8, 0.9, 0.95)
NO_LAYER = -1  # layer index of projector-level metrics in the tokens table


def block_metrics(h_in: torch.Tensor, h_out: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-token layer metrics.

    Args:
        h_in, h_out: ``(..., D)`` input and output hidden states of a decoder layer.

    Returns:
        ``(..., 3)`` float32: block influence, angular distance, relative update norm.
    """
    x, y = h_in.float(), h_out.float()
    norm_x, norm_y = x.norm(dim=-1), y.norm(dim=-1)
    cos = ((x * y).sum(-1) / (norm_x * norm_y).clamp_min(eps)).clamp(-1.0, 1.0)
    rel = (y - x).norm(dim=-1) / norm_x.clamp_min(eps)
    return torch.stack([1.0 - cos, torch.arccos(cos) / math.pi, rel], dim=-1)


_ATTENTION_CHUNK_ELEMENTS = 1 << 26  # probabilities held at once (256 MB of float32)


def visual_attention(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     visual: torch.Tensor, text: torch.Tensor, valid: torch.Tensor) -> list[tuple]:
    """Text -> visual attention of the rows of a batch, recomputed from the layer's q/k.

    The query rows of a sequence are its text tokens after its last visual token; rows are
    batched (padded to the most queries) in chunks of at most ``_ATTENTION_CHUNK_ELEMENTS``
    probabilities.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
        hidden: ``(B, S, D)`` the attention module's input (after the input layernorm).
        cos, sin: ``(B or 1, S, head_dim)`` rotary embeddings.
        visual, text, valid: ``(B, S)`` bool masks (valid: not padding).

    Returns:
        Per row with an image and at least one query, in batch order:
        ``(sum over heads and queries of the attention on visual keys, heads * queries,
        (N_visual,) mean attention of each visual key over heads and queries)``.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq = visual.shape
    pos = torch.arange(seq, device=hidden.device)
    last_visual = torch.where(visual, pos, -1).max(1).values
    queries = text & valid & (pos[None, :] > last_visual[:, None]) & (last_visual >= 0)[:, None]
    rows = queries.any(1).nonzero().flatten()
    if rows.numel() == 0:
        return []
    d, heads = attn.head_dim, attn.q_proj.out_features // attn.head_dim
    t_max = int(queries.sum(1).max())
    keys = int(torch.where(queries, pos, -1).max()) + 1
    per_row = max(1, _ATTENTION_CHUNK_ELEMENTS // (heads * t_max * keys))
    out = []
    for chunk in rows.split(per_row):
        q_mask = queries[chunk]
        n_q = q_mask.sum(1)
        # query positions first (in order), padding after; padded entries point at position 0
        order = torch.where(q_mask, pos, seq + pos).sort(1).values[:, :t_max]
        q_valid = order < seq
        q_pos = torch.where(q_valid, order, 0)
        h = hidden[chunk]
        rc, rs = (cos[chunk], sin[chunk]) if cos.shape[0] > 1 else (cos.expand(len(chunk), -1, -1),
                                                                      sin.expand(len(chunk), -1, -1))
        def gather(x: torch.Tensor) -> torch.Tensor:  # (R, S, F) -> (R, T, F) at the query positions
            return torch.gather(x, 1, q_pos[..., None].expand(-1, -1, x.shape[-1]))

        q = attn.q_proj(gather(h)).view(len(chunk), t_max, -1, d).transpose(1, 2)
        k = attn.k_proj(h[:, :keys]).view(len(chunk), keys, -1, d).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, gather(rc), gather(rs))
        k, _ = apply_rotary_pos_emb(k, k, rc[:, :keys], rs[:, :keys])
        k = k.repeat_interleave(heads // k.shape[1], dim=1)  # grouped-query heads, as repeat_kv
        scores = (q.float() * attn.scaling) @ k.float().transpose(-1, -2)  # (R, H, T, K)
        hidden_keys = (pos[None, None, :keys] > q_pos[..., None]) | ~valid[chunk][:, None, :keys]
        hidden_keys &= q_valid[..., None]  # padded queries see every key: finite, weighted 0 below
        probs = scores.masked_fill_(hidden_keys[:, None], float("-inf")).softmax(-1)
        # (R, K): summed over heads, then over the real queries
        per_key = (q_valid[:, None, :].to(probs.dtype) @ probs.sum(1)).squeeze(1)
        vis = visual[chunk, :keys]
        on_visual = (per_key * vis).sum(1)
        for r in range(len(chunk)):
            pairs = heads * int(n_q[r])
            out.append((float(on_visual[r]), pairs, per_key[r][vis[r]] / pairs))
    return out


def mass_coverage(mass: torch.Tensor, levels: Iterable[float] = MASS_LEVELS) -> list[float]:
    """Fraction of tokens needed to cover each level of the (normalized) ``mass`` vector."""
    share = mass.float() / mass.float().sum()
    cumulative = share.sort(descending=True).values.cumsum(0)
    n = mass.numel()
    return [min(n, int(torch.searchsorted(cumulative, torch.tensor(level, device=mass.device)
                                          - 1e-7)) + 1) / n for level in levels]


def neighbor_cosine_sums(features: torch.Tensor, grid: tuple[int, int]) -> tuple[float, int]:
    """Sum and count of cosines of right and down neighbours; ``features`` is ``(n, N, D)``."""
    rows, cols = grid
    f = features.float().reshape(features.shape[0], rows, cols, -1)
    right = F.cosine_similarity(f[:, :, :-1], f[:, :, 1:], dim=-1)
    down = F.cosine_similarity(f[:, :-1], f[:, 1:], dim=-1)
    return float(right.sum() + down.sum()), right.numel() + down.numel()


def mergeable_counts(features: torch.Tensor, thresholds: Iterable[float] = MERGE_THRESHOLDS) -> list[int]:
    """Per threshold, the number of tokens whose most similar other token of the same image
    has cosine >= threshold; ``features`` is ``(n, N, D)``."""
    f = F.normalize(features.float(), dim=-1)
    sim = f @ f.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    best = sim.max(dim=-1).values
    return [int((best >= tau).sum()) for tau in thresholds]


class PassiveCollector:
    """Streaming passive metrics of one model over many batches.

    Args:
        model: a LLaVA-style model in eval mode.
        parts: its :class:`sts_train.adapters.ModelParts`.
        attention_layers: decoder layers whose text->visual attention is recomputed (default all).
        thresholds: cosine thresholds of ``mergeable_frac``.

    Use ``out = collector.forward(batch)`` per batch (hooks are active only inside it), then
    ``collector.layer_rows()`` / ``collector.token_rows()``; ``remove()`` detaches the hooks.
    """

    def __init__(self, model, parts, *, attention_layers: Iterable[int] | None = None,
                 thresholds: Iterable[float] = MERGE_THRESHOLDS):
        self.model, self.parts = model, parts
        n = parts.num_layers
        self.attention_layers = sorted(set(range(n) if attention_layers is None else attention_layers))
        bad = [i for i in self.attention_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"attention layers {bad} out of range for {n} layers")
        self.thresholds = tuple(thresholds)
        self._sums = torch.zeros(n, len(TOKEN_TYPES), len(LAYER_METRICS), dtype=torch.float64)
        self._counts = torch.zeros(n, len(TOKEN_TYPES), dtype=torch.float64)
        self._attn = {i: {"t2v": 0.0, "queries": 0, "rows": 0, "mass": [0.0] * len(MASS_LEVELS)}
                      for i in self.attention_layers}
        self._proj = {"cos_sum": 0.0, "pairs": 0, "merge": [0] * len(self.thresholds), "tokens": 0}
        self._masks = None
        self._handles = []
        for index, layer in enumerate(parts.decoder_layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index), with_kwargs=True))
            if index in self._attn:
                self._handles.append(layer.self_attn.register_forward_pre_hook(
                    self._attention_hook(index), with_kwargs=True))
        self._handles.append(parts.projector.register_forward_hook(self._projector_hook))

    def forward(self, batch: dict):
        """Run ``model(**batch)`` without gradients, accumulating every metric; returns the output."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"].bool()
        visual = (input_ids == self.parts.image_token_id) & attention_mask
        self._masks = (visual, attention_mask & ~visual, attention_mask)
        try:
            with torch.no_grad():
                return self.model(**batch)
        finally:
            self._masks = None

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if self._masks is None:
                return
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            values = block_metrics(h_in, h_out)  # (B, S, 3)
            for t, mask in enumerate(self._masks[:2]):
                self._sums[index, t] += values[mask].sum(0).double().cpu()
                self._counts[index, t] += float(mask.sum())
        return hook

    def _attention_hook(self, index: int):
        def hook(module, args, kwargs):
            if self._masks is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            visual, text, valid = self._masks
            stats = self._attn[index]
            with torch.no_grad():
                for t2v, pairs, mass in visual_attention(module, hidden, cos, sin, visual, text, valid):
                    stats["t2v"] += t2v
                    stats["queries"] += pairs
                    coverage = mass_coverage(mass)
                    stats["mass"] = [a + c for a, c in zip(stats["mass"], coverage)]
                    stats["rows"] += 1
        return hook

    def _projector_hook(self, module, args, output):
        if self._masks is None:
            return
        features = output[0] if isinstance(output, tuple) else output
        if features.dim() == 2:
            features = features.unsqueeze(0)
        cos_sum, pairs = neighbor_cosine_sums(features, self.parts.patch_grid)
        self._proj["cos_sum"] += cos_sum
        self._proj["pairs"] += pairs
        counts = mergeable_counts(features, self.thresholds)
        self._proj["merge"] = [a + c for a, c in zip(self._proj["merge"], counts)]
        self._proj["tokens"] += features.shape[0] * features.shape[1]

    def layer_rows(self) -> list[dict]:
        """Tidy rows ``{layer, token_type, metric, value}`` (token types visual, text, all)."""
        rows = []
        for layer in range(self.parts.num_layers):
            sums, counts = self._sums[layer], self._counts[layer]
            per_type = {name: (sums[t], counts[t]) for t, name in enumerate(TOKEN_TYPES)}
            per_type["all"] = (sums.sum(0), counts.sum())
            for token_type, (s, c) in per_type.items():
                for m, metric in enumerate(LAYER_METRICS):
                    value = float(s[m] / c) if c > 0 else math.nan
                    rows.append({"layer": layer, "token_type": token_type, "metric": metric, "value": value})
        return rows

    def token_rows(self) -> list[dict]:
        """Tidy rows ``{layer, metric, method, keep_ratio, threshold, value}``."""
        nan = math.nan

        def row(layer, metric, value, threshold=nan):
            return {"layer": layer, "metric": metric, "method": "", "keep_ratio": nan,
                    "threshold": threshold, "value": value}

        rows = []
        for layer, s in self._attn.items():
            q, r = s["queries"], s["rows"]
            rows.append(row(layer, "text_to_visual_attention", s["t2v"] / q if q else nan))
            for level, total in zip(MASS_LEVELS, s["mass"]):
                rows.append(row(layer, f"visual_tokens_for_{round(level * 100)}pct_mass", total / r if r else nan))
        p = self._proj
        rows.append(row(NO_LAYER, "neighbor_cosine", p["cos_sum"] / p["pairs"] if p["pairs"] else nan))
        for tau, count in zip(self.thresholds, p["merge"]):
            rows.append(row(NO_LAYER, "mergeable_frac", count / p["tokens"] if p["tokens"] else nan, tau))
        return rows

    def remove(self) -> None:
        """Detach all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
