"""Dense evaluation: loss against a direct computation, accuracy against a rigged model and
against ``model.generate`` (the definition the one-pass scorer must reproduce)."""

import json

import pytest
import torch
import torch.nn.functional as F

from sts_train.data import LlavaCollator, LlavaDataset, encode_conversation
from sts_train.evaluate import (eval_loss, first_word, paired_difference, prior_accuracy, score, turn_hits,
                                turn_kinds)
from sts_train.factory import build_model


def test_first_word():
    assert first_word(" Red.</s>") == "red" and first_word("  ") == "" and first_word("left side") == "left"
    assert first_word(" Grün.") == "grün" and first_word("红色") == "红色" and first_word("_x") == "x"


def test_eval_loss_is_token_weighted_mean(shapes_dir, test_processor):
    model = build_model("test", seed=1).eval()
    ds = LlavaDataset(shapes_dir["instruction_eval"], shapes_dir["images"].parent, test_processor,
                      num_image_tokens=16)
    collate = LlavaCollator(test_processor.tokenizer.pad_token_id)
    grad_on = []  # scoring builds no autograd graph
    hook = model.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    got = eval_loss(model, ds, collate, batch_size=3)
    hook.remove()
    assert grad_on and not any(grad_on)
    with torch.no_grad():  # one sample at a time, weighted by its number of answer tokens
        parts = []
        for i in range(len(ds)):
            batch = collate([ds[i]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            parts.append((model(**batch).loss.item() * n, n))
    assert got == pytest.approx(sum(a for a, _ in parts) / sum(n for _, n in parts), rel=1e-5)


def test_turn_hits_scores_each_answer_run_whole():
    eos, x = 2, -100
    target = torch.tensor([x, 7, 8, eos, x, x, 9, eos, x, 5, 6])  # the last run was cut: no eos
    hit = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    assert turn_hits(target, hit, eos) == [True, False]
    assert turn_hits(torch.tensor([x, x]), torch.tensor([False, False]), eos) == []


def test_turn_kinds():
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}] * 2
    assert turn_kinds({"kinds": ["color", "size"], "kind": "color", "conversations": conv}) == ["color", "size"]
    assert turn_kinds({"kind": "detail", "conversations": conv}) == ["detail", "detail"]
    assert turn_kinds({"conversations": conv}) == ["all", "all"]


def _parrot(tokenizer, word: str):
    """A test model whose greedy reply to every question is ``word`` then end of turn.

    Its decoder layers add nothing (o_proj and down_proj zeroed), so the logits at a position
    depend only on that position's input token; the head maps the prompt's last token to
    ``word`` and ``word`` to EOS."""
    model = build_model("test", seed=1).eval()
    lm = model.model.language_model
    for layer in lm.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    prompt_end = encode_conversation([{"from": "human", "value": "?"}], tokenizer, num_image_tokens=0,
                                     image_token_id=0)["input_ids"][-1]
    (word_id,) = tokenizer.encode(" " + word, add_special_tokens=False)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        head = model.lm_head.weight
        head.zero_()
        for src, dst in ((prompt_end, word_id), (word_id, tokenizer.eos_token_id)):
            head[dst] = 50 * F.normalize(lm.norm(embed[src]), dim=-1)
    return model


def test_one_pass_accuracy_equals_greedy_generation_on_every_turn(shapes_dir, test_processor):
    tok = test_processor.tokenizer
    samples = json.loads(shapes_dir["instruction"].read_text())
    word = samples[0]["conversations"][1]["value"]  # a colour the data set does answer
    model = _parrot(tok, word)
    ds = LlavaDataset(shapes_dir["instruction"], shapes_dir["images"].parent, test_processor, num_image_tokens=16)
    got = score(model, ds, LlavaCollator(tok.pad_token_id), batch_size=3)
    # the parrot is right exactly on the turns whose answer is its word
    answers = [(k, t["value"]) for s in samples
               for k, t in zip(turn_kinds(s), [t for t in s["conversations"] if t["from"] == "gpt"])]
    assert got["answered"] == len(answers) == 19 * 5 + 1  # 19 five-turn image samples, 1 text-only
    assert got["answer_accuracy"] == pytest.approx(sum(a == word for _, a in answers) / len(answers))
    assert 0 < got["answer_accuracy"] < 1
    color = [a for k, a in answers if k == "color"]
    assert got["per_kind"]["color"] == pytest.approx(sum(a == word for a in color) / len(color))
    # independent: greedy generation after each question, with the reference answers before it
    for index in range(4):
        sample, pixels = samples[index], ds[index]["pixel_values"]
        conv = sample["conversations"]
        for turn in range(len(conv) // 2):
            enc = encode_conversation(conv[: 2 * turn + 1], tok, num_image_tokens=16,
                                      image_token_id=model.config.image_token_index)
            ids = torch.tensor([enc["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels[None],
                                 max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            reference = tok.encode(" " + conv[2 * turn + 1]["value"], add_special_tokens=False) + [tok.eos_token_id]
            generated = out[0, ids.shape[1]:].tolist()[: len(reference)]
            outcome = next(o for o in got["outcomes"] if o[0] == sample["id"] and o[1] == turn)
            assert outcome[3] == (generated == reference), (sample["id"], turn, generated, reference)


def _qa(kind, *answers, **extra):
    turns = [t for a in answers for t in ({"from": "human", "value": "Which?"}, {"from": "gpt", "value": a})]
    return {"id": "q", **({"kind": kind} if kind else {}), **extra, "conversations": turns}


def test_prior_accuracy_answers_each_kinds_most_common_training_answer():
    train = [_qa("color", "red"), _qa("color", "Red."), _qa("color", "blue"),
             _qa("size", "small"), _qa("size", "large"), _qa("size", "large"),
             _qa(None, "yes"),
             _qa("color", "green", "small", kinds=["shape", "size"])]  # per-turn kinds win; size ties
    # size: small 2, large 2 -> the alphabetically first, large
    evals = [_qa("color", "red"), _qa("color", "blue"), _qa("size", "large"), _qa("size", "small"),
             _qa("shape", "circle"),  # the training's only shape answer is green: wrong
             _qa(None, "yes"), {"id": "t", "conversations": [{"from": "human", "value": "hi"}]},
             _qa("texture", "soft")]  # a kind training never asked: always wrong
    got = prior_accuracy(train, evals)
    assert got["answered"] == 7  # the sample without an answer is not scored
    assert got["per_kind"] == {"all": 1.0, "color": 0.5, "shape": 0.0, "size": 0.5, "texture": 0.0}
    assert got["answer_accuracy"] == pytest.approx(3 / 7)


def test_paired_difference():
    a = [["s1", 0, "k", True], ["s1", 1, "k", False], ["s2", 0, "k", False], ["s3", 0, "k", True]]
    b = [["s1", 0, "k", True], ["s1", 1, "k", True], ["s2", 0, "k", True], ["s9", 0, "k", True]]
    got = paired_difference(a, b)  # diffs 0, 1, 1 on the three shared answers
    assert got["paired"] == 3 and got["difference"] == pytest.approx(2 / 3)
    assert got["stderr"] == pytest.approx((((0 - 2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2 / 3) ** 0.5)
    # a repeated id pairs in order: identical outcomes differ by nothing
    same = [["d", 0, "k", True], ["d", 0, "k", False], ["e", 0, "k", True]]
    assert paired_difference(same, [list(x) for x in same]) == {"difference": 0.0, "stderr": 0.0, "paired": 3}
