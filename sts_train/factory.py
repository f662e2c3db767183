"""Tiny LLaVA models built from configs, with a locally trained tokenizer.

Nothing is downloaded: the model is a real ``LlavaForConditionalGeneration`` (CLIP vision
tower, two-layer MLP projector, Llama decoder) with random weights, and the processor pairs a
CLIP image processor with a byte-level BPE tokenizer trained here with ``tokenizers``. A
folder written by :func:`save_model_folder` loads back with plain transformers::

    AutoModelForImageTextToText.from_pretrained(folder)
    AutoProcessor.from_pretrained(folder)

Try it::

    python -c "from sts_train.factory import save_model_folder; save_model_folder('demo', 'runs/m')"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sts_train.errors import ModelError

# Special tokens of the factory tokenizer. ``<image>`` is the LLaVA placeholder.
PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# The chat template the data reader and the factory processor share (LLaVA-1.5 "plain v1").
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}"
    "ASSISTANT: {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    """Shape of a factory model. ``image_size // patch_size`` squared is the visual token count."""

    text_layers: int
    text_hidden: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    image_size_px: int
    patch_size_px: int
    vocab_size: int = 1024
    max_positions: int = 2048

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size_px // self.patch_size_px) ** 2


SIZES: dict[str, ModelSize] = {
    # ~2 layers, 16 visual tokens: a train step takes milliseconds. Used by the tests.
    "test": ModelSize(
        text_layers=2, text_hidden=64, text_heads=4, text_kv_heads=2, text_intermediate=128,
        vision_layers=2, vision_hidden=32, vision_heads=2, vision_intermediate=64,
        image_size_px=56, patch_size_px=14, vocab_size=512, max_positions=512,
    ),
    # 4 layers, 64 visual tokens: the test-size pipeline with a few layers to skip.
    "small": ModelSize(
        text_layers=4, text_hidden=128, text_heads=4, text_kv_heads=2, text_intermediate=256,
        vision_layers=2, vision_hidden=64, vision_heads=2, vision_intermediate=128,
        image_size_px=112, patch_size_px=14, vocab_size=512, max_positions=1024,
    ),
    # The LLaVA-1.5 geometry (336 px, patch 14: 576 visual tokens) on an 8-layer decoder.
    "demo": ModelSize(
        text_layers=8, text_hidden=256, text_heads=8, text_kv_heads=4, text_intermediate=688,
        vision_layers=2, vision_hidden=64, vision_heads=2, vision_intermediate=256,
        image_size_px=336, patch_size_px=14, vocab_size=1024, max_positions=2048,
    ),
}


def get_size(name: str) -> ModelSize:
    """Return the named factory size.

    Raises:
        ModelError: unknown name (the message lists the known ones).
    """
    if name not in SIZES:
        raise ModelError(f"unknown model size {name!r}; use one of {', '.join(SIZES)}")
    return SIZES[name]


def _tokenizer_corpus() -> list[str]:
    """Text the factory tokenizer is trained on: the shapes vocabulary and plain English."""
    from sts_train import shapes

    lines = list(shapes.vocabulary_sentences())
    lines += [
        "Describe the image briefly.",
        "What is shown in the picture? Answer with one word.",
        "The quick brown fox jumps over the lazy dog.",
        "USER: ASSISTANT: a an the of in on at to is are was with and or for",
        "0 1 2 3 4 5 6 7 8 9 yes no left right top bottom center middle",
    ]
    return lines


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer locally and wrap it as a fast HF tokenizer.

    Byte-level BPE encodes any text, so user data outside the training corpus still works.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and
        ``<image>`` as special tokens (ids 0-4) and the LLaVA chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(size: str | ModelSize = "test"):
    """Build the LLaVA processor of a factory size: CLIP image processor + local tokenizer.

    Returns:
        ``transformers.LlavaProcessor`` that expands each ``<image>`` to the size's number of
        visual tokens.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    spec = get_size(size) if isinstance(size, str) else size
    px = spec.image_size_px
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": px}, crop_size={"height": px, "width": px}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.vocab_size),
        patch_size=spec.patch_size_px,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(size: str | ModelSize = "test"):
    """Return the ``LlavaConfig`` of a factory size (Llama decoder, CLIP vision tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    spec = get_size(size) if isinstance(size, str) else size
    text = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size_px,
        patch_size=spec.patch_size_px,
        projection_dim=spec.vision_hidden,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=SPECIAL_TOKENS.index(IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        tie_word_embeddings=False,
    )


def build_model(size: str | ModelSize = "test", seed: int = 0):
    """Build a ``LlavaForConditionalGeneration`` with random weights, deterministic in ``seed``.

    The last CLIP layer and the post-layernorm are never used with ``vision_feature_layer=-2``;
    callers that train freeze the whole tower anyway.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    config = build_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def save_model_folder(size: str, folder: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a factory model and its processor as a standard model folder.

    Raises:
        ModelError: the folder is a file, or is or contains the current folder; or it is not
            empty and ``overwrite`` is false.
    """
    import shutil
    import tempfile

    from sts_train.configtools import check_overwritable, check_replaceable, json_field

    folder = Path(folder)
    check_replaceable(folder, ModelError)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ModelError(f"{folder}: folder is not empty; choose a new folder or pass --overwrite")
    check_overwritable(folder, json_field(folder / "config.json", "model_type") is not None, "model folder", ModelError)
    model, processor = build_model(size, seed), build_processor(size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
