"""Each profiler metric equals an independent computation on a test-size model.

    PYTHONPATH=. .venv/bin/pytest tests/test_profile_metrics.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    from sts_train.factory import build_model

    torch.manual_seed(0)
    return build_model("test", seed=0).eval()


@pytest.fixture(scope="module")
def parts(model):
    from sts_train.adapters import model_parts

    return model_parts(model)


@pytest.fixture(scope="module")
def items(shapes_dir, test_processor, parts):
    """Six QA samples of different lengths (the 20th of the split is text-only)."""
    from sts_train.data import LlavaDataset

    ds = LlavaDataset(shapes_dir["instruction"], None, test_processor, num_image_tokens=parts.num_visual_tokens)
    return [ds[i] for i in (0, 1, 2, 3, 4, 19)]


@pytest.fixture(scope="module")
def collate(test_processor):
    from sts_train.data import LlavaCollator

    return LlavaCollator(pad_token_id=test_processor.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def batch(items, collate):
    out = collate(items)
    assert (out["attention_mask"] == 0).any(), "the batch should have padding"
    assert out["pixel_values"].shape[0] == 5, "one sample is text-only"
    return out


def _collect(model, parts, batches, **kw):
    from sts_profile.collect import PassiveCollector

    collector = PassiveCollector(model, parts, **kw)
    try:
        for b in batches:
            collector.forward(b)
    finally:
        collector.remove()
    return collector


def _probed(model, parts, batch, pad, **kw):
    """A ProbeRunner (detached again) that has run every probe on ``batch``."""
    from sts_profile.probes import ProbeRunner

    with torch.no_grad():
        dense = model(**batch)
    runner = ProbeRunner(model, parts, pad, **kw)
    try:
        runner.run_batch(batch, dense.logits, 0)
    finally:
        runner.remove()
    return runner


def _value(rows, **match):
    hits = [r["value"] for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, (match, hits)
    return hits[0]


def test_block_metrics_equal_hidden_state_computation(model, parts, batch):
    collector = _collect(model, parts, [batch])
    rows = collector.layer_rows()
    reference = copy.deepcopy(model)
    reference.model.language_model.norm = torch.nn.Identity()  # last hidden state = raw layer output
    with torch.no_grad():
        hidden = reference(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == parts.num_layers + 1
    valid = batch["attention_mask"].bool()
    visual = (batch["input_ids"] == parts.image_token_id) & valid
    masks = {"visual": visual, "text": valid & ~visual, "all": valid}
    for layer in range(parts.num_layers):
        x, y = hidden[layer], hidden[layer + 1]
        cos = F.cosine_similarity(x, y, dim=-1)
        rel = torch.linalg.vector_norm(y - x, dim=-1) / torch.linalg.vector_norm(x, dim=-1)
        for token_type, mask in masks.items():
            expected = {
                "block_influence": (1 - cos[mask]).mean(),
                "angular_distance": (torch.arccos(cos[mask].clamp(-1, 1)) / math.pi).mean(),
                "relative_update_norm": rel[mask].mean(),
            }
            for metric, value in expected.items():
                got = _value(rows, layer=layer, token_type=token_type, metric=metric)
                assert got == pytest.approx(float(value), rel=TOL, abs=TOL), (layer, token_type, metric)
    # visual and text differ: the split is real
    assert _value(rows, layer=0, token_type="visual", metric="block_influence") != pytest.approx(
        _value(rows, layer=0, token_type="text", metric="block_influence"), rel=1e-3)


def test_attention_mass_equals_eager_attention(model, parts, batch):
    from sts_profile.collect import MASS_LEVELS

    rows = _collect(model, parts, [batch]).token_rows()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference(**batch, output_attentions=True).attentions
    assert model.config.text_config._attn_implementation == "sdpa", "the profiled model stays on sdpa"
    for layer, probs in enumerate(attentions):
        on_visual, coverage, rows_with_image = [], [[] for _ in MASS_LEVELS], 0
        for b in range(probs.shape[0]):
            ids, valid = batch["input_ids"][b], batch["attention_mask"][b].bool()
            vis = (ids == parts.image_token_id).nonzero().flatten()
            if len(vis) == 0:
                continue
            queries = [i for i in range(len(ids)) if valid[i] and ids[i] != parts.image_token_id and i > vis.max()]
            block = probs[b][:, queries][:, :, vis]  # heads x queries x visual keys
            on_visual.append(block.sum(-1).flatten())
            mass = block.mean(dim=(0, 1)).tolist()
            share = sorted((m / sum(mass) for m in mass), reverse=True)
            for k, level in enumerate(MASS_LEVELS):
                total, n = 0.0, 0
                while total < level - 1e-7:
                    total += share[n]
                    n += 1
                coverage[k].append(n / len(mass))
            rows_with_image += 1
        assert rows_with_image == 5
        expected = torch.cat(on_visual).mean()
        assert _value(rows, layer=layer, metric="text_to_visual_attention") == pytest.approx(float(expected), abs=TOL)
        for k, level in enumerate(MASS_LEVELS):
            got = _value(rows, layer=layer, metric=f"visual_tokens_for_{round(level * 100)}pct_mass")
            assert got == pytest.approx(sum(coverage[k]) / len(coverage[k]), abs=1e-9)


def test_neighbor_cosine_and_mergeable_equal_direct_computation(model, parts, batch):
    from sts_profile.collect import MERGE_THRESHOLDS

    rows = _collect(model, parts, [batch]).token_rows()
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=parts.vision_feature_layer,
            vision_feature_select_strategy=parts.vision_feature_select_strategy).pooler_output
    rows_n, cols_n = parts.patch_grid
    pairs, merge = [], {tau: 0 for tau in MERGE_THRESHOLDS}
    for image in features:
        grid = image.reshape(rows_n, cols_n, -1)
        for r in range(rows_n):
            for c in range(cols_n):
                if c + 1 < cols_n:
                    pairs.append(F.cosine_similarity(grid[r, c], grid[r, c + 1], dim=0))
                if r + 1 < rows_n:
                    pairs.append(F.cosine_similarity(grid[r, c], grid[r + 1, c], dim=0))
        for i in range(image.shape[0]):
            best = max(float(F.cosine_similarity(image[i], image[j], dim=0)) for j in range(image.shape[0]) if j != i)
            for tau in merge:
                merge[tau] += best >= tau
    assert _value(rows, layer=-1, metric="neighbor_cosine") == pytest.approx(float(torch.stack(pairs).mean()), abs=TOL)
    n_tokens = len(features) * parts.num_visual_tokens
    for tau, count in merge.items():
        assert _value(rows, metric="mergeable_frac", threshold=tau) == pytest.approx(count / n_tokens)
    assert 0 < _value(rows, metric="mergeable_frac", threshold=0.8) <= 1  # shapes images are redundant


def test_streaming_stats_do_not_depend_on_batch_split(model, parts, items, collate):
    one_shot = _collect(model, parts, [collate(items)])
    split = _collect(model, parts, [collate(items[:1]), collate(items[1:3]), collate(items[3:])])
    for a, b in zip(one_shot.layer_rows() + one_shot.token_rows(), split.layer_rows() + split.token_rows()):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        assert b["value"] == pytest.approx(a["value"], rel=1e-4, abs=1e-5), a
    # the state is a fixed set of sums: it does not grow with tokens or batches
    assert one_shot._sums.shape == split._sums.shape == (parts.num_layers, 2, 3)


def _removed_layer_model(model, layer):
    reference = copy.deepcopy(model)
    lm = reference.model.language_model
    del lm.layers[layer]
    lm.config.num_hidden_layers -= 1
    return reference


def _per_sample_se(increase: list[float], counts: list[int]) -> float:
    """Independent: the linearised s.e. of sum(increase) / sum(counts), with numpy."""
    import numpy as np

    d, n = np.array(increase), np.array(counts, float)
    delta = d.sum() / n.sum()
    return math.sqrt(len(d) / (len(d) - 1) * ((d - delta * n) ** 2).sum()) / n.sum()


def test_skip_probe_equals_model_with_layer_removed(model, parts, batch, items, collate, test_processor):
    from sts_profile.probes import ProbeRunner, supervised_logprobs

    with torch.no_grad():
        dense = model(**batch)
    runner = ProbeRunner(model, parts, test_processor.tokenizer.pad_token_id, methods=[])
    try:
        runner.run_batch(batch, dense.logits, 0)
    finally:
        runner.remove()
    dense_loss = _value(runner.token_rows(), metric="dense_loss")
    assert dense_loss == pytest.approx(float(dense.loss), rel=TOL)
    layer_rows = runner.layer_rows()
    for layer in range(parts.num_layers):
        reference = _removed_layer_model(model, layer)
        with torch.no_grad():
            removed = reference(**batch, use_cache=False)
        delta = _value(layer_rows, layer=layer, metric="skip_loss_delta")
        assert dense_loss + delta == pytest.approx(float(removed.loss), rel=TOL)
        p_log, _ = supervised_logprobs(dense.logits, batch["labels"])
        q_log, _ = supervised_logprobs(removed.logits, batch["labels"])
        kl = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")  # KL(p || q)
        assert _value(layer_rows, layer=layer, metric="skip_kl") == pytest.approx(float(kl), rel=1e-4)
        # the standard error from each sample on its own through the removed-layer model
        increase, counts = [], []
        for item in items:
            one = collate([item])
            n = int((one["labels"][:, 1:] != -100).sum())
            with torch.no_grad():
                increase.append((float(reference(**one, use_cache=False).loss) - float(model(**one).loss)) * n)
            counts.append(n)
        se = _per_sample_se(increase, counts)
        assert _value(layer_rows, layer=layer, metric="skip_loss_delta_se") == pytest.approx(se, rel=1e-3, abs=1e-6)
        assert se > 0
    # the skipper and compressor are gone: the model runs dense again
    assert "forward" not in vars(model) and all("forward" not in vars(l) for l in parts.decoder_layers)


def test_compress_probe_at_keep_one_equals_dense_loss(model, parts, batch, test_processor):
    from sts_train.compress import COMPRESSORS

    runner = _probed(model, parts, batch, test_processor.tokenizer.pad_token_id, skip_layers=False,
                     keep_ratios=(1.0, 0.25))
    rows = runner.token_rows()
    for method in COMPRESSORS:
        assert _value(rows, metric="compress_loss_delta", method=method, keep_ratio=1.0) == pytest.approx(0.0, abs=1e-5)
        assert _value(rows, metric="compress_loss_delta", method=method, keep_ratio=0.25) != 0.0
    assert runner.layer_rows() == []


def test_ratio_se_is_the_standard_error_of_the_mean_for_equal_counts():
    import statistics

    from sts_profile.probes import ratio_se

    increase = [0.3, -0.1, 0.5, 0.2]
    assert ratio_se(increase, [1, 1, 1, 1]) == pytest.approx(statistics.stdev(increase) / 2)
    # samples without supervised tokens do not count; one sample has no spread to measure
    assert ratio_se(increase + [0.0], [1, 1, 1, 1, 0]) == pytest.approx(statistics.stdev(increase) / 2)
    assert math.isnan(ratio_se([0.3], [5]))


def test_compress_probe_se_equals_per_sample_computation(model, parts, items, collate, batch, test_processor):
    """Delta and standard error from one mixed batch equal those from each sample on its own."""
    from sts_train.compress import compressed_forward

    pad = test_processor.tokenizer.pad_token_id
    methods, ratio = ("uniform", "merge"), 0.25
    rows = _probed(model, parts, batch, pad, skip_layers=False, methods=methods, keep_ratios=(ratio,)).token_rows()
    for method in methods:
        increase, counts = [], []
        for item in items:
            one = collate([item])
            n = int((one["labels"][:, 1:] != -100).sum())
            with torch.no_grad():
                base = float(model(**one).loss) * n
                probe = float(compressed_forward(model, one, method=method, keep_ratio=ratio, parts=parts,
                                                 pad_token_id=pad).loss) * n
            increase.append(probe - base)
            counts.append(n)
        delta, se = sum(increase) / sum(counts), _per_sample_se(increase, counts)
        assert _value(rows, metric="compress_loss_delta", method=method, keep_ratio=ratio) == pytest.approx(delta, rel=1e-3)
        assert _value(rows, metric="compress_loss_delta_se", method=method, keep_ratio=ratio) == pytest.approx(se, rel=1e-3)
        assert 0 < se < abs(delta) + 1.0


def test_cost_flops_are_analytic_and_times_positive(model, parts, batch):
    from torch.utils.flop_counter import FlopCounterMode

    from sts_profile.cost import measure_cost
    from sts_train.flops import LayerDims, layer_flops_fwd, lm_head_flops_fwd

    rows = measure_cost(model, parts, [batch], repeats=1)
    by = {(r["layer"], r["component"]): r for r in rows}
    rows_n, seq_len = batch["input_ids"].shape
    dims = LayerDims.of(parts)
    for layer in range(parts.num_layers):
        assert by[(layer, "decoder_layer")]["flops_fwd"] == layer_flops_fwd(seq_len, dims, rows_n)["total"]
    assert by[(-1, "lm_head")]["flops_fwd"] == lm_head_flops_fwd(seq_len, dims, rows_n)
    # vision tower: FlopCounterMode counts its matmuls and convolutions, not the SDPA kernel
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = parts.vision_tower(batch["pixel_values"], output_hidden_states=True)
    vision = model.config.vision_config
    tokens = out.last_hidden_state.shape[1]  # CLIP: the patches and its class token
    assert tokens == (vision.image_size // vision.patch_size) ** 2 + 1
    attention = 4 * tokens ** 2 * vision.hidden_size * vision.num_hidden_layers * batch["pixel_values"].shape[0]
    assert by[(-1, "vision_tower")]["flops_fwd"] == pytest.approx(counter.get_total_flops() + attention)
    total = by[(-1, "total")]
    assert total["flops_fwd"] == pytest.approx(sum(r["flops_fwd"] for r in rows if r["component"] != "total"))
    assert all(r["time_fwd_s"] > 0 for r in rows) and all(r["seq_len"] == seq_len for r in rows)


def test_a_siglip_tower_has_no_class_token():
    """LLaVA with a SigLIP vision tower (no class token): the "full" feature strategy keeps
    exactly the patches, a square grid; the model runs with that many image tokens, and the
    cost table's vision attention counts the tower's own sequence length."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from sts_profile.cost import measure_cost
    from sts_train.adapters import model_parts
    from sts_train.factory import build_config

    base = build_config("test")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)  # LLaVA ignores the head
    config = LlavaConfig(vision_config=vision, text_config=base.text_config, image_token_index=base.image_token_index,
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    parts = model_parts(model)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = parts.vision_tower(pixels).last_hidden_state.shape[1]
    assert tokens == parts.num_visual_tokens == 16 and parts.patch_grid == (4, 4)
    ids = torch.tensor([[1] + [base.image_token_index] * 16 + [5, 6, 7]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        parts.vision_tower(pixels)
    row = next(r for r in measure_cost(model, parts, [batch], repeats=1) if r["component"] == "vision_tower")
    assert row["flops_fwd"] == pytest.approx(counter.get_total_flops() + 4 * tokens ** 2 * 32 * 2 * 2)
