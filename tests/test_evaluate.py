"""Dense evaluation: loss against a direct computation, accuracy against a rigged answer."""

import json

import pytest
import torch
import torch.nn as nn

from sts_train.data import LlavaCollator, LlavaDataset
from sts_train.evaluate import answer_accuracy, eval_loss, first_word, prior_accuracy
from sts_train.factory import build_model
from sts_train.shapes import answer_of


def test_first_word():
    assert first_word(" Red.</s>") == "red" and first_word("  ") == "" and first_word("left side") == "left"


def test_eval_loss_is_token_weighted_mean(shapes_dir, test_processor):
    model = build_model("test", seed=1).eval()
    ds = LlavaDataset(shapes_dir["instruction_eval"], shapes_dir["images"].parent, test_processor,
                      num_image_tokens=16)
    collate = LlavaCollator(test_processor.tokenizer.pad_token_id)
    got = eval_loss(model, ds, collate, batch_size=3)
    with torch.no_grad():  # one sample at a time, weighted by its number of answer tokens
        parts = []
        for i in range(len(ds)):
            batch = collate([ds[i]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            parts.append((model(**batch).loss.item() * n, n))
    assert got == pytest.approx(sum(a for a, _ in parts) / sum(n for _, n in parts), rel=1e-5)


def test_answer_accuracy_with_a_model_that_always_says_one_word(shapes_dir, test_processor):
    model = build_model("test", seed=1).eval()
    tok = test_processor.tokenizer
    samples = json.loads(shapes_dir["instruction"].read_text())
    word = answer_of(samples[0])  # a word the data set does answer
    word_id = tok.encode(" " + word, add_special_tokens=False)
    assert len(word_id) == 1
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[word_id[0]] = 10.0
    model.lm_head = head
    ds = LlavaDataset(shapes_dir["instruction"], shapes_dir["images"].parent, test_processor, num_image_tokens=16)
    result = answer_accuracy(model, ds)
    expected = sum(answer_of(s) == word for s in samples) / len(samples)
    assert result["answered"] == len(samples)
    assert result["answer_accuracy"] == pytest.approx(expected)
    assert 0 < expected < 1  # the data set has other answers too: the test can fail


def _qa(kind, answer, **extra):
    return {"id": "q", **({"kind": kind} if kind else {}), **extra, "conversations": [
        {"from": "human", "value": "Which?"}, {"from": "gpt", "value": answer}]}


def test_prior_accuracy_answers_each_kinds_most_common_training_answer():
    train = [_qa("color", "red"), _qa("color", "Red."), _qa("color", "blue"),
             _qa("size", "small"), _qa("size", "large"),  # tie: alphabetical -> large
             _qa(None, "yes")]
    evals = [_qa("color", "red"), _qa("color", "blue"), _qa("size", "large"), _qa("size", "small"),
             _qa("shape", "circle"),  # a kind training never asked: always wrong
             _qa(None, "yes"), {"id": "t", "conversations": [{"from": "human", "value": "hi"}]}]
    got = prior_accuracy(train, evals)
    assert got["answered"] == 6  # the sample without an answer is not scored
    assert got["per_kind"] == {"all": 1.0, "color": 0.5, "shape": 0.0, "size": 0.5}
    assert got["answer_accuracy"] == pytest.approx(3 / 6)
