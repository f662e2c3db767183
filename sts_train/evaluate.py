"""Dense evaluation: held-out loss and exact-match answer accuracy, in one teacher-forced pass.

    sts-train evaluate runs/instr/checkpoint-200 --data data/instruction_eval.json --images data

Always dense: the compressor and skipper only act in training mode, and this module runs the
model in eval mode on a plain loaded model.

Metrics:
    eval_loss: mean cross-entropy over all supervised answer tokens of the split (token-weighted,
        not a mean of per-batch means).
    answer_accuracy: for every assistant turn, given the conversation before it (the image, the
        earlier questions and their reference answers), does greedy decoding reproduce the
        reference answer exactly: each answer token and the end-of-turn token? Greedy decoding
        emits token ``k`` as the argmax after tokens ``< k``; when the earlier tokens are the
        reference's, that argmax is what the teacher-forced pass computes, so one forward pass
        scores every turn of a conversation at once (the test suite checks this against
        ``model.generate``). Per question kind: a sample's ``kinds`` (one per assistant turn,
        as the shapes data writes it), else its ``kind`` for every turn, else ``all``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from sts_train.data import IGNORE_INDEX


def first_word(text: str) -> str:
    """``" Red.</s>"`` -> ``"red"``."""
    match = re.search(r"[^\W_]+", text)  # letters and digits of any script
    return match.group(0).lower() if match else ""


def turn_kinds(sample: dict) -> list[str]:
    """Question kind of each assistant turn of ``sample`` (see the module docstring)."""
    n = sum(turn["from"] == "gpt" for turn in sample["conversations"])
    kinds = sample.get("kinds")
    if isinstance(kinds, list) and len(kinds) == n:
        return [str(k) for k in kinds]
    return [str(sample.get("kind", "all"))] * n


def turn_hits(target: torch.Tensor, hit: torch.Tensor, eos_token_id: int) -> list[bool]:
    """Per assistant turn of one row: is every token of its answer predicted (argmax)?

    Args:
        target: ``(T,)`` next-token labels of the row (``labels[1:]``), ``-100`` where unsupervised.
        hit: ``(T,)`` bool, argmax of the logits equals ``target``.
        eos_token_id: the token that ends each answer; a run of labels that does not end with it
            (cut by ``max_length``) is not scored.
    """
    edge = target.new_zeros(1, dtype=torch.int8)  # on the batch's device
    supervised = torch.cat([edge, (target != IGNORE_INDEX).to(torch.int8), edge])
    edges = supervised.diff()
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return [bool(hit[s:e].all()) for s, e in zip(starts, ends) if int(target[e - 1]) == eos_token_id]


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
def answer_loss_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the summed cross-entropy of the supervised (answer) tokens and their count.

    ``labels`` as the LLM saw them (shifted here: position t predicts label t + 1). Returns a
    float64 tensor of shape ``(rows, 2)`` on the logits' device.
    """
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    losses = F.cross_entropy(logits[:, :-1][supervised].float(), target[supervised], reduction="none")
    rows = torch.zeros(labels.shape[0], 2, dtype=torch.float64, device=logits.device)
    rows[:, 0].index_add_(0, supervised.nonzero()[:, 0], losses.double())
    rows[:, 1] = supervised.sum(1)
    return rows


@torch.no_grad()
def score(model, dataset, collator, batch_size: int = 8, limit: int | None = None) -> dict:
    """Loss and answer accuracy of ``model`` on a :class:`LlavaDataset`, in one dense pass.

    Args:
        limit: score only the first ``limit`` samples (None: all).

    Returns:
        ``{"eval_loss", "answer_accuracy", "answered", "per_kind", "outcomes"}``; ``outcomes``
        lists ``[sample id, turn, kind, correct]`` per scored answer (for paired comparisons).
    """
    model.eval()
    device = next(model.parameters()).device
    eos = dataset.tokenizer.eos_token_id
    n_samples = min(len(dataset), limit) if limit else len(dataset)
    total, count, outcomes = 0.0, 0, []
    for start in range(0, n_samples, batch_size):
        rows = range(start, min(start + batch_size, n_samples))
        items = [dataset[i] for i in rows]
        batch = {key: value.to(device) for key, value in collator(items).items()}
        labels = batch.pop("labels")
        target = labels[:, 1:]
        supervised = target != IGNORE_INDEX
        logits = model(**batch).logits[:, :-1][supervised].float()  # answer positions only
        total += F.cross_entropy(logits, target[supervised], reduction="sum").item()
        count += int(supervised.sum())
        hit = torch.zeros_like(supervised)
        hit[supervised] = logits.argmax(-1) == target[supervised]
        for r, (i, item) in enumerate(zip(rows, items)):
            kinds = turn_kinds(dataset.samples[i])
            outcomes += [[item["id"], t, kind, ok]
                         for t, (kind, ok) in enumerate(zip(kinds, turn_hits(target[r], hit[r], eos)))]
    return {"eval_loss": total / max(count, 1), **_accuracy((kind, ok) for _, _, kind, ok in outcomes),
            "outcomes": outcomes}


def eval_loss(model, dataset, collator, batch_size: int = 8) -> float:
    """Token-weighted mean loss of ``model`` on a :class:`LlavaDataset`."""
    return score(model, dataset, collator, batch_size)["eval_loss"]


def _references(sample: dict) -> list[tuple[str, str]]:
    """(kind, reference word) of each assistant turn."""
    answers = [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"]
    return [(kind, first_word(answer)) for kind, answer in zip(turn_kinds(sample), answers)]


def prior_accuracy(train_samples: list[dict], eval_samples: list[dict]) -> dict:
    """Answer accuracy of a guesser that never looks at the image or the question text.

    For each question kind (see :func:`turn_kinds`) it answers the most common answer of that
    kind in the training data (ties: alphabetical); a kind the training data lacks is always
    wrong. A model that scores no better has not learned to use the image. Scored on every
    assistant turn, on the answer's first word (lower-cased, punctuation stripped).

    Returns:
        ``{"answer_accuracy": float, "answered": int, "per_kind": {kind: accuracy}}``.
    """
    counts: dict[str, Counter] = {}
    for sample in train_samples:
        for kind, word in _references(sample):
            counts.setdefault(kind, Counter())[word] += 1
    guess = {kind: min(c, key=lambda w: (-c[w], w)) for kind, c in counts.items()}
    return _accuracy((kind, guess.get(kind) == word) for s in eval_samples for kind, word in _references(s))


def _paired_keys(outcomes: list) -> Iterable[tuple[tuple, bool]]:
    seen: Counter = Counter()
    for sid, t, _, ok in outcomes:
        seen[(str(sid), t)] += 1
        yield (str(sid), t, seen[(str(sid), t)]), ok


def paired_difference(a: list, b: list) -> dict:
    """Accuracy of ``b`` minus ``a`` on the answers both scored, with its standard error.

    ``a`` and ``b`` are :func:`score` outcomes of two models on the same split. Answers are
    paired by (sample id, turn, occurrence): a repeated id pairs in order. The standard error is that of the mean per-answer difference.
    The answers of one image are correlated, so treat it as a lower bound.
    """
    first = dict(_paired_keys(a))
    diffs = [float(ok) - float(first[key]) for key, ok in _paired_keys(b) if key in first]
    n = len(diffs)
    if n < 2:
        return {"difference": float("nan"), "stderr": float("nan"), "paired": n}
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"difference": mean, "stderr": (var / n) ** 0.5, "paired": n}


def evaluate_split(model, processor, json_path: str | Path, images: str | Path | None, *,
                   batch_size: int = 8, accuracy: bool = True, limit: int | None = None) -> dict:
    """Evaluate a loaded model on one LLaVA JSON split: loss, and answer accuracy if asked.

    Raises:
        StsError: bad data (one-line messages).
    """
    from sts_train.adapters import model_parts
    from sts_train.data import LlavaCollator, LlavaDataset
    from sts_train.modelio import pad_token_id

    dataset = LlavaDataset(json_path, images, processor, num_image_tokens=model_parts(model).num_visual_tokens)
    scored = score(model, dataset, LlavaCollator(pad_token_id(processor.tokenizer)), batch_size, limit)
    result = {"data": str(json_path), "samples": min(len(dataset), limit) if limit else len(dataset),
              "eval_loss": scored.pop("eval_loss")}
    if accuracy:
        result.update(scored)
    return result


def evaluate_folder(model_dir: str | Path, json_path: str | Path, images: str | Path | None, *,
                    batch_size: int = 8, accuracy: bool = True, limit: int | None = None,
                    device: str = "cpu") -> dict:
    """Load a model folder (plain transformers) onto ``device`` and evaluate it on a LLaVA JSON split.

    Raises:
        StsError: bad model folder, data or device (one-line messages).
    """
    from sts_train.data import load_llava_json
    from sts_train.modelio import check_device, load_model, load_processor

    check_device(device)
    load_llava_json(json_path, images, check_images=False)  # bad data fails before the model loads
    model, processor = load_model(model_dir, device=device), load_processor(model_dir)
    return {"model": str(model_dir), **evaluate_split(model, processor, json_path, images, batch_size=batch_size,
                                                      accuracy=accuracy, limit=limit)}
