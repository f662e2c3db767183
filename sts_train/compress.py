"""Visual Token Compressor: fewer visual tokens from the projector into the LLM.

Each method is a plain function registered in :data:`COMPRESSORS`::

    method(features (N, D), keep_ratio, *, grid=(rows, cols), text=(T, D) | None,
           generator=torch.Generator | None) -> (features (M, D), index (M,))

applied per image to the projector's output. ``index`` is, per output token, the position in
the image's token sequence it stands for (the kept token; for a pooled cell the token at its
centre; for a merged group its surviving token), increasing. :func:`drop_placeholders` then
removes the placeholder positions that no longer have a feature from ``input_ids``,
``labels`` and ``attention_mask``, so the LLM really runs a shorter sequence (transformers 5.x
requires the number of ``<image>`` tokens to equal the number of feature vectors), and gives
every kept token the position id it has in the dense sequence: the rotary position of each
text token, and its distance to each visual token, are those of dense evaluation, which the
deployed model runs.

Methods:
    uniform: 2-D average pooling over the patch grid to ``round(rows*sqrt(r)) x
        round(cols*sqrt(r))`` cells (adaptive pooling), spatial order kept.
    random: a random subset of ``round(r*N)`` tokens, order kept.
    text_guided: keep the ``round(r*N)`` tokens with the highest score
        ``cos(v_i, mean_t(e_t))``, the cosine between the visual token (LLM embedding space) and
        the mean input embedding of the sample's instruction tokens (prompt text, no answer);
        order kept.
    merge: bipartite soft matching (token merging, Bolya et al. 2023): alternate tokens form
        sets A and B; each A token's most similar B token (cosine) is found and the most
        similar pairs merge as a size-weighted mean, repeated until ``round(r*N)`` remain;
        order of the survivors kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from sts_train.errors import ScheduleError

Compressor = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def kept_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept out of ``num_tokens`` at ``keep_ratio`` (at least one)."""
    return max(1, min(num_tokens, round(keep_ratio * num_tokens)))


def pooled_grid(grid: tuple[int, int], keep_ratio: float) -> tuple[int, int]:
    """Output grid of :func:`uniform`: each side scaled by ``sqrt(keep_ratio)``; a single row
    or column (tokens with no 2-D layout, e.g. with a class token) pools along its length to
    :func:`kept_count` tokens."""
    if 1 in grid:
        kept = kept_count(grid[0] * grid[1], keep_ratio)
        return (1, kept) if grid[0] == 1 else (kept, 1)
    scale = math.sqrt(keep_ratio)
    return max(1, round(grid[0] * scale)), max(1, round(grid[1] * scale))


def _cell_centres(size: int, cells: int) -> torch.Tensor:
    """Index (0..size-1) of the centre of each of ``cells`` adaptive-pooling cells over ``size``."""
    starts = torch.arange(cells) * size // cells
    ends = -(-(torch.arange(cells) + 1) * size // cells)  # ceil, as adaptive pooling
    return (starts + ends - 1) // 2


def uniform(features: torch.Tensor, keep_ratio: float, *, grid: tuple[int, int], **_):
    rows, cols = grid
    out_rows, out_cols = pooled_grid(grid, keep_ratio)
    image = features.T.reshape(1, features.shape[1], rows, cols)
    pooled = F.adaptive_avg_pool2d(image, (out_rows, out_cols))
    index = (_cell_centres(rows, out_rows)[:, None] * cols + _cell_centres(cols, out_cols)[None, :]).flatten()
    return pooled.reshape(features.shape[1], out_rows * out_cols).T, index


def random(features: torch.Tensor, keep_ratio: float, *, generator=None, **_):
    n = features.shape[0]
    keep = torch.randperm(n, generator=generator)[: kept_count(n, keep_ratio)].sort().values
    return features[keep.to(features.device)], keep


def text_guided(features: torch.Tensor, keep_ratio: float, *, text=None, **_):
    if text is None or text.shape[0] == 0:
        raise ScheduleError(
            "text_guided compression needs instruction text, but a sample has none; "
            "use method uniform or merge for caption-only data"
        )
    query = text.float().mean(0, keepdim=True)
    score = F.cosine_similarity(features.float(), query, dim=-1)
    keep = score.topk(kept_count(features.shape[0], keep_ratio)).indices.sort().values
    return features[keep], keep


def merge(features: torch.Tensor, keep_ratio: float, **_):
    merged, index = merge_batch(features.unsqueeze(0), keep_ratio)
    return merged[0], index[0]


def merge_batch(features: torch.Tensor, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite merging (see the module docstring) of a batch ``(B, N, D)`` of images at once.

    Each image is merged on its own; batching only shares the Python rounds between images.

    Returns:
        ``(merged (B, M, D), index (B, M))``: index is each survivor's original position.
    """
    batch, n_tokens, dim = features.shape
    target = kept_count(n_tokens, keep_ratio)
    x = features.float()
    size = torch.ones(batch, n_tokens, 1, dtype=x.dtype, device=x.device)
    order = torch.arange(n_tokens, device=x.device, dtype=torch.float).expand(batch, n_tokens)

    def take(t, idx):  # gather rows ``idx`` (B, k) of t (B, n, d)
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    while x.shape[1] > target:
        a, b = x[:, 0::2], x[:, 1::2]
        n_merge = min(x.shape[1] - target, a.shape[1], b.shape[1])
        if n_merge == 0:
            break
        sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)
        best, match = sim.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True, stable=True)
        merged, kept = ranked[:, :n_merge], ranked[:, n_merge:].sort(dim=-1).values
        size_a, size_b = size[:, 0::2], size[:, 1::2]
        dst = match.gather(1, merged)
        moved_size = take(size_a, merged)
        b_sum = (b * size_b).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, dim), take(a, merged) * moved_size)
        size_b = size_b.scatter_add(1, dst.unsqueeze(-1), moved_size)
        x = torch.cat([take(a, kept), b_sum / size_b], 1)
        size = torch.cat([take(size_a, kept), size_b], 1)
        order = torch.cat([order[:, 0::2].gather(1, kept), order[:, 1::2]], 1)
        by_position = order.argsort(dim=-1)
        x, size, order = take(x, by_position), take(size, by_position), order.gather(1, by_position)
    return x.to(features.dtype), order.long()


COMPRESSORS: dict[str, Compressor] = {
    "uniform": uniform,
    "random": random,
    "text_guided": text_guided,
    "merge": merge,
}


def compress_features(
    features: list[torch.Tensor],
    method: str,
    keep_ratio: float,
    *,
    grid: tuple[int, int],
    texts: list[torch.Tensor | None] | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Compress each image's ``(N, D)`` features.

    Returns:
        Per image ``(features (M_i, D), index (M_i,))`` (see the module docstring).

    Raises:
        ScheduleError: unknown method, or ``text_guided`` with a sample without text.
    """
    if method not in COMPRESSORS:
        raise ScheduleError(f"unknown token method {method!r}; use one of {', '.join(COMPRESSORS)}")
    fn = COMPRESSORS[method]
    if method == "merge" and len(features) > 1 and len({tuple(f.shape) for f in features}) == 1:
        return list(zip(*merge_batch(torch.stack(features), keep_ratio)))
    texts = texts if texts is not None else [None] * len(features)
    return [
        fn(f, keep_ratio, grid=grid, text=t, generator=generator) for f, t in zip(features, texts)
    ]


def drop_placeholders(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor,
    *,
    image_token_id: int,
    tokens_per_image: int,
    kept_index: list[torch.Tensor],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Keep ``len(kept_index[k])`` placeholders of the k-th image run, drop the rest.

    Images are counted in batch order (row by row, left to right), as LLaVA scatters features.
    Padding is dropped too, and rows are re-packed to the left and right-padded to the new
    longest row: a row without an image (text-only) keeps only its own length, so it does not
    hold the batch at the dense length. Position ids stay those of the dense sequence: a text
    token keeps its own, and the placeholders of image k get ``run start + kept_index[k]``.

    Returns:
        ``(input_ids, labels, attention_mask, position_ids)`` of the shorter batch (padding
        positions are 0).
    """
    keep_rows, position_rows, image_index = [], [], 0
    for row, row_mask in zip(input_ids, attention_mask):
        keep = row_mask > 0
        position = (row_mask.long().cumsum(0) - 1).clamp(min=0)
        runs = (row == image_token_id).nonzero().flatten()
        for start in range(0, runs.numel(), tokens_per_image):
            run = runs[start : start + tokens_per_image]
            index = kept_index[image_index].to(position.device)
            kept = run[: index.numel()]
            position[kept] = position[run[0]] + index
            keep[run[index.numel() :]] = False
            image_index += 1
        keep_rows.append(keep)
        position_rows.append(position)
    length = max(int(k.sum()) for k in keep_rows)

    def repack(rows, fill: int) -> torch.Tensor:
        out = rows[0].new_full((len(rows), length), fill)
        for i, (row, keep) in enumerate(zip(rows, keep_rows)):
            kept = row[keep]
            out[i, : kept.numel()] = kept
        return out

    return (
        repack(input_ids, pad_token_id),
        None if labels is None else repack(labels, -100),
        repack(attention_mask, 0),
        repack(position_rows, 0),
    )


def instruction_embeddings(model, input_ids, labels, attention_mask, image_token_id) -> list[torch.Tensor]:
    """Per row: input embeddings of the prompt text (not image, not answer, not padding)."""
    embed = model.get_input_embeddings()
    prompt = (input_ids != image_token_id) & (attention_mask > 0)
    if labels is not None:
        prompt &= labels == -100
    with torch.no_grad():
        return [embed(row[mask]) for row, mask in zip(input_ids, prompt)]


def compressed_forward(
    model,
    batch: dict,
    *,
    method: str,
    keep_ratio: float,
    parts,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    run=None,
):
    """Run ``model(**batch)`` with the visual tokens compressed to ``keep_ratio``.

    The vision tower and projector run as usual; their per-image outputs are compressed, the
    surplus ``<image>`` positions are dropped, and the LLM runs the shorter sequence with the
    compressed features passed as ``mm_encoder_outputs`` and every kept token at its dense
    position id (counted from ``attention_mask``; a ``position_ids`` input is replaced). The
    result equals the dense forward with the dropped visual tokens masked out of attention
    (for ``random`` and ``text_guided``, which keep tokens unchanged).

    Args:
        model: a LLaVA-style ``...ForConditionalGeneration``.
        batch: collated inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``).
        method, keep_ratio: what to apply (``keep_ratio == 1`` is a plain forward).
        parts: :class:`sts_train.adapters.ModelParts` of the model.
        pad_token_id: id that fills the re-padded rows.
        run: the forward to call for the LLM part (default ``model``); the
            :class:`TokenCompressor` passes the model's own unpatched forward.

    Returns:
        The model output, with ``.kept_visual_tokens``, ``.seq_len`` and ``.llm_labels`` (the
        labels of the sequence the LLM ran, aligned with ``.logits``) attributes added.
    """
    run = model if run is None else run
    pixel_values = batch.get("pixel_values")
    if pixel_values is None or keep_ratio >= 1.0:
        out = run(**batch)
        out.kept_visual_tokens = 0 if pixel_values is None else pixel_values.shape[0] * parts.num_visual_tokens
        ids = batch.get("input_ids")
        out.seq_len = 0 if ids is None else ids.shape[1]
        out.llm_labels = batch.get("labels")
        return out
    rest = {k: v for k, v in batch.items()
            if k not in ("pixel_values", "input_ids", "labels", "attention_mask", "position_ids")}
    input_ids, labels, attention_mask = batch["input_ids"], batch.get("labels"), batch["attention_mask"]
    image_outputs = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=parts.vision_feature_layer,
        vision_feature_select_strategy=parts.vision_feature_select_strategy,
        return_dict=True,
    )
    features = list(image_outputs.pooler_output)
    texts = None
    if method == "text_guided":
        per_row = instruction_embeddings(model, input_ids, labels, attention_mask, parts.image_token_id)
        images_per_row = ((input_ids == parts.image_token_id).sum(1) // parts.num_visual_tokens).tolist()
        texts = [per_row[r] for r, n in enumerate(images_per_row) for _ in range(n)]
    compressed = compress_features(
        features, method, keep_ratio, grid=parts.patch_grid, texts=texts, generator=generator
    )
    input_ids, labels, attention_mask, position_ids = drop_placeholders(
        input_ids, labels, attention_mask,
        image_token_id=parts.image_token_id,
        tokens_per_image=parts.num_visual_tokens,
        kept_index=[index for _, index in compressed],
        pad_token_id=pad_token_id,
    )
    image_outputs.pooler_output = [c for c, _ in compressed]
    out = run(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        mm_encoder_outputs={"image": image_outputs},
        **rest,
    )
    out.kept_visual_tokens = sum(c.shape[0] for c, _ in compressed)
    out.seq_len = input_ids.shape[1]
    out.llm_labels = labels
    return out


class TokenCompressor:
    """Compress visual tokens inside the model's own forward.

    Patching the instance's ``forward`` (rather than calling parts of the model from outside)
    keeps DDP correct: ``DDP(model)(**batch)`` still runs through DDP's forward and its
    gradient hooks. Compresses only in training mode unless ``force`` is set; evaluation and
    generation run dense.

    Set ``method``/``keep_ratio`` (and ``generator`` for ``random``) before a step; after it,
    ``last_kept_visual_tokens`` and ``last_seq_len`` describe what the LLM ran.
    """

    def __init__(self, model, parts, pad_token_id: int):
        if "forward" in vars(model):
            raise RuntimeError("the model already has a patched forward")
        self.model, self.parts, self.pad_token_id = model, parts, pad_token_id
        self.method: str | None = None
        self.keep_ratio = 1.0
        self.generator: torch.Generator | None = None
        self.force = False
        self.last_kept_visual_tokens = 0
        self.last_seq_len = 0
        run = model.forward

        def forward(*args, **kwargs):
            if args:
                raise TypeError("pass the model inputs as keyword arguments")
            active = self.method is not None and (model.training or self.force)
            out = compressed_forward(
                model, kwargs, method=self.method, keep_ratio=self.keep_ratio if active else 1.0,
                parts=parts, pad_token_id=pad_token_id, generator=self.generator, run=run,
            )
            self.last_kept_visual_tokens, self.last_seq_len = out.kept_visual_tokens, out.seq_len
            return out

        model.forward = forward

    def set(self, method: str | None, keep_ratio: float, generator: torch.Generator | None = None) -> None:
        """Compress with ``method`` at ``keep_ratio`` from now on (``None`` or 1.0: dense)."""
        if method is not None and method not in COMPRESSORS:
            raise ScheduleError(f"unknown token method {method!r}; use one of {', '.join(COMPRESSORS)}")
        self.method = None if keep_ratio >= 1.0 else method
        self.keep_ratio = keep_ratio
        self.generator = generator

    def remove(self) -> None:
        vars(self.model).pop("forward", None)
