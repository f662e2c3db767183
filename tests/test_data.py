"""Tests for the LLaVA data reader and the shapes generator.

Run: PYTHONPATH=. .venv/bin/pytest tests/test_data.py -q
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from PIL import Image

from sts_train.data import (
    IGNORE_INDEX,
    LlavaCollator,
    LlavaDataset,
    encode_conversation,
    load_llava_json,
    render_conversation,
)
from sts_train.errors import DataError
from sts_train.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    answer_of,
    generate_shapes,
    vocabulary_sentences,
)

N_IMAGE_TOKENS = 16  # factory "test" size: (56 // 14) ** 2
IMAGE_ID, PAD_ID, BOS_ID, EOS_ID = 4, 0, 1, 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _write_json(path, entries):
    path.write_text(json.dumps(entries))
    return path


def _dataset(paths, split, processor, **kwargs):
    return LlavaDataset(paths[split], None, processor, num_image_tokens=N_IMAGE_TOKENS, **kwargs)


# --- shapes data set through dataset and collator ---------------------------------------------


def test_shapes_items_and_collated_batch(shapes_dir, test_processor):
    ds = _dataset(shapes_dir, "instruction", test_processor)
    assert len(ds) == 20 and ds.image_token_id == IMAGE_ID
    items = [ds[i] for i in (0, 19, 1, 2)]  # item 19 is the text-only one
    assert items[1]["pixel_values"] is None and items[1]["id"] == "instr-00019"
    for item in items:
        assert item["input_ids"].dtype == torch.long and item["input_ids"].dim() == 1
        assert item["labels"].shape == item["attention_mask"].shape == item["input_ids"].shape
        assert int((item["input_ids"] == IMAGE_ID).sum()) == (0 if item["pixel_values"] is None
                                                              else N_IMAGE_TOKENS)
        assert item["input_ids"][0] == BOS_ID and item["input_ids"][-1] == EOS_ID

    # The image's corner is background: CLIP-normalized background colour, independently computed.
    sample = ds.samples[0]
    pixels = items[0]["pixel_values"]
    assert pixels.shape == (3, 56, 56) and pixels.dtype == torch.float32
    rgb = Image.open(shapes_dir["images"].parent / sample["image"]).getpixel((0, 0))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(pixels[:, 0, 0], expected, atol=1e-4, rtol=0)

    batch = LlavaCollator(pad_token_id=test_processor.tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["pixel_values"].shape == (3, 3, 56, 56)  # three images, in batch order
    torch.testing.assert_close(batch["pixel_values"][1], items[2]["pixel_values"])
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["input_ids"][row, n:] == PAD_ID).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, n:] == 0).all()


def test_collator_omits_pixel_values_for_text_only_batch(shapes_dir, test_processor):
    ds = _dataset(shapes_dir, "instruction", test_processor)
    batch = LlavaCollator(pad_token_id=PAD_ID)([ds[19], ds[19]])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 2


# --- labels and image expansion against independent computations ------------------------------


def test_labels_supervise_only_answers_token_by_token(test_processor):
    tok = test_processor.tokenizer
    answers = ["red", "It is a plain blue background."]
    turns = [{"from": "human", "value": "<image>\nWhat color is the shape? Answer with one word."},
             {"from": "gpt", "value": answers[0]},
             {"from": "human", "value": "And the background?"},
             {"from": "gpt", "value": answers[1]}]
    enc = encode_conversation(turns, tok, num_image_tokens=N_IMAGE_TOKENS, image_token_id=IMAGE_ID)

    # Independent: tokenize the whole rendered text at once, image placeholder repeated 16 times.
    text = render_conversation(turns).replace("<image>", "<image>" * N_IMAGE_TOKENS)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == whole
    expected = [IGNORE_INDEX] * len(whole)
    eos_positions = [i for i, t in enumerate(whole) if t == EOS_ID]
    assert len(eos_positions) == 2
    for eos_pos, answer in zip(eos_positions, answers):
        answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        start = eos_pos - len(answer_ids)
        assert whole[start:eos_pos] == answer_ids
        expected[start : eos_pos + 1] = answer_ids + [EOS_ID]
    assert enc["labels"] == expected
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == (
        " red</s> It is a plain blue background.</s>")
    # "ASSISTANT:" right before the first answer stays unsupervised.
    first = expected.index(next(t for t in expected if t != IGNORE_INDEX))
    assert tok.decode(whole[first - 4 : first]).endswith("ASSISTANT:")


def _sentencepiece_style_tokenizer(prepend_scheme: str):
    """A Metaspace ("▁") BPE tokenizer like Llama's; "always" marks the start of every text
    (legacy Llama, as in LLaVA-1.5), "first" only the start of the whole input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    corpus = ["USER: What is this? ASSISTANT: A cat.", "A cat sits on a mat.", "What color is it?"] * 5
    sp.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<image>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.mark.parametrize("prepend_scheme", ["always", "first"])
def test_labels_exact_with_a_sentencepiece_style_tokenizer(prepend_scheme):
    """Tokenizing pieces separately gave the legacy scheme a stray "▁" before every answer,
    and both schemes other prompt tokens than the tokenizer gives the whole prompt."""
    tok = _sentencepiece_style_tokenizer(prepend_scheme)
    image_id, bos = tok.convert_tokens_to_ids("<image>"), tok.bos_token_id
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "A mat."}]
    enc = encode_conversation(turns, tok, num_image_tokens=3, image_token_id=image_id)

    # Independent: what the tokenizer gives the whole prompt at inference (it adds the BOS id).
    text = render_conversation(turns, bos="").replace("<image>", "<image>" * 3)
    whole = tok(text)["input_ids"]
    assert tok("x")["input_ids"][0] != bos and whole[0] != bos  # this tokenizer adds no BOS itself
    whole = [bos] + whole
    assert enc["input_ids"] == whole and whole.count(image_id) == 3
    supervised = tok.convert_ids_to_tokens([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert supervised == ["▁A", "▁cat.", "</s>", "▁A", "▁mat.", "</s>"]
    # the answer tokens are the whole prompt's tokens right after the first "ASSISTANT:"
    prefix = 1 + len(tok("USER: <image><image><image>\nWhat is this? ASSISTANT:")["input_ids"])
    assert enc["labels"][prefix:prefix + 3] == whole[prefix:prefix + 3]
    assert set(enc["labels"][:prefix]) == {IGNORE_INDEX}


@pytest.mark.parametrize("split, index", [("alignment", 0), ("instruction", 0)])
def test_image_expansion_matches_llava_processor(shapes_dir, test_processor, split, index):
    ds = _dataset(shapes_dir, split, test_processor)
    sample, item = ds.samples[index], ds[index]
    rendered = render_conversation(sample["conversations"])
    assert rendered.startswith("<s>USER: <image>\n")
    image = Image.open(shapes_dir["images"].parent / sample["image"])
    reference = test_processor(text=rendered, images=image, return_tensors="pt")
    # The factory tokenizer adds no BOS itself: the rendered "<s>" is the only one.
    assert test_processor.tokenizer("x")["input_ids"][0] != BOS_ID
    assert reference["input_ids"][0].tolist() == item["input_ids"].tolist()
    torch.testing.assert_close(reference["pixel_values"][0], item["pixel_values"])


# --- the model trains on a collated batch ------------------------------------------------------


def test_forward_backward_on_mixed_batch(shapes_dir, test_processor):
    from sts_train.factory import build_model

    ds = _dataset(shapes_dir, "instruction", test_processor)
    items = [ds[0], ds[19], ds[1]]
    batch = LlavaCollator(pad_token_id=PAD_ID)(items)
    model = build_model("test", seed=0)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # Independent loss: next-token cross-entropy over the supervised positions only.
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "model.multi_modal_projector.linear_1.weight" in grads
    assert all(torch.isfinite(g).all() for g in grads.values())
    # Right padding does not change the logits of a shorter row (causal attention).
    with torch.no_grad():
        alone = model(**LlavaCollator(pad_token_id=PAD_ID)([items[1]])).logits[0]
    n = len(items[1]["input_ids"])
    torch.testing.assert_close(out.logits[1, :n], alone, atol=1e-4, rtol=1e-4)


# --- generator ---------------------------------------------------------------------------------


def _file_digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_and_eval_is_held_out(tmp_path):
    kwargs = dict(n_alignment=10, n_instruction=20, n_eval=10, image_size_px=32)
    a = _file_digests(generate_shapes(tmp_path / "a", seed=3, **kwargs)["images"].parent)
    b = _file_digests(generate_shapes(tmp_path / "b", seed=3, **kwargs)["images"].parent)
    c = _file_digests(generate_shapes(tmp_path / "c", seed=4, **kwargs)["images"].parent)
    assert a == b
    assert len(a) == 5 + 10 + 19 + 10 + 10  # 5 json files + images (QA sample 19 is text-only)
    assert a["alignment.json"] != c["alignment.json"]
    assert sum(a[k] != c.get(k) for k in a if k.endswith(".png")) > 30

    paths = generate_shapes(tmp_path / "d", seed=0, **kwargs)
    train = [s for n in ("alignment", "instruction") for s in load_llava_json(paths[n])]
    held = [s for n in ("alignment_eval", "instruction_eval") for s in load_llava_json(paths[n])]
    images = {s["image"] for s in train if "image" in s}
    eval_images = {s["image"] for s in held if "image" in s}
    assert len(eval_images) == 20 and not images & eval_images
    d = _file_digests(paths["images"])
    train_bytes = {d[i.removeprefix("images/")] for i in images}
    assert not train_bytes & {d[i.removeprefix("images/")] for i in eval_images}
    assert {s["id"] for s in train}.isdisjoint(s["id"] for s in held)
    info = json.loads(paths["info"].read_text())
    assert info["seed"] == 0 and info["counts"]["instruction"] == {"samples": 20, "images": 19}


def test_generated_text_is_covered_by_vocabulary_and_answers_are_one_word(shapes_dir):
    vocabulary = set(re.findall(r"\w+", " ".join(vocabulary_sentences())))
    kinds = {"color": COLORS, "background": COLORS, "shape": SHAPES, "position": POSITIONS,
             "size": SIZES, "text_shape": SHAPES, "text_color": COLORS}
    for split in ("alignment", "instruction", "alignment_eval", "instruction_eval"):
        for sample in load_llava_json(shapes_dir[split]):
            for turn in sample["conversations"]:
                words = set(re.findall(r"\w+", turn["value"].replace("<image>", "")))
                assert words <= vocabulary, (sample["id"], words - vocabulary)
            if "kind" in sample:
                assert answer_of(sample) in kinds[sample["kind"]]
    caption = load_llava_json(shapes_dir["alignment"])[0]["conversations"][1]["value"]
    assert re.fullmatch(r"A (small|large) \w+ \w+ (at the \w+|in the center) of a \w+ image\.",
                        caption)


def test_generator_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refusal = "folder is not empty; choose a new folder or pass --overwrite"
    with pytest.raises(DataError, match=refusal):
        generate_shapes(out, n_alignment=1, n_instruction=1, n_eval=1, image_size_px=32)
    assert (out / "mine.txt").read_text() == "keep me"
    # --overwrite replaces a data set, not a folder of other files
    with pytest.raises(DataError, match="holds files but no shapes data set, and --overwrite would delete them"):
        generate_shapes(out, n_alignment=1, n_instruction=1, n_eval=1, image_size_px=32, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    generate_shapes(out, n_alignment=1, n_instruction=1, n_eval=1, image_size_px=32)
    generate_shapes(out, n_alignment=2, n_instruction=1, n_eval=1, image_size_px=32, overwrite=True)
    assert len(json.loads((out / "alignment.json").read_text())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temp folder left behind


# --- bad inputs ----------------------------------------------------------------------------------


def _one_turn(**extra):
    return {"id": "cat-7", **extra, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}


def test_broken_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 3 column 1"):
        load_llava_json(path)
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        load_llava_json(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"expected a non-empty JSON list of samples, got a dict"):
        load_llava_json(_write_json(tmp_path / "d.json", {"id": "a"}))


def test_missing_image_names_entry_path_and_folder(tmp_path):
    (tmp_path / "img").mkdir()
    path = _write_json(tmp_path / "data.json", [_one_turn(image="nope/cat.png")] * 2)
    message = (r"data\.json: entry 0 \(id 'cat-7'\): image 'nope/cat\.png' not found in "
               r"image folder .*img \(2 of 2 samples")
    with pytest.raises(DataError, match=message):
        load_llava_json(path, tmp_path / "img")


@pytest.mark.parametrize("entry, message", [
    ({"id": "x", "conversations": [{"from": "assistant", "value": "hi"}]},
     r"entry 0 \(id 'x'\): turn 0 is from 'assistant' but must be from 'human'"),
    ({"id": "x", "conversations": [{"from": "system", "value": "Be brief."}]},
     r"turn 0 is a 'system' turn, which is not supported; fold it into the first human turn"),
    ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]},
     r"the last turn is from 'human'"),
    ({"id": "x", "conversations": []}, r"'conversations' is missing or empty"),
    (_one_turn(), r"entry 0 \(id 'cat-7'\): the text has <image> but there is no 'image'"),
    (["not", "a", "dict"], r"entry 0 is a list, not an object"),
])
def test_bad_entries_are_rejected(tmp_path, entry, message):
    with pytest.raises(DataError, match=message):
        load_llava_json(_write_json(tmp_path / "data.json", [entry]))


def test_placeholder_is_added_and_max_length_guards_image_tokens(tmp_path, test_processor):
    Image.new("RGB", (56, 56), (10, 20, 30)).save(tmp_path / "a.png")
    entry = {"id": "p", "image": "a.png", "conversations": [
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "blue"}]}
    path = _write_json(tmp_path / "data.json", [entry])
    assert load_llava_json(path)[0]["conversations"][0]["value"] == "<image>\nWhat color?"

    full = LlavaDataset(path, tmp_path, test_processor, num_image_tokens=N_IMAGE_TOKENS)[0]
    image_end = 4 + N_IMAGE_TOKENS  # <s> "USER" ":" " " then the image tokens
    assert full["input_ids"][4:image_end].tolist() == [IMAGE_ID] * N_IMAGE_TOKENS
    first = int((full["labels"] != IGNORE_INDEX).nonzero()[0])  # the answer's first token
    cut = LlavaDataset(path, tmp_path, test_processor, num_image_tokens=N_IMAGE_TOKENS,
                       max_length=first + 1)[0]
    assert cut["input_ids"].tolist() == full["input_ids"][:first + 1].tolist()
    assert (cut["labels"] != IGNORE_INDEX).sum() == 1 and cut["attention_mask"].sum() == first + 1
    with pytest.raises(DataError, match=rf"entry 0 \(id 'p'\): max_length={first} cuts every answer token "
                                        rf"\(the first answer starts at position {first}\); use max_length > {first}"):
        LlavaDataset(path, tmp_path, test_processor, num_image_tokens=N_IMAGE_TOKENS, max_length=first)
    with pytest.raises(DataError, match=r"entry 0 \(id 'p'\): max_length=19 cuts its image tokens.*"
                                        r"use max_length >= 20"):
        LlavaDataset(path, tmp_path, test_processor, num_image_tokens=N_IMAGE_TOKENS, max_length=19)


def test_unreadable_images_and_json_lines_are_found_before_training(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    entries = [_one_turn(image="ok.png"), _one_turn(image="broken.png"), _one_turn(image="broken.png")]
    path = _write_json(tmp_path / "data.json", entries)
    with pytest.raises(DataError, match=r"entry 1 \(id 'cat-7'\): image 'broken.png' is not a readable image "
                                        r"\(2 of 3 samples have one\); replace the files"):
        load_llava_json(path)
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join(json.dumps(_one_turn(image="ok.png")) for _ in range(2)))
    with pytest.raises(DataError, match=r"one JSON object per line \(JSON Lines\) at line 2; the LLaVA format is "
                                        r"one JSON list"):
        load_llava_json(lines)


def test_kinds_must_name_each_answer(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    for kinds in (["color", "size"], "color", [1]):
        with pytest.raises(DataError, match=r"'kinds' must list one question kind \(a string\) per gpt turn \(1\)"):
            load_llava_json(_write_json(tmp_path / "data.json", [_one_turn(image="ok.png", kinds=kinds)]))
    assert load_llava_json(_write_json(tmp_path / "data.json", [_one_turn(image="ok.png", kinds=["what"])]))[0]["kinds"] == ["what"]


def test_held_out_draws_stop_when_every_image_is_taken(tmp_path):
    from sts_train.shapes import MAX_REDRAWS, _write_split

    class Everything:  # every pixel key is already a training image
        def __contains__(self, key):
            return True

    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=rf"instruction_eval: {MAX_REDRAWS} draws in a row repeat a training image "
                                        r"at 16 px; use larger images or fewer training samples"):
        _write_split(tmp_path, "instruction_eval", "qa", 1, "x", 0, 16, Everything())
