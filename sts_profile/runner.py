"""The per-checkpoint work of ``sts-profile analyze``: check inputs, measure, cache, gather.

:func:`prepare` checks every input before anything is written (checkpoints, weights, tokenizer,
calibration data) and collates the calibration batches once. :func:`checkpoint_result` then
measures one checkpoint (one model in memory) or returns its cached result. Results are plain
JSON-able dicts, so a cached and a fresh result give identical tables.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import statistics
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sts_profile import __version__
from sts_profile.discover import (
    RUN_CONFIG_FILE, Checkpoint, check_weights, discover_checkpoints, processor_folder, run_config,
)
from sts_train.clitools import warnings_as_lines
from sts_train.configtools import atomic_write_text
from sts_train.errors import DataError, StsError


def progress(msg: str) -> None:
    """A progress line on stderr; under torchrun every rank reports, prefixed with its rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
    print(prefix + msg, file=sys.stderr, flush=True)


@dataclass
class Plan:
    """Everything checked and prepared before the first checkpoint is measured."""

    config: object  # AnalyzeConfig
    checkpoints: list[Checkpoint]
    processor_dir: Path
    pad_token_id: int
    facts: dict  # num_layers, num_visual_tokens, dims, model_type, hidden_size
    batches: list[dict]  # collated on the CPU
    sample_ids: list[str]
    calibration: dict
    text_len: int
    notes: list[str] = field(default_factory=list)

    @cached_property
    def batches_digest(self) -> str:
        """:func:`batches_digest` of the calibration batches, hashed once per analysis."""
        return batches_digest(self.batches)


def _model_facts(folder: Path) -> dict:
    """Static model facts from ``config.json`` alone (the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from sts_train.adapters import model_parts
    from sts_train.flops import LayerDims
    from sts_train.modelio import read_model_type

    model_type = read_model_type(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=False)
    parts = model_parts(model)
    return {"model_type": model_type, "num_layers": parts.num_layers,
            "num_visual_tokens": parts.num_visual_tokens, "hidden_size": parts.hidden_size,
            "dims": LayerDims.of(parts).__dict__.copy()}


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return base / p


def calibration_source(config, checkpoints: list[Checkpoint]) -> tuple[Path, Path | None]:
    """``(json, images)``: the ``--data/--images`` flags, else the data of the run's ``sts_run.yaml``.

    The run folder itself is tried first, then the runs of the checkpoints from the last stage
    back (instruction data has the prompts that text-guided compression needs).

    Raises:
        DataError: no flag and no ``sts_run.yaml`` naming the data; the data it names is
            missing; ``--images`` without ``--data``.
    """
    if config.data_json is not None:
        return Path(config.data_json), None if config.images is None else Path(config.images)
    if config.images is not None:
        raise DataError(f"--images {config.images} without --data; pass the LLaVA JSON too (--data JSON)")
    root = Path(config.ckpt_dir)
    runs = [root, *dict.fromkeys(c.run for c in reversed(checkpoints))]
    for run in runs:
        path, data = run / RUN_CONFIG_FILE, run_config(run).get("data")
        if isinstance(data, dict) and isinstance(data.get("json"), str):
            images, json_path = data.get("images"), _resolve(data["json"], run)
            if not json_path.is_file():
                raise DataError(f"{path}: its data.json {data['json']!r} is not found (from {run} or the current"
                                " folder); pass the calibration data with --data JSON --images DIR")
            return json_path, None if not isinstance(images, str) else _resolve(images, run)
    raise DataError(f"{root}: no calibration data given and no {RUN_CONFIG_FILE} in the run names its "
                    "data; pass --data JSON --images DIR")


def prepare(config) -> Plan:
    """Discover the checkpoints and check every input; collate the calibration batches.

    Raises:
        ModelError: not a run, mixed architectures, a truncated or corrupt weight file, no
            tokenizer.
        DataError: no calibration data, bad data, or data without images.
    """
    from sts_train.data import LlavaCollator, LlavaDataset, load_llava_json
    from sts_train.modelio import load_processor, pad_token_id

    with warnings_as_lines() as notes:
        checkpoints = discover_checkpoints(config.ckpt_dir)
    for ckpt in checkpoints:
        check_weights(ckpt.path)
    facts = _model_facts(checkpoints[0].path)
    bad = [i for i in config.layers_for_attention or () if not 0 <= i < facts["num_layers"]]
    if bad:
        raise StsError(f"--attention-layers {bad[0]} is out of range: the model has {facts['num_layers']} "
                       f"decoder layers; pass indices 0..{facts['num_layers'] - 1}")
    proc_dir = processor_folder(checkpoints, Path(config.ckpt_dir))
    processor = load_processor(proc_dir)

    json_path, images = calibration_source(config, checkpoints)
    samples = load_llava_json(json_path, images)
    picked = sorted(random.Random(config.seed).sample(range(len(samples)), min(len(samples), config.num_samples)))
    if not any("image" in samples[i] for i in picked):
        raise DataError(f"{json_path}: the calibration data has no images (no sampled entry has an "
                        "'image' key); pass LLaVA data with images via --data/--images")
    dataset = LlavaDataset(json_path, images, processor, num_image_tokens=facts["num_visual_tokens"])
    pad_id = pad_token_id(processor.tokenizer)
    collate = LlavaCollator(pad_token_id=pad_id)
    items = [dataset[i] for i in picked]
    image_id = dataset.image_token_id
    batches = [collate(items[k:k + config.batch_size]) for k in range(0, len(items), config.batch_size)]
    # The cost model's text length is what the trainer pays for: rows run at the batch's padded
    # length, so take the mean over rows of (padded length - the row's visual tokens).
    text_len = round(statistics.mean(
        int(b["input_ids"].shape[1]) - int(n) for b in batches for n in (b["input_ids"] == image_id).sum(1)))
    calibration = {"data_json": str(json_path), "images": None if images is None else str(images),
                   "num_samples": len(items), "seed": config.seed,
                   "sample_ids": [it["id"] for it in items]}
    return Plan(config=config, checkpoints=checkpoints, processor_dir=proc_dir, pad_token_id=pad_id,
                facts=facts, batches=batches, sample_ids=[it["id"] for it in items],
                calibration=calibration, text_len=text_len, notes=notes)


def _device(config) -> str:
    if config.device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return config.device


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _to_device(batch: dict, device: str, dtype) -> dict:
    out = {}
    for key, value in batch.items():
        value = value.to(device)
        out[key] = value.to(dtype) if key == "pixel_values" else value
    return out


# What a cached checkpoint result holds; bump it when the measurements change (2: the token
# probes' compress_loss_delta_se; 3: the layer probes' skip_loss_delta_se), so a rerun into an
# old output folder measures again.
RESULTS_FORMAT = 3


def batches_digest(batches: list[dict]) -> str:
    """Hash of the collated calibration batches: every tensor's name, dtype, shape and bytes
    (the same sample ids from regenerated data, or another tokenizer, give another digest)."""
    import torch

    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = batch[name]
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(plan: Plan, ckpt: Checkpoint, with_cost: bool) -> str:
    """Hash of what a checkpoint's result depends on: its files, the settings, the samples (and
    the collated batches themselves) and the format of the measurements."""
    files = sorted(p for p in ckpt.path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = {"version": __version__, "format": RESULTS_FORMAT, "path": str(ckpt.path.resolve()), "files": stats,
               "settings": plan.config.measurement_key(), "samples": plan.sample_ids,
               "batches": plan.batches_digest,
               "cost": with_cost, "name": ckpt.name, "step": ckpt.step, "stage": ckpt.stage}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: Path, ckpt: Checkpoint) -> Path:
    return cache_dir / (ckpt.name.replace("/", "__") + ".json")


def _fingerprint(parts) -> str:
    """Hash of the first elements of every decoder parameter: equal across checkpoints iff the
    LLM did not train (cheap enough for 7B models)."""
    digest = hashlib.sha256()
    for name, param in parts.decoder_layers.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def measure_checkpoint(plan: Plan, index: int) -> dict:
    """Load one checkpoint, run the passive collection and the probes over every batch (and the
    cost table for the first checkpoint); returns the JSON-able result."""
    import torch

    from sts_profile.collect import PassiveCollector
    from sts_profile.cost import measure_cost
    from sts_profile.probes import ProbeRunner
    from sts_train.adapters import model_parts
    from sts_train.modelio import load_model

    config, ckpt = plan.config, plan.checkpoints[index]
    total = len(plan.checkpoints)
    label = f"[{index + 1}/{total}] {ckpt.name} (stage {ckpt.stage}, step {ckpt.step})"
    progress(f"{label}: loading")
    device, dtype = _device(config), _torch_dtype(config.dtype)
    model = load_model(ckpt.path, dtype=dtype, device=device).eval()
    parts = model_parts(model)
    batches = [_to_device(b, device, dtype) for b in plan.batches]
    collector = PassiveCollector(model, parts, attention_layers=config.layers_for_attention)
    probes = ProbeRunner(model, parts, plan.pad_token_id, seed=config.seed) if config.probes else None
    out = None
    try:
        for j, batch in enumerate(batches):
            progress(f"{label}: batch {j + 1}/{len(batches)}")
            out = collector.forward(batch)
            if probes is not None:
                probes.run_batch(batch, out.logits, j)
    finally:
        collector.remove()
        if probes is not None:
            probes.remove()
    result = {
        "checkpoint": ckpt.name, "step": ckpt.step, "stage": ckpt.stage, "path": str(ckpt.path),
        "layers": collector.layer_rows() + (probes.layer_rows() if probes else []),
        "tokens": collector.token_rows() + (probes.token_rows() if probes else []),
        "llm_fingerprint": _fingerprint(parts), "notes": probes.notes if probes else [],
        "cost": None,
    }
    if index == 0:
        progress(f"{label}: timing")
        result["cost"] = measure_cost(model, parts, batches[:2])
    del model, parts, batches, collector, probes, out
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def checkpoint_result(plan: Plan, index: int, cache_dir: Path) -> dict:
    """The cached result of checkpoint ``index`` when its key matches, else a fresh one (cached)."""
    ckpt = plan.checkpoints[index]
    key = cache_key(plan, ckpt, with_cost=index == 0)
    path = cache_path(cache_dir, ckpt)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = {}
        if cached.get("key") == key:
            progress(f"[{index + 1}/{len(plan.checkpoints)}] {ckpt.name}: cached result")
            return cached["result"]
    result = measure_checkpoint(plan, index)
    text = json.dumps({"key": key, "result": result})
    atomic_write_text(path, text + "\n")
    return json.loads(text)["result"]  # the same JSON round trip as a cached result


def trace(plan: Plan, trace_dir: Path) -> Path:
    """One bounded profiler trace of the first checkpoint's forward (one architecture per run)."""
    import shutil

    from sts_profile.cost import write_trace
    from sts_train.modelio import load_model

    config, ckpt = plan.config, plan.checkpoints[0]
    progress(f"trace: {ckpt.name}")
    device, dtype = _device(config), _torch_dtype(config.dtype)
    model = load_model(ckpt.path, dtype=dtype, device=device).eval()
    if trace_dir.exists():
        shutil.rmtree(trace_dir)
    worker = f"{plan.facts['model_type']}-L{plan.facts['num_layers']}-H{plan.facts['hidden_size']}"
    path = write_trace(model, _to_device(plan.batches[0], device, dtype), trace_dir, worker)
    del model
    gc.collect()
    return path


def init_distributed() -> tuple[int, int, bool]:
    """``(rank, world_size, created)``; joins a gloo group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")
    return rank, world, True


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(results: dict[int, dict], world: int) -> dict[int, dict]:
    """Merge every rank's ``{checkpoint index: result}`` on rank 0 (others get their own back)."""
    if world <= 1:
        return results
    import torch.distributed as dist

    rank = dist.get_rank()
    bucket = [None] * world if rank == 0 else None
    dist.gather_object(results, bucket, dst=0)
    if rank != 0:
        return results
    merged: dict[int, dict] = {}
    for part in bucket:
        merged.update(part)
    return merged


def finish_distributed(created: bool) -> None:
    if created:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
