"""Loading models and processors from local folders (or the factory), safely.

Never executes code from a folder: no ``trust_remote_code``, weights via safetensors (or
``torch.load(weights_only=True)`` inside transformers for ``.bin``), and nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sts_train.adapters import ADAPTERS
from sts_train.errors import ModelError, StsError


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The ``checkpoint-N`` model folder of ``run_dir`` with the largest N (None if none)."""
    found = [p.parent for p in Path(run_dir).glob("checkpoint-*/config.json")
             if p.parent.name.rsplit("-", 1)[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]), default=None)


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token.

    Raises:
        ModelError: the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError("the tokenizer has no pad and no eos token; set pad_token in the model folder's"
                         " tokenizer_config.json")
    return int(pad)


def read_model_type(folder: str | Path) -> str:
    """``model_type`` from a folder's ``config.json``.

    Raises:
        ModelError: not a folder, no ``config.json``, broken JSON, or an unsupported model type.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a model folder (no such directory); pass a folder written by save_pretrained")
    config = folder / "config.json"
    if not config.is_file():
        latest = latest_checkpoint(folder)
        if latest is not None:
            raise ModelError(f"{folder}: is a training run, not a model folder; pass one of its checkpoints"
                             f" (latest: {latest})")
        raise ModelError(f"{folder}: not a model folder (no config.json); pass a folder written by save_pretrained")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{config}: not valid JSON; re-save the model with save_pretrained") from None
    if not isinstance(data, dict):
        raise ModelError(f"{config}: holds a {type(data).__name__}, not a config mapping; re-save the model"
                         " with save_pretrained")
    model_type = data.get("model_type")
    if model_type not in ADAPTERS:
        raise ModelError(
            f"{folder}: model type {model_type!r} is not supported; use a LLaVA-style model "
            f"({', '.join(ADAPTERS)})"
        )
    return model_type


def check_device(device: str) -> None:
    """Refuse a ``--device`` that is not cpu, cuda[:N], mps or xpu, or names a CUDA device that is not visible.

    Raises:
        StsError: one line naming the device and the fix.
    """
    if not isinstance(device, str) or not device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"):
        raise StsError(f"--device {device!r} is not known; use cpu, cuda or cuda:N")
    kind, _, index = device.partition(":")
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise StsError(f"--device {device}: no CUDA device is visible; use --device cpu")
        if index and (not index.isdigit() or int(index) >= count):
            raise StsError(f"--device {device}: {count} CUDA device(s) visible; pass cuda:0 to"
                           f" cuda:{count - 1}")


def _check_size_fits(folder: Path, fix: str) -> None:
    """Refuse a config.json that describes far more parameters than the safetensors weights
    hold (e.g. one that lost its sizes, so that transformers' defaults build a 7B model) before
    the model is built; counted on the meta device and from the weight files' headers."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    files = sorted(folder.glob("*.safetensors"))
    try:
        held = 0
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                held += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            wanted = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    except Exception:  # a damaged file or config: from_pretrained reports it
        return
    if files and wanted > 4 * held:  # 4x: room for weights stored packed (4-bit) or partly tied
        raise ModelError(f"{folder}: config.json describes {wanted:,} parameters but the weights hold {held:,};"
                         f" {fix}")


def load_model(folder: str | Path, *, dtype=None, device=None):
    """Load a supported model folder with plain transformers Auto classes.

    Every weight must fit ``config.json``: transformers would otherwise start the parameters the
    weights lack from random values (and print a load report), which no analysis or training
    should build on.

    Raises:
        ModelError: see :func:`read_model_type`; missing, truncated or corrupt weights; weights
            that do not fit ``config.json`` (other shapes, missing or extra parameters).
    """
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    read_model_type(folder)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder}: no weight file (model.safetensors); the checkpoint is incomplete")
    fix = "fix config.json or re-save the model with save_pretrained"
    _check_size_fits(folder, fix)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report; the error below names the first key
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=dtype, trust_remote_code=False, local_files_only=True, output_loading_info=True
        )
    except Exception as exc:  # transformers raises many types for a damaged file
        if "ignore_mismatched_sizes" in str(exc):
            raise ModelError(f"{folder}: the weights have other shapes than config.json says; {fix}") from None
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{folder}: weights could not be loaded ({reason}); the file may be truncated or corrupt, re-save it"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for key, what in (("missing_keys", "config.json has parameters the weights lack"),
                      ("unexpected_keys", "the weights hold parameters config.json has no place for")):
        names = sorted(info.get(key) or ())
        if names:
            raise ModelError(f"{folder}: {what} ({len(names)}, e.g. {names[0]}); {fix}")
    if device is not None:
        model.to(device)
    return model


def load_processor(folder: str | Path):
    """Load the processor (image processor + tokenizer) saved next to a model.

    Raises:
        ModelError: no processor or tokenizer files in the folder.
    """
    from transformers import AutoProcessor

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelError(
            f"{folder}: no tokenizer in the model folder; save the processor there with processor.save_pretrained(folder)"
        )
    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{folder}: processor could not be loaded ({reason}); save it with processor.save_pretrained(folder)"
        ) from None


def load_model_and_processor(path: str | None, size: str | None, seed: int = 0):
    """A model folder, or a fresh factory model of ``size``; returns ``(model, processor)``."""
    if path is not None:
        return load_model(path), load_processor(path)
    from sts_train.factory import build_model, build_processor

    return build_model(size, seed=seed), build_processor(size)
