"""Dense evaluation: held-out loss and exact-match answer accuracy.

    sts-train evaluate runs/instr/checkpoint-200 --data data/instruction_eval.json --images data

Always dense: the compressor and skipper only act in training mode, and this module runs the
model in eval mode on a plain loaded model.

Metrics:
    eval_loss: mean cross-entropy over all supervised answer tokens of the split (token-weighted,
        not a mean of per-batch means).
    answer_accuracy: greedy generation after the first question; the first word of the reply
        (lower-cased, punctuation stripped) must equal the sample's first answer exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F


def first_word(text: str) -> str:
    """``" Red.</s>"`` -> ``"red"``."""
    match = re.search(r"[A-Za-z0-9]+", text)
    return match.group(0).lower() if match else ""


@torch.no_grad()
def eval_loss(model, dataset, collator, batch_size: int = 8) -> float:
    """Token-weighted mean loss of ``model`` on a :class:`LlavaDataset`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / max(count, 1)


def _reference(sample: dict) -> tuple[str, str] | None:
    """(kind, reference word) of the first answer accuracy scores; None: the sample has none."""
    turns = sample["conversations"]
    if len(turns) < 2 or turns[1]["from"] != "gpt":
        return None
    return sample.get("kind", "all"), first_word(turns[1]["value"])


def _accuracy(outcomes: Iterable[tuple[str, bool]]) -> dict:
    """``{"answer_accuracy", "answered", "per_kind"}`` of (kind, correct) outcomes."""
    per_kind: dict[str, tuple[int, int]] = {}
    for kind, ok in outcomes:
        hits, n = per_kind.get(kind, (0, 0))
        per_kind[kind] = (hits + ok, n + 1)
    hits, n = sum(h for h, _ in per_kind.values()), sum(c for _, c in per_kind.values())
    return {"answer_accuracy": hits / n if n else float("nan"), "answered": n,
            "per_kind": {k: h / c for k, (h, c) in sorted(per_kind.items())}}


@torch.no_grad()
def answer_accuracy(model, dataset, *, max_new_tokens: int = 4, limit: int | None = None) -> dict:
    """Greedy-generate the first answer of each sample and compare with the reference word.

    Returns:
        ``{"answer_accuracy": float, "answered": int, "per_kind": {kind: accuracy}}``.
    """
    from sts_train.data import encode_conversation

    model.eval()
    tok = dataset.tokenizer
    samples = dataset.samples[:limit] if limit else dataset.samples

    def outcomes():
        for index, sample in enumerate(samples):
            ref = _reference(sample)
            if ref is None:
                continue
            enc = encode_conversation(sample["conversations"][:1], tok, num_image_tokens=dataset.num_image_tokens,
                                      image_token_id=dataset.image_token_id)
            input_ids = torch.tensor([enc["input_ids"]])
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            if sample.get("image"):
                inputs["pixel_values"] = dataset[index]["pixel_values"].unsqueeze(0)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            reply = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
            yield ref[0], first_word(reply) == ref[1]

    return _accuracy(outcomes())


def prior_accuracy(train_samples: list[dict], eval_samples: list[dict]) -> dict:
    """Answer accuracy of a guesser that never looks at the image or the question text.

    For each question kind (``kind`` of a sample, ``all`` without one) it answers the most
    common first answer of that kind in the training data (ties: alphabetical); a kind the
    training data lacks is always wrong. A model that scores no better has not learned to use
    the image. Scored like :func:`answer_accuracy` (first answer, first word).

    Returns:
        ``{"answer_accuracy": float, "answered": int, "per_kind": {kind: accuracy}}``.
    """
    counts: dict[str, Counter] = {}
    for kind, word in filter(None, map(_reference, train_samples)):
        counts.setdefault(kind, Counter())[word] += 1
    guess = {kind: min(c, key=lambda w: (-c[w], w)) for kind, c in counts.items()}
    return _accuracy((kind, guess.get(kind) == word) for kind, word in filter(None, map(_reference, eval_samples)))


def evaluate_split(model, processor, json_path: str | Path, images: str | Path | None, *,
                   batch_size: int = 8, accuracy: bool = True, limit: int | None = None) -> dict:
    """Evaluate a loaded model on one LLaVA JSON split: loss, and answer accuracy if asked.

    Raises:
        StsError: bad data (one-line messages).
    """
    from sts_train.adapters import model_parts
    from sts_train.data import LlavaCollator, LlavaDataset

    dataset = LlavaDataset(json_path, images, processor, num_image_tokens=model_parts(model).num_visual_tokens)
    result = {"data": str(json_path), "samples": len(dataset),
              "eval_loss": eval_loss(model, dataset, LlavaCollator(processor.tokenizer.pad_token_id), batch_size)}
    if accuracy:
        result.update(answer_accuracy(model, dataset, limit=limit))
    return result


def evaluate_folder(model_dir: str | Path, json_path: str | Path, images: str | Path | None, *,
                    batch_size: int = 8, accuracy: bool = True, limit: int | None = None) -> dict:
    """Load a model folder (plain transformers) and evaluate it on a LLaVA JSON split.

    Raises:
        StsError: bad model folder or data (one-line messages).
    """
    from sts_train.modelio import load_model, load_processor

    model, processor = load_model(model_dir), load_processor(model_dir)
    return {"model": str(model_dir), **evaluate_split(model, processor, json_path, images, batch_size=batch_size,
                                                      accuracy=accuracy, limit=limit)}
