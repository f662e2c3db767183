"""Factory models: real LLaVA classes from configs, saved and re-loaded with plain Auto classes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from sts_train.adapters import model_parts
from sts_train.errors import ModelError
from sts_train.factory import SIZES, build_config, build_model, save_model_folder


def test_test_size_shape():
    model = build_model("test")
    parts = model_parts(model)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert parts.num_layers == 2
    assert parts.num_visual_tokens == 16 and parts.patch_grid == (4, 4)
    assert parts.hidden_size == 64
    assert model.config.image_token_id < model.config.text_config.vocab_size


def test_demo_size_geometry():
    spec = SIZES["demo"]
    cfg = build_config("demo")
    assert spec.num_visual_tokens == 576
    assert cfg.text_config.num_hidden_layers == 8 and cfg.text_config.hidden_size == 256
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14


def test_same_seed_same_weights_different_seed_differs():
    a, b, c = build_model("test", seed=1), build_model("test", seed=1), build_model("test", seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_save_and_reload_with_plain_auto_classes(tmp_path):
    folder = save_model_folder("test", tmp_path / "m", seed=3)
    original = build_model("test", seed=3)
    loaded = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    sd_a, sd_b = original.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    # the processor expands <image> into the model's 16 visual tokens
    from PIL import Image

    enc = processor(text=["USER: <image>\nWhat color? ASSISTANT:"], images=[Image.new("RGB", (70, 60))],
                    return_tensors="pt")
    assert int((enc["input_ids"] == loaded.config.image_token_id).sum()) == 16
    assert tuple(enc["pixel_values"].shape) == (1, 3, 56, 56)
    with torch.no_grad():
        out = loaded(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], loaded.config.text_config.vocab_size)


def test_a_config_far_larger_than_its_weights_is_refused_before_it_is_built(tmp_path):
    """A config.json that lost the model's sizes would build transformers' defaults (a 7B
    model on the test weights); the parameter count is compared on the meta device first."""
    import json

    from sts_train.modelio import load_model

    folder = save_model_folder("test", tmp_path / "m", seed=0)
    held = sum(p.numel() for p in build_model("test", seed=0).parameters())
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(hidden_size=1024, intermediate_size=4096, head_dim=64)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=rf"config.json describes [\d,]+ parameters but the weights hold {held:,}; "
                                         "fix config.json or re-save the model with save_pretrained"):
        load_model(folder)


def test_save_refuses_non_empty_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty.*--overwrite"):
        save_model_folder("test", tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_unknown_size():
    with pytest.raises(ModelError, match="unknown model size 'huge'; use one of test"):
        build_model("huge")


@pytest.mark.parametrize("cli", ["sts-train", "sts-profile"])
def test_cli_help(cli):
    exe = [sys.executable, "-m", "sts_train.cli" if cli == "sts-train" else "sts_profile.cli", "--help"]
    res = subprocess.run(exe, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout


@pytest.mark.parametrize("cli, args, message", [
    ("sts_profile.cli", ["analyze"], "error: Missing argument 'ckpt_dir'; see {prog} analyze --help"),
    ("sts_profile.cli", ["nope"], "error: No such command 'nope'; see {prog} --help"),
    ("sts_train.cli", ["evaluate", "m", "--limit", "1.5"], "error: Invalid value for '--limit': "),
    ("sts_train.cli", ["plan", "missing.yaml", "--layers", "2", "--steps", "4"], "error: missing.yaml: "),
])
def test_usage_errors_are_one_line(cli, args, message):
    """The console scripts (pyproject's [project.scripts]) print a usage error as one line, exit 2."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert f"{cli}:run" in scripts.values()
    res = subprocess.run([sys.executable, "-m", cli, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(prog=f"python -m {cli}")), res.stderr


def test_no_arguments_print_the_help():
    res = subprocess.run([sys.executable, "-m", "sts_profile.cli"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Usage" in res.stdout and "analyze" in res.stdout and res.stderr == ""


def test_pad_token_id_falls_back_to_eos_then_refuses():
    from sts_train.factory import build_tokenizer
    from sts_train.modelio import pad_token_id

    tok = build_tokenizer(512)
    assert pad_token_id(tok) == tok.convert_tokens_to_ids("<pad>") == 0
    tok.pad_token = None  # a user tokenizer without a pad token pads with its eos token
    assert pad_token_id(tok) == tok.convert_tokens_to_ids("</s>") == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ModelError, match="the tokenizer has no pad and no eos token; set pad_token"):
        pad_token_id(tok)
