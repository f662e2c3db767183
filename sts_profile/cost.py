"""Per-layer forward cost: analytic FLOPs, measured time, and an optional profiler trace.

FLOPs (multiply-add = 2) are analytic, because ``FlopCounterMode`` does not count the CPU SDPA
kernel (DESIGN.md). For a batch of ``B`` rows padded to ``S`` tokens:

- decoder layer: :func:`sts_train.flops.layer_flops_fwd` (projections, full ``S x S``
  attention, SwiGLU MLP);
- lm_head: ``2 * B * S * H * V``;
- vision tower: ``2 * rows * in * out`` for every ``nn.Linear`` / patch-embedding call it makes
  (counted by hooks) plus attention ``4 * S_v**2 * H_v`` per layer and image;
- projector: ``2 * rows * in * out`` for its ``nn.Linear`` calls.

Time: ``time.perf_counter`` between a module's forward pre-hook and forward hook (with a
device synchronize on accelerators), median over repeats and batches. The ``total`` row times
the whole forward.

The trace is one bounded ``torch.profiler`` run (1 warm-up step, 1 active step) written by
``tensorboard_trace_handler`` as ``<worker>.<timestamp>.pt.trace.json.gz``: the
torch-tb-profiler plugin loads it, and Perfetto / chrome://tracing open it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from sts_train.adapters import has_class_token
from sts_train.flops import LayerDims, layer_flops_fwd, lm_head_flops_fwd

COST_COLUMNS = ("layer", "component", "seq_len", "flops_fwd", "time_fwd_s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Forward timers on named modules plus linear-layer FLOP counters."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, count_in: dict[str, nn.Module]):
        self.device = device
        self.times: dict[str, float] = {}
        self.linear_flops: dict[str, float] = {name: 0.0 for name in count_in}
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        for name, root in count_in.items():
            for sub in root.modules():
                if isinstance(sub, (nn.Linear, nn.Conv2d)):
                    self._handles.append(sub.register_forward_hook(self._count(name)))

    def _pre(self, name):
        def hook(module, args):
            _sync(self.device)
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, args, output):
            _sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._start[name]
        return hook

    def _count(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(module, nn.Linear):
                self.linear_flops[name] += 2.0 * out.numel() * module.in_features
            else:  # Conv2d: every output element is a dot product over in_ch * kh * kw
                kh, kw = module.kernel_size
                self.linear_flops[name] += 2.0 * out.numel() * module.in_channels * kh * kw / module.groups
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _vision_attention_flops(model, vision_tower, num_images: int) -> float:
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + has_class_token(vision_tower)
    return 4.0 * tokens * tokens * vision.hidden_size * vision.num_hidden_layers * num_images


def measure_cost(model, parts, batches: list[dict], *, repeats: int = 3) -> list[dict]:
    """Forward FLOPs and median forward time per decoder layer and per model part.

    Args:
        model: the model (eval mode) on its device.
        parts: its :class:`sts_train.adapters.ModelParts`.
        batches: collated batches on the model's device (a few are enough).
        repeats: timed forwards per batch after one untimed warm-up forward.

    Returns:
        Rows with :data:`COST_COLUMNS`: ``layer`` 0..L-1 with component ``decoder_layer``, and
        ``layer = -1`` rows for ``vision_tower``, ``projector``, ``lm_head`` and ``total``.
        ``seq_len`` is the padded length of the median batch; FLOPs are per batch. The vision
        tower's FLOPs are its ``nn.Linear`` and convolution calls plus analytic self-attention
        (a class token counted where the tower has one); work done through a module's weights
        without calling it (``nn.MultiheadAttention``, e.g. SigLIP's pooling head, which LLaVA
        computes and ignores) is not counted.
    """
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    modules = {f"layer{i}": layer for i, layer in enumerate(parts.decoder_layers)}
    modules.update({"vision_tower": parts.vision_tower, "projector": parts.projector, "lm_head": lm_head})
    dims = LayerDims.of(parts)
    samples: dict[str, list[float]] = {name: [] for name in [*modules, "total"]}
    flops: dict[str, list[float]] = {name: [] for name in samples}
    seq_lens = []
    for batch in batches:
        with torch.no_grad():
            model(**batch)  # warm-up: allocator and kernel caches
        rows, seq_len = batch["input_ids"].shape
        images = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        for _ in range(repeats):
            timer = _Timer(modules, device, {"vision_tower": parts.vision_tower, "projector": parts.projector})
            try:
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    model(**batch)
                _sync(device)
                total = time.perf_counter() - start
            finally:
                timer.remove()
            for name in modules:
                samples[name].append(timer.times.get(name, 0.0))
            samples["total"].append(total)
            layer = layer_flops_fwd(seq_len, dims, batch=rows)["total"]
            part = {"vision_tower": timer.linear_flops["vision_tower"] + _vision_attention_flops(model, parts.vision_tower, images),
                    "projector": timer.linear_flops["projector"],
                    "lm_head": lm_head_flops_fwd(seq_len, dims, batch=rows)}
            for i in range(parts.num_layers):
                flops[f"layer{i}"].append(layer)
            for name, value in part.items():
                flops[name].append(value)
            flops["total"].append(layer * parts.num_layers + sum(part.values()))
            seq_lens.append(seq_len)
    median_len = int(statistics.median_low(seq_lens))
    out = []
    for name in samples:
        layer, component = (int(name[5:]), "decoder_layer") if name.startswith("layer") else (-1, name)
        out.append({"layer": layer, "component": component, "seq_len": median_len,
                    "flops_fwd": float(statistics.median(flops[name])),
                    "time_fwd_s": float(statistics.median(samples[name]))})
    return out


def write_trace(model, batch: dict, trace_dir: str | Path, worker_name: str) -> Path:
    """Profile two forwards (one warm-up, one recorded) into ``trace_dir``.

    Args:
        worker_name: the file name's worker part (no dots), e.g. ``llava-L32-H4096``.

    Returns:
        The written ``<worker_name>.<timestamp>.pt.trace.json.gz``.
    """
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    trace_dir = Path(trace_dir)
    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_dir.glob("*.pt.trace.json.gz"))
    activities = [ProfilerActivity.CPU]
    if next(model.parameters()).device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1),
                 on_trace_ready=tensorboard_trace_handler(str(trace_dir), worker_name=worker_name, use_gzip=True),
                 record_shapes=True) as prof:
        for _ in range(2):
            with torch.no_grad():
                model(**batch)
            prof.step()
    written = sorted(set(trace_dir.glob("*.pt.trace.json.gz")) - before)
    if not written:
        raise RuntimeError(f"torch.profiler wrote no trace into {trace_dir}")
    return written[-1]
