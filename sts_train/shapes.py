"""Synthetic "shapes" data set in the LLaVA format.

Each image shows ONE coloured shape (circle, square, triangle or cross; small or large; at the
left, right, top, bottom or center) on a plain background of another colour. Large uniform
backgrounds make most visual tokens redundant, which is what the token profiler should find.

Files written (all JSON in the LLaVA format that :mod:`sts_train.data` reads)::

    images/*.png            one PNG per image sample, named after the sample id
    alignment.json          captions: "<image>\\nDescribe the image briefly." -> "A small red ..."
    instruction.json        multi-turn one-word QA: each image is asked all five kinds (color, shape,
                            position, size, background) in random order; ~5% text-only
    alignment_eval.json     held-out captions (own images, own random stream)
    instruction_eval.json   held-out QA
    dataset_info.json       seed, counts, image size, question kinds

Try it::

    python -c "from sts_train.shapes import generate_shapes; print(generate_shapes('runs/shapes'))"
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from sts_train.configtools import check_overwritable, check_replaceable, json_field
from sts_train.errors import DataError

MIN_IMAGE_SIZE_PX = 16  # generate_shapes draws shapes of at least a few pixels

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

# Kinds of instruction question, each answered with exactly one word from the constants above.
QUESTION_KINDS = ("color", "shape", "position", "size", "background")
QUESTIONS = {
    "color": "What color is the shape? Answer with one word.",
    "shape": "What shape is shown? Answer with one word.",
    "position": "Where is the shape? Answer with one word.",
    "size": "Is the shape small or large? Answer with one word.",
    "background": "What color is the background? Answer with one word.",
}
CAPTION_PROMPT = "Describe the image briefly."
TEXT_ONLY_KINDS = ("text_shape", "text_color")
TEXT_ONLY_EVERY = 20  # every 20th instruction sample is text-only (5%)
GENERATOR = "sts_train.shapes"  # recorded in dataset_info.json
MAX_REDRAWS = 1000  # a held-out image that keeps repeating a training one: the pixel space is used up

_RGB = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (140, 60, 180), "orange": (245, 140, 20),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
# Shape centre as a fraction of the image side, and radius fraction per size.
_CENTERS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22),
            "bottom": (0.5, 0.78), "center": (0.5, 0.5)}
_RADIUS = {"small": 0.09, "large": 0.18}
_JITTER = 0.03
_SPLITS = (  # (json name, kind, count argument, id prefix)
    ("alignment", "caption", "n_alignment", "align"),
    ("instruction", "qa", "n_instruction", "instr"),
    ("alignment_eval", "caption", "n_eval", "align-eval"),
    ("instruction_eval", "qa", "n_eval", "instr-eval"),
)


def caption(color: str, shape: str, position: str, size: str, background: str) -> str:
    """The alignment caption of an image, e.g. "A small red circle at the left of a blue image."."""
    where = "in the center" if position == "center" else f"at the {position}"
    return f"A {size} {color} {shape} {where} of a {background} image."


def text_only_question(kind: str, shape: str, color: str, shape_first: bool) -> str:
    """A question answerable without an image: pick the shape (or the colour) of two words."""
    first, second = (shape, color) if shape_first else (color, shape)
    noun = "a shape" if kind == "text_shape" else "a color"
    return f"Which of these is {noun}: {first} or {second}? Answer with one word."


def vocabulary_sentences() -> list[str]:
    """Sentences covering every word and template the generator writes (trains the tokenizer).

    Compact on purpose (about a hundred lines): every word appears in each template it can
    appear in, without the full cartesian product, so tokenizer training stays fast.
    """
    lines = [CAPTION_PROMPT, *QUESTIONS.values()]
    for i, color in enumerate(COLORS):
        background = COLORS[(i + 1) % len(COLORS)]
        for j, shape in enumerate(SHAPES):
            position = POSITIONS[(i + j) % len(POSITIONS)]
            size = SIZES[(i + j) % len(SIZES)]
            lines.append(caption(color, shape, position, size, background))
            for kind in TEXT_ONLY_KINDS:
                lines.append(text_only_question(kind, shape, color, shape_first=(i + j) % 2 == 0))
    for k, position in enumerate(POSITIONS):
        for size in SIZES:
            shape = SHAPES[k % len(SHAPES)]
            lines.append(caption(COLORS[k], shape, position, size, COLORS[-1 - k]))
    lines.append(" ".join(COLORS + SHAPES + POSITIONS + SIZES))
    return lines


def answer_of(sample: dict) -> str:
    """The expected one-word answer of a QA sample: its first ``gpt`` turn, stripped.

    Raises:
        DataError: the sample has no ``gpt`` turn.
    """
    for turn in sample.get("conversations", []):
        if turn.get("from") == "gpt":
            return str(turn["value"]).strip()
    raise DataError(f"sample {sample.get('id')!r} has no gpt turn; it has no answer to compare")


def _draw_params(rng: random.Random, size_px: int) -> dict:
    """Draw one image's attributes and its integer pixel geometry."""
    color, background = rng.sample(COLORS, 2)
    shape, position, size = rng.choice(SHAPES), rng.choice(POSITIONS), rng.choice(SIZES)
    fx, fy = _CENTERS[position]
    jitter = _JITTER * size_px
    cx = round(fx * size_px + rng.uniform(-jitter, jitter))
    cy = round(fy * size_px + rng.uniform(-jitter, jitter))
    radius = max(2, round(_RADIUS[size] * size_px))
    return {"color": color, "background": background, "shape": shape, "position": position,
            "size": size, "cx": cx, "cy": cy, "radius": radius}


def _pixel_key(params: dict) -> tuple:
    """Everything that determines the pixels: equal keys give byte-identical PNGs."""
    return tuple(params[k] for k in ("color", "background", "shape", "cx", "cy", "radius"))


def _render(params: dict, size_px: int):
    """Draw the image (PIL ImageDraw, no antialiasing, so pixels are exact)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size_px, size_px), _RGB[params["background"]])
    draw = ImageDraw.Draw(img)
    fill, cx, cy, r = _RGB[params["color"]], params["cx"], params["cy"], params["radius"]
    if params["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif params["shape"] == "square":
        h = max(1, round(0.85 * r))
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif params["shape"] == "triangle":
        base = cy + round(0.8 * r)
        draw.polygon([(cx, cy - r), (cx - r, base), (cx + r, base)], fill=fill)
    else:  # cross
        t = max(1, r // 3)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img


def _qa_sample(rng: random.Random, sample_id: str, image: str, params: dict) -> dict:
    """An instruction sample: every question kind about the image, one turn each, in random order.

    Like LLaVA-Instruct's multi-turn conversations, one image carries several supervised answers,
    so a step over its (long) visual token sequence teaches five answers instead of one.
    ``kinds`` names the question kind of each turn (answer accuracy scores every turn per kind);
    ``kind`` is the first one.
    """
    kinds = rng.sample(QUESTION_KINDS, len(QUESTION_KINDS))
    conversations = []
    for t, kind in enumerate(kinds):
        prefix = "<image>\n" if t == 0 else ""
        conversations += [{"from": "human", "value": prefix + QUESTIONS[kind]},
                          {"from": "gpt", "value": params[kind]}]
    return {"id": sample_id, "image": image, "kind": kinds[0], "kinds": kinds, "conversations": conversations}


def _text_only_sample(rng: random.Random, sample_id: str) -> dict:
    """A QA sample without an image (LLaVA mixes some text-only data into instruction tuning)."""
    kind, shape, color = rng.choice(TEXT_ONLY_KINDS), rng.choice(SHAPES), rng.choice(COLORS)
    question = text_only_question(kind, shape, color, shape_first=rng.random() < 0.5)
    answer = shape if kind == "text_shape" else color
    return {"id": sample_id, "kind": kind, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _write_split(folder: Path, name: str, kind: str, count: int, prefix: str, seed: int,
                 size_px: int, avoid_keys: set) -> tuple[list[dict], set]:
    """Render one split's images into ``folder/images``.

    Returns:
        The split's samples and the pixel keys of its images.
    """
    rng = random.Random(f"sts-shapes:{seed}:{name}")  # one independent stream per split
    samples, keys = [], set()
    for i in range(count):
        sample_id = f"{prefix}-{i:05d}"
        if kind == "qa" and i % TEXT_ONLY_EVERY == TEXT_ONLY_EVERY - 1:
            samples.append(_text_only_sample(rng, sample_id))
            continue
        params = _draw_params(rng, size_px)
        for _ in range(MAX_REDRAWS):
            if _pixel_key(params) not in avoid_keys:
                break
            params = _draw_params(rng, size_px)  # held-out images never repeat a train image
        else:
            raise DataError(f"{name}: {MAX_REDRAWS} draws in a row repeat a training image at {size_px} px; "
                            "use larger images or fewer training samples")
        keys.add(_pixel_key(params))
        image = f"images/{sample_id}.png"
        _render(params, size_px).save(folder / image, format="PNG")
        if kind == "caption":
            text = caption(params["color"], params["shape"], params["position"], params["size"],
                           params["background"])
            samples.append({"id": sample_id, "image": image, "conversations": [
                {"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
                {"from": "gpt", "value": text}]})
        else:
            samples.append(_qa_sample(rng, sample_id, image, params))
    return samples, keys


def is_shapes_dataset(folder: str | Path) -> bool:
    """Whether ``folder`` holds a data set this generator wrote (its ``dataset_info.json`` says so)."""
    return json_field(Path(folder) / "dataset_info.json", "generator") == GENERATOR


def generate_shapes(out_dir: str | Path, *, n_alignment: int = 200, n_instruction: int = 200,
                    n_eval: int = 50, image_size_px: int = 336, seed: int = 0,
                    overwrite: bool = False) -> dict[str, Path]:
    """Write the shapes data set (images + LLaVA JSON files) into ``out_dir``, atomically.

    Everything is a pure function of the arguments: the same seed gives identical JSON and
    PNG bytes. Train and eval splits draw from separate random streams, and no eval image is
    pixel-identical to a train image.

    Args:
        out_dir: folder to create; written in a temporary sibling folder, then renamed.
        n_alignment: caption samples in ``alignment.json`` (one image each).
        n_instruction: QA samples in ``instruction.json``; every 20th is text-only.
        n_eval: samples in each of ``alignment_eval.json`` and ``instruction_eval.json``.
        image_size_px: side of the square images.
        seed: seed of all random streams.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        Paths by name: ``images`` (folder), ``alignment``, ``instruction``, ``alignment_eval``,
        ``instruction_eval`` and ``info`` (``dataset_info.json``).

    Raises:
        DataError: ``out_dir`` is a file or holds the current folder, or is not empty and
            ``overwrite`` is false; a count is negative or the image size is below 16 px.
    """
    counts = {"n_alignment": n_alignment, "n_instruction": n_instruction, "n_eval": n_eval}
    for key, value in counts.items():
        if not isinstance(value, int) or value < 0:
            raise DataError(f"{key}={value!r}: must be an integer >= 0")
    if not isinstance(image_size_px, int) or image_size_px < MIN_IMAGE_SIZE_PX:
        raise DataError(f"image_size_px={image_size_px!r}: must be an integer >= {MIN_IMAGE_SIZE_PX}")
    given, out_dir = Path(out_dir), check_replaceable(out_dir, DataError)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: folder is not empty; choose a new folder or pass --overwrite")
    check_overwritable(out_dir, is_shapes_dataset(out_dir), "shapes data set", DataError)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        train_keys: set = set()
        info_counts = {}
        for name, kind, count_arg, prefix in _SPLITS:
            is_eval = name.endswith("_eval")
            samples, keys = _write_split(tmp, name, kind, counts[count_arg], prefix, seed,
                                         image_size_px, train_keys if is_eval else set())
            if not is_eval:
                train_keys |= keys
            (tmp / f"{name}.json").write_text(json.dumps(samples, indent=1) + "\n")
            info_counts[name] = {"samples": len(samples),
                                 "images": sum("image" in s for s in samples)}
        info = {"generator": GENERATOR, "format_version": 1, "seed": seed,
                "image_size_px": image_size_px, "counts": info_counts,
                "question_kinds": list(QUESTION_KINDS), "text_only_every": TEXT_ONLY_EVERY}
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataset_paths(given)


def dataset_paths(folder: str | Path) -> dict[str, Path]:
    """The paths :func:`generate_shapes` returns, for a data set it wrote into ``folder``."""
    folder = Path(folder)
    paths = {"images": folder / "images", "info": folder / "dataset_info.json"}
    paths.update({name: folder / f"{name}.json" for name, *_ in _SPLITS})
    return paths
