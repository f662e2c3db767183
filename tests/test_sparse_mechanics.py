"""Layer skipping and token compression against independent computations (small model)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sts_train.adapters import model_parts
from sts_train.compress import (
    COMPRESSORS, TokenCompressor, compress_features, drop_placeholders, kept_count, merge, merge_batch,
    pooled_grid,
)
from sts_train.errors import ScheduleError
from sts_train.factory import build_model
from sts_train.skipper import LayerSkipper

IMG = 4  # image token id of the factory tokenizer


def _batch(parts, rows=2, text=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = parts.num_visual_tokens
    ids = torch.cat([torch.ones(rows, 1, dtype=torch.long), torch.full((rows, n), IMG),
                     torch.randint(10, 500, (rows, text), generator=g)], 1)
    labels = ids.clone()
    labels[:, : 1 + n + text // 2] = -100
    side = 56 if parts.num_visual_tokens == 16 else 112
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(rows, 3, side, side, generator=g)}


@pytest.fixture()
def small():
    model = build_model("small", seed=0)
    model.config.use_cache = model.config.text_config.use_cache = False
    model.train()
    return model, model_parts(model)


def _removed(model, skipped):
    ref = copy.deepcopy(model)
    layers = ref.model.language_model.layers
    ref.model.language_model.layers = nn.ModuleList([l for i, l in enumerate(layers) if i not in skipped])
    ref.config.text_config.num_hidden_layers = len(ref.model.language_model.layers)
    return ref


@pytest.mark.parametrize("skipped", [{1}, {1, 2}, {0, 3}])
def test_skip_equals_physically_removed_layers(small, skipped):
    model, parts = small
    batch = _batch(parts)
    ref = _removed(model, skipped)
    skipper = LayerSkipper(parts.decoder_layers)
    skipper.set_skipped(skipped)
    loss = model(**batch).loss
    loss.backward()
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    ref_params = dict(ref.named_parameters())
    kept = [i for i in range(parts.num_layers) if i not in skipped]
    for name, p in model.named_parameters():
        if "language_model.layers." in name:
            idx = int(name.split(".layers.")[1].split(".")[0])
            if idx in skipped:
                assert p.grad is None, name
                continue
            name = name.replace(f".layers.{idx}.", f".layers.{kept.index(idx)}.")
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6)


def test_skipped_layers_untouched_by_adamw_with_weight_decay_and_state(small):
    model, parts = small
    skipper = LayerSkipper(parts.decoder_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = _batch(parts)
    model(**batch).loss.backward()  # dense step: every layer gets Adam state
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in parts.decoder_layers[2].named_parameters()}
    other = parts.decoder_layers[1].self_attn.q_proj.weight.detach().clone()
    skipper.set_skipped({2})
    model(**batch).loss.backward()
    assert all(p.grad is None for p in parts.decoder_layers[2].parameters())
    opt.step()
    for n, p in parts.decoder_layers[2].named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical despite momentum and weight decay
    assert not torch.equal(parts.decoder_layers[1].self_attn.q_proj.weight, other)


def test_skipper_inactive_in_eval_unless_forced(small):
    model, parts = small
    batch = _batch(parts)
    model.eval()
    with torch.no_grad():
        dense = model(**batch).loss.item()
        skipper = LayerSkipper(parts.decoder_layers)
        skipper.set_skipped({1, 2})
        assert model(**batch).loss.item() == dense
        with skipper.skipping({1, 2}):
            forced = model(**batch).loss.item()
        ref = _removed(model, {1, 2})(**batch).loss.item()
    assert forced == pytest.approx(ref, abs=1e-6) and forced != dense
    names = {n for n, _ in model.named_parameters()}
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in names  # nothing renamed


def test_skip_works_with_gradient_checkpointing(small):
    model, parts = small
    batch = _batch(parts)
    ref = _removed(model, {2})
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    LayerSkipper(parts.decoder_layers).set_skipped({2})
    loss = model(**batch).loss
    loss.backward()
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert all(p.grad is None for p in parts.decoder_layers[2].parameters())
    torch.testing.assert_close(parts.decoder_layers[3].mlp.down_proj.weight.grad,
                               ref.model.language_model.layers[2].mlp.down_proj.weight.grad)


def test_uniform_quarter_is_2x2_average_pooling():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 5, generator=g)  # 8x8 grid, row-major
    out, index = COMPRESSORS["uniform"](feats, 0.25, grid=(8, 8))
    expected = torch.empty(16, 5)
    for r in range(4):
        for c in range(4):
            cells = [feats[(2 * r + dr) * 8 + 2 * c + dc] for dr in (0, 1) for dc in (0, 1)]
            expected[r * 4 + c] = sum(cells) / 4
    torch.testing.assert_close(out, expected)
    # each cell stands at its centre token (the upper-left of an even-sized cell's middle)
    assert index.tolist() == [2 * r * 8 + 2 * c for r in range(4) for c in range(4)]
    _, index = COMPRESSORS["uniform"](feats, 9 / 64, grid=(8, 8))  # 3x3 cells over 8: 0-2, 2-5, 5-7
    assert index.tolist() == [r * 8 + c for r in (1, 3, 6) for c in (1, 3, 6)]
    assert pooled_grid((24, 24), 0.25) == (12, 12) and kept_count(576, 0.125) == 72


def test_uniform_on_a_single_column_pools_along_it():
    """Tokens without a 2-D layout (a CLIP tower under the "full" strategy: 577 x 1) keep the
    asked fraction, averaged in consecutive runs, not sqrt(r) of them (the column cannot shrink)."""
    assert pooled_grid((577, 1), 0.25) == (144, 1) and pooled_grid((1, 10), 0.5) == (1, 5)
    feats = torch.arange(10.0).unsqueeze(1).repeat(1, 3)
    out, index = COMPRESSORS["uniform"](feats, 0.5, grid=(10, 1))
    torch.testing.assert_close(out[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))  # pairs averaged
    assert index.tolist() == [0, 2, 4, 6, 8]


def test_random_and_text_guided_keep_order_and_count():
    g = torch.Generator().manual_seed(0)
    feats = torch.arange(20.0).unsqueeze(1).repeat(1, 3)
    out, index = COMPRESSORS["random"](feats, 0.5, generator=g)
    assert out.shape == (10, 3) and torch.all(out[1:, 0] > out[:-1, 0])
    assert torch.equal(out, feats[index])
    text = torch.tensor([[1.0, 0.0, 0.0]])
    feats2 = torch.zeros(4, 3)
    feats2[1, 0] = feats2[3, 0] = 1.0
    feats2[0, 1] = feats2[2, 2] = 1.0
    out, index = COMPRESSORS["text_guided"](feats2, 0.5, text=text)
    assert torch.equal(out, feats2[[1, 3]]) and index.tolist() == [1, 3]
    with pytest.raises(ScheduleError, match="text_guided compression needs instruction text"):
        COMPRESSORS["text_guided"](feats2, 0.5, text=None)


def test_merge_is_size_weighted_and_reaches_target():
    # duplicated neighbours (A/B partners in bipartite matching) merge into themselves, in order
    base = torch.eye(4)
    out, index = merge(base.repeat_interleave(2, dim=0), 0.5)
    torch.testing.assert_close(out, base)
    assert index.tolist() == [1, 3, 5, 7]  # each pair survives as its B token
    g = torch.Generator().manual_seed(1)
    x = torch.randn(576, 8, generator=g)
    out, index = merge(x, 0.125)
    assert out.shape == (72, 8) and torch.all(index[1:] > index[:-1])
    # total mass is preserved by size-weighted averaging when everything merges into one token
    torch.testing.assert_close(merge(x[:8], 1 / 8)[0][0], x[:8].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.125, 0.3])
def test_batched_merge_equals_per_image_merge(keep):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 64, 8, generator=g)
    batched, index = merge_batch(feats, keep)
    for i in range(3):
        one, one_index = merge(feats[i], keep)
        torch.testing.assert_close(batched[i], one, rtol=1e-5, atol=1e-6)
        assert torch.equal(index[i], one_index)
    per_image = compress_features(list(feats), "merge", keep, grid=(8, 8))
    assert torch.equal(torch.stack([f for f, _ in per_image]), batched)


def test_drop_placeholders_keeps_text_and_labels_aligned():
    ids = torch.tensor([[1, 4, 4, 4, 4, 7, 8, 9], [1, 7, 4, 4, 4, 4, 8, 0]])
    labels = torch.tensor([[-100] * 6 + [8, 9], [-100] * 6 + [8, -100]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0]])
    new_ids, new_labels, new_mask, positions = drop_placeholders(
        ids, labels, mask, image_token_id=4, tokens_per_image=4,
        kept_index=[torch.tensor([2]), torch.tensor([0, 3])], pad_token_id=0)
    assert new_ids.tolist() == [[1, 4, 7, 8, 9], [1, 7, 4, 4, 8]]
    assert new_labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, -100, -100, 8]]
    assert new_mask.tolist() == [[1] * 5, [1] * 5]
    # every kept token keeps its dense position: text as before, visual token k at run start + k
    assert positions.tolist() == [[0, 1 + 2, 5, 6, 7], [0, 1, 2 + 0, 2 + 3, 6]]


def test_drop_placeholders_shortens_a_batch_with_a_text_only_row():
    # row 1 has no image: its padding must not keep the batch at the dense length
    ids = torch.tensor([[1, 4, 4, 4, 4, 7, 8, 9], [1, 7, 8, 0, 0, 0, 0, 0]])
    labels = torch.tensor([[-100] * 6 + [8, 9], [-100, -100, 8] + [-100] * 5])
    mask = (ids != 0).long()
    new_ids, new_labels, new_mask, positions = drop_placeholders(
        ids, labels, mask, image_token_id=4, tokens_per_image=4, kept_index=[torch.tensor([0])], pad_token_id=0)
    assert new_ids.tolist() == [[1, 4, 7, 8, 9], [1, 7, 8, 0, 0]]
    assert new_labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 8, -100, -100]]
    assert new_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert positions.tolist() == [[0, 1, 5, 6, 7], [0, 1, 2, 0, 0]]


def test_compressed_forward_runs_shorter_sequence_with_pooled_features(small):
    model, parts = small
    batch = _batch(parts, rows=2, text=12)
    seen = {}
    hook = parts.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].detach().clone()),
        with_kwargs=True)
    comp = TokenCompressor(model, parts, pad_token_id=0)
    comp.set("uniform", 0.25)
    out = model(**batch)
    hook.remove()
    n, kept = parts.num_visual_tokens, parts.num_visual_tokens // 4
    assert seen["embeds"].shape[1] == batch["input_ids"].shape[1] - (n - kept)
    assert comp.last_kept_visual_tokens == 2 * kept
    # independent: projector features, 2x2 average pooled, land right after BOS
    with torch.no_grad():
        vis = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").pooler_output
        grid = torch.stack(list(vis)).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(seen["embeds"][:, 1 : 1 + kept], pooled, rtol=1e-5, atol=1e-6)
    # labels line up: the loss equals a hand-computed shifted CE over the same text positions
    emb = model.get_input_embeddings()
    text_ids = batch["input_ids"][:, 1 + n :]
    torch.testing.assert_close(seen["embeds"][:, 1 + kept :], emb(text_ids).detach())
    logits = out.logits[:, :-1]
    tgt = torch.cat([torch.full((2, 1 + kept), -100), batch["labels"][:, 1 + n :]], 1)[:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # evaluation runs dense
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert comp.last_seq_len == batch["input_ids"].shape[1]


def test_dropping_tokens_equals_masking_them_in_the_dense_sequence(small):
    """Kept tokens keep their dense position ids, so the shorter sequence computes exactly what
    the dense one computes when attention cannot see the dropped visual tokens."""
    model, parts = small
    batch = _batch(parts, rows=2, text=12)
    comp = TokenCompressor(model, parts, pad_token_id=0)
    comp.set("random", 0.5, torch.Generator().manual_seed(3))
    out = model(**batch)
    n, kept = parts.num_visual_tokens, kept_count(parts.num_visual_tokens, 0.5)
    g = torch.Generator().manual_seed(3)  # the compressor's draws, image by image
    mask = batch["attention_mask"].clone()
    for row in range(2):
        dropped = torch.randperm(n, generator=g)[kept:]
        mask[row, 1 + dropped] = 0
    comp.set(None, 1.0)
    ref = model(**{**batch, "attention_mask": mask})
    torch.testing.assert_close(out.logits[:, 1 + kept :], ref.logits[:, 1 + n :], rtol=1e-4, atol=1e-4)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)


@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_every_compressor_trains_end_to_end(small, method):
    model, parts = small
    comp = TokenCompressor(model, parts, pad_token_id=0)
    comp.set(method, 0.25, torch.Generator().manual_seed(0))
    model(**_batch(parts)).loss.backward()
    grad = parts.projector.linear_1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert comp.last_kept_visual_tokens == 2 * 16


def test_compress_features_rejects_unknown_method():
    with pytest.raises(ScheduleError, match="unknown token method 'pool'; use one of uniform"):
        compress_features([torch.zeros(4, 2)], "pool", 0.5, grid=(2, 2))
