"""Read LLaVA-format JSON data into token ids, labels and pixel values.

The data format (LLaVA-1.5 ``llava_v1_5_mix665k.json`` and friends)::

    [{"id": "0001", "image": "coco/0001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                        {"from": "gpt", "value": "A cat."}]}]

Rules the reader enforces (:func:`load_llava_json`), all checked for every entry before any
training starts:

- turns alternate ``human``, ``gpt``, ``human``, ... starting with ``human`` and ending with
  ``gpt``; a ``system`` turn is rejected (fold it into the first human turn), because dropping it
  silently would change what the model is trained on;
- a sample has at most one image and then exactly one ``<image>`` placeholder, in a human turn;
  LLaVA convention: when an image is given and no ``<image>`` appears, ``"<image>\\n"`` is
  prepended to the first human turn;
- ``<image>`` without an ``image`` key is an error; so is a missing image file.

Prompt format (the factory chat template, LLaVA "v1" without a system prompt)::

    <s>USER: {human} ASSISTANT: {gpt}</s>USER: {human} ASSISTANT: {gpt}</s>

The whole prompt is tokenized at once (as at inference). Supervised tokens (labels != -100) are
those that start inside ``" " + gpt_value`` and the EOS of each assistant turn; ``<s>``,
``USER: ...``, ``ASSISTANT:`` and the image tokens are masked with -100.

Try it::

    python -c "from sts_train.shapes import generate_shapes; generate_shapes('runs/shapes')"
    python -c "from sts_train.data import load_llava_json as f; print(f('runs/shapes/alignment.json'))"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sts_train.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
ROLES = ("human", "gpt")


def _where(json_path: Path, index: int, sample_id: object) -> str:
    return f"{json_path}: entry {index} (id {sample_id!r})"


def _check_entry(entry: object, index: int, json_path: Path) -> dict:
    """Validate one entry's structure and return a normalized copy (image placeholder added)."""
    if not isinstance(entry, dict):
        raise DataError(f"{json_path}: entry {index} is a {type(entry).__name__}, not an object; "
                        'each entry must look like {"id": ..., "conversations": [...]}')
    sample_id = str(entry.get("id", index))
    where = _where(json_path, index, sample_id)
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' is missing or empty; "
                        "give a list of human/gpt turns")
    normalized = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {t} must be an object with a string 'value'")
        role, expected = turn.get("from"), ROLES[t % 2]
        if role == "system":
            raise DataError(f"{where}: turn {t} is a 'system' turn, which is not supported; "
                            "fold it into the first human turn")
        if role != expected:
            raise DataError(f"{where}: turn {t} is from {role!r} but must be from {expected!r}; "
                            "turns alternate human, gpt, ... starting with human")
        if role == "gpt" and IMAGE_PLACEHOLDER in turn["value"]:
            raise DataError(f"{where}: turn {t} (gpt) contains {IMAGE_PLACEHOLDER}; "
                            "the placeholder belongs in a human turn")
        normalized.append({"from": role, "value": turn["value"]})
    if normalized[-1]["from"] != "gpt":
        raise DataError(f"{where}: the last turn is from 'human'; "
                        "end with a gpt answer (there is nothing to train on otherwise)")

    n_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in normalized)
    image = entry.get("image")
    if image is None:
        if n_placeholders:
            raise DataError(f"{where}: the text has {IMAGE_PLACEHOLDER} but there is no 'image'; "
                            "add the image path or remove the placeholder")
    elif not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be one relative path string, got {image!r}")
    elif n_placeholders > 1:
        raise DataError(f"{where}: the text has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                        "for one image; keep exactly one")
    elif n_placeholders == 0:
        normalized[0]["value"] = IMAGE_PLACEHOLDER + "\n" + normalized[0]["value"]
    kinds = entry.get("kinds")
    n_answers = sum(turn["from"] == "gpt" for turn in normalized)
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != n_answers
                              or not all(isinstance(k, str) for k in kinds)):
        raise DataError(f"{where}: 'kinds' must list one question kind (a string) per gpt turn "
                        f"({n_answers}), got {kinds!r}; fix it or drop the key")
    sample = {k: v for k, v in entry.items() if k not in ("id", "conversations", "image")}
    sample["id"] = sample_id
    if image is not None:
        sample["image"] = image
    sample["conversations"] = normalized
    return sample


def load_llava_json(json_path: str | Path, image_folder: str | Path | None = None, *,
                    check_images: bool = True) -> list[dict]:
    """Read and validate a LLaVA-format JSON file; check that every image file exists.

    Args:
        json_path: the JSON file (a list of samples).
        image_folder: folder the ``image`` paths are relative to; default: the JSON's folder.
        check_images: also open every image's header (not its pixels).

    Returns:
        Normalized copies of the samples: ``id`` as a string (the entry index when absent),
        ``conversations`` as ``{"from", "value"}`` turns with the ``<image>`` placeholder added
        where LLaVA convention implies it, ``image`` only when present; other keys are kept.

    Raises:
        DataError: missing file, invalid JSON (line and column), not a non-empty list, a bad
            entry (the message names its index and id and the fix), or missing image files
            (the first one is named, with the count of all missing ones).
    """
    json_path = Path(json_path)
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    if json_path.is_dir():
        found = sorted(json_path.glob("*.json"))
        hint = f", e.g. {found[0]}" if found else ""
        raise DataError(f"{json_path}: is a folder; pass the LLaVA JSON file inside it{hint}")
    if not json_path.is_file():
        raise DataError(f"{json_path}: file not found; check the data path")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and exc.colno == 1:
            raise DataError(f"{json_path}: one JSON object per line (JSON Lines) at line {exc.lineno}; the "
                            "LLaVA format is one JSON list: wrap the lines in [ ] with commas") from None
        raise DataError(f"{json_path}: invalid JSON at line {exc.lineno} column {exc.colno} "
                        f"({exc.msg}); fix the file") from None
    except UnicodeDecodeError:
        raise DataError(f"{json_path}: not UTF-8 text; save the file as UTF-8 JSON") from None
    if not isinstance(entries, list) or not entries:
        got = f"a {type(entries).__name__}" if not isinstance(entries, list) else "an empty list"
        raise DataError(f"{json_path}: expected a non-empty JSON list of samples, got {got}")
    samples = [_check_entry(entry, i, json_path) for i, entry in enumerate(entries)]
    if image_folder is not None and not folder.is_dir():
        raise DataError(f"{json_path}: image folder {folder} does not exist; fix image_folder")
    missing = [(i, s) for i, s in enumerate(samples)
               if "image" in s and not (folder / s["image"]).is_file()]
    if missing:
        i, s = missing[0]
        raise DataError(f"{_where(json_path, i, s['id'])}: image {s['image']!r} not found in "
                        f"image folder {folder} ({len(missing)} of {len(samples)} samples have a "
                        "missing image); fix image_folder or the paths")
    unreadable = [] if not check_images else [
        (i, s) for i, s in enumerate(samples) if "image" in s and not _image_header_ok(folder / s["image"])]
    if unreadable:
        i, s = unreadable[0]
        raise DataError(f"{_where(json_path, i, s['id'])}: image {s['image']!r} is not a readable image "
                        f"({len(unreadable)} of {len(samples)} samples have one); replace the files")
    return samples


def _image_header_ok(path: Path) -> bool:
    """Whether PIL recognizes the file as an image (reads the header only, not the pixels)."""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except (OSError, Image.DecompressionBombError):
        return False


def _render_spans(conversations: list[dict], bos: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered prompt and the character span of each assistant turn's ``" " + value + eos``."""
    parts, spans, length = [bos], [], len(bos)
    for t, turn in enumerate(conversations):
        if turn["from"] == "human":
            piece = f"USER: {turn['value']} ASSISTANT:"
        elif turn["from"] == "gpt":
            piece = f" {turn['value']}{eos}"
            spans.append((length, length + len(piece)))
        else:
            raise DataError(f"turn {t} is from {turn['from']!r}; use one of {', '.join(ROLES)}")
        parts.append(piece)
        length += len(piece)
    return "".join(parts), spans


def render_conversation(conversations: list[dict], *, bos: str = "<s>", eos: str = "</s>") -> str:
    """The prompt text of a conversation, with ``<image>`` not yet expanded.

    A conversation that ends with a human turn renders as a generation prompt ending in
    ``"ASSISTANT:"``.
    """
    return _render_spans(conversations, bos, eos)[0]


def encode_conversation(conversations: list[dict], tokenizer, *, num_image_tokens: int,
                        image_token_id: int) -> dict[str, list[int]]:
    """Token ids and labels of a conversation in the prompt format of this module.

    The BOS id, then the whole rendered prompt after it (:func:`render_conversation`, with the
    tokenizer's EOS string) tokenized at once, as a tokenizer encodes it at inference; each
    ``<image>`` is expanded to ``num_image_tokens`` ids. A token is supervised when it starts
    inside an assistant turn's ``" " + answer + eos`` (character offsets), so labels are exact
    for byte-level BPE and SentencePiece tokenizers alike: tokenizing pieces separately gives a
    SentencePiece tokenizer that marks the start of every text (legacy Llama, as in LLaVA-1.5)
    a stray ``"▁"`` before every answer. A trailing human turn encodes as a generation prompt
    (ends with ``ASSISTANT:``).

    Args:
        conversations: validated ``{"from": "human"|"gpt", "value": str}`` turns.
        tokenizer: fast HF tokenizer with ``eos_token_id`` (``bos_token_id`` goes first when set).
        num_image_tokens: ids each ``<image>`` placeholder expands to.
        image_token_id: the id of the image placeholder token.

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}`` of equal length; labels are
        ``IGNORE_INDEX`` except on the answer tokens and the EOS of each assistant turn.

    Raises:
        DataError: a turn with an unknown role; a tokenizer without EOS, without character
            offsets (a slow tokenizer), or that does not keep ``<image>`` as one token.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; "
                        "load the fast one (AutoTokenizer with use_fast=True)")
    # BOS as an id in front, as a tokenizer adds it at inference (as text, "<s>USER" would
    # lose the "▁" a SentencePiece tokenizer puts at the start of the text)
    text, answers = _render_spans(conversations, "", tokenizer.eos_token)
    images = []
    at = text.find(IMAGE_PLACEHOLDER)
    while at >= 0:
        images.append((at, at + len(IMAGE_PLACEHOLDER)))
        at = text.find(IMAGE_PLACEHOLDER, at + 1)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(input_ids)
    expanded = set()
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        image = next((k for k, (a, b) in enumerate(images) if start < b and end > a), None)
        if image is not None:
            a, b = images[image]
            if start < a or end > b:
                raise DataError(f"the tokenizer merges {IMAGE_PLACEHOLDER} with the text around it; "
                                f"add {IMAGE_PLACEHOLDER} to it as a special token")
            if image not in expanded:
                expanded.add(image)
                input_ids += [image_token_id] * num_image_tokens
                labels += [IGNORE_INDEX] * num_image_tokens
            continue
        input_ids.append(token)
        labels.append(token if any(a <= start < b for a, b in answers) else IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


class LlavaDataset(torch.utils.data.Dataset):
    """A LLaVA JSON file as training items, validated when built.

    Items: ``input_ids``, ``labels``, ``attention_mask`` (1-D LongTensors), ``pixel_values``
    (3xHxW float tensor, or None for a text-only sample) and ``id``.

    Args:
        json_path: the LLaVA JSON file.
        image_folder: folder image paths are relative to (None: the JSON's folder).
        processor: a ``LlavaProcessor`` (its ``tokenizer`` and ``image_processor`` are used).
        num_image_tokens: ids each ``<image>`` expands to (the model's visual token count).
        max_length: longest sequence; longer ones are cut from the end.
        check_images: open every image's header up front (:func:`load_llava_json`).

    Raises:
        DataError: see :func:`load_llava_json`; also when ``max_length`` would cut image
            tokens of some sample or all of its answer tokens (every sample is checked up
            front), or an image's pixels cannot be decoded (when the item is read; its header
            is checked up front).
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path | None, processor, *,
                 num_image_tokens: int, max_length: int | None = None, check_images: bool = True):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise DataError(f"num_image_tokens={num_image_tokens!r}: must be an integer >= 1")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise DataError(f"max_length={max_length!r}: must be an integer >= 1 or None")
        self.json_path = Path(json_path)
        self.image_folder = self.json_path.parent if image_folder is None else Path(image_folder)
        self.samples = load_llava_json(self.json_path, self.image_folder, check_images=check_images)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if image_token_id is None or image_token_id == self.tokenizer.unk_token_id:
            raise DataError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token; "
                            "use the processor saved with the model")
        self.image_token_id = int(image_token_id)
        if max_length is not None:
            for index in range(len(self.samples)):
                self._check_fits(index)

    def __len__(self) -> int:
        return len(self.samples)

    def _encode(self, conversations: list[dict]) -> dict[str, list[int]]:
        return encode_conversation(conversations, self.tokenizer,
                                   image_token_id=self.image_token_id,
                                   num_image_tokens=self.num_image_tokens)

    def _check_fits(self, index: int) -> None:
        """Raise if ``max_length`` cuts image tokens or leaves no answer token (encodes only up
        to the image's turn and the first answer)."""
        sample = self.samples[index]
        turns = sample["conversations"]
        images = [t for t, turn in enumerate(turns) if IMAGE_PLACEHOLDER in turn["value"]]
        encoded = self._encode(turns[: max(images[-1] + 1 if images else 0, 2)])
        ids, labels = encoded["input_ids"], encoded["labels"]
        where = _where(self.json_path, index, sample["id"])
        if images:
            image_end = len(ids) - ids[::-1].index(self.image_token_id)
            if image_end > self.max_length:
                raise DataError(f"{where}: max_length={self.max_length} cuts its image tokens (they end at "
                                f"position {image_end}); use max_length >= {image_end} or a shorter prompt")
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        if first >= self.max_length:
            raise DataError(f"{where}: max_length={self.max_length} cuts every answer token (the first "
                            f"answer starts at position {first}); use max_length > {first} or a shorter prompt")

    def _load_pixels(self, index: int) -> torch.Tensor:
        from PIL import Image

        sample = self.samples[index]
        path = self.image_folder / sample["image"]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"{_where(self.json_path, index, sample['id'])}: cannot read image "
                            f"{path} ({exc}); replace the file") from None
        return self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        encoded = self._encode(sample["conversations"])
        input_ids, labels = encoded["input_ids"], encoded["labels"]
        if self.max_length is not None and len(input_ids) > self.max_length:
            if self.image_token_id in input_ids[self.max_length:]:  # checked at init; kept as guard
                self._check_fits(index)
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
            "pixel_values": self._load_pixels(index) if "image" in sample else None,
            "id": sample["id"],
        }


@dataclass
class LlavaCollator:
    """Right-pad items of :class:`LlavaDataset` into a batch for ``model(**batch)``.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100, ``attention_mask``
    with 0. ``pixel_values`` stacks the images of the items that have one, in batch order
    (the model matches them to the image tokens in order); the key is absent when no item
    has an image. ``id`` is dropped.
    """

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
            attention_mask[row, :n] = torch.as_tensor(item["attention_mask"], dtype=torch.long)
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [item["pixel_values"] for item in batch if item.get("pixel_values") is not None]
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out
