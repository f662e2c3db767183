"""Train-step speed of the sparse modes against dense, with the FLOPs-ideal speedup beside it.

    python bench/train_speed.py [--steps N --warmup W --batch-size 4 --threads 2 --json out.json]

Demo-size LLaVA (8 decoder layers, hidden 256, 576 visual tokens at 336 px) on real shapes
data (instruction split, image samples only, the real collator). One train step is what the
instruction stage runs: forward + backward + grad clip (1.0) + fused AdamW, LLM + projector
trainable, vision tower frozen. Modes:

    dense    all 576 visual tokens, all layers
    tokens   uniform pooling to keep_ratio 0.25 (24x24 -> 12x12 grid)
    merged   merging to the same 144 tokens (``merge_vs_pooling``: its step time over tokens')
    layers   layers {1, 3, 5, 6} skipped (half; never the first or last)
    both     tokens + layers

Each round runs every mode once on the same batch, in an order rotated per round (the machine
is shared and noisy, so modes are interleaved A/B). Warm-up rounds are dropped. Reported per
mode: median step time, speedup = median over rounds of dense_time / mode_time, the analytic
FLOPs speedup (sts_train.flops, as the trainer accounts: LLM part only; and the whole step with
the frozen vision tower's forward and the projector added) and realized_fraction =
speedup / flops_speedup; and each phase's median time (forward, backward, optimizer = clip +
AdamW + zero_grad), with the speedup and realized fraction of forward + backward alone: the
optimizer's time is the same in every mode and in no FLOPs count. Peak memory is not
measured: ru_maxrss is per process, and all modes share this one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchio import add_output_options, check_output_options, emit

MODES = {  # name -> (token keep ratio, skipped decoder layers)
    "dense": (1.0, ()),
    "tokens": (0.25, ()),
    "layers": (1.0, (1, 3, 5, 6)),
    "both": (0.25, (1, 3, 5, 6)),
    "merged": (0.25, ()),
}
TOKEN_METHOD = {"merged": "merge"}  # the rest pool (uniform); merged keeps as many tokens as tokens
TARGET_SPEEDUP = 2.5  # "both" vs dense, per step
TARGET_REALIZED = 0.85  # of the FLOPs-ideal speedup, "both"


def vision_flops_fwd(vision_config, images: int) -> float:
    """Forward FLOPs of the CLIP tower (patch conv + every encoder layer; all of them run even
    though LLaVA reads layer -2). Per layer on T = patches + 1 tokens, width D, MLP width I:
    4 * 2*T*D*D (q, k, v, o) + 2 * 2*T*T*D (scores, weighted sum) + 2 * 2*T*D*I (fc1, fc2)."""
    c = vision_config
    patches = (c.image_size // c.patch_size) ** 2
    t, d, i = patches + 1, c.hidden_size, c.intermediate_size
    conv = 2 * patches * (c.num_channels * c.patch_size**2) * d
    layer = 4 * 2 * t * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * i
    return images * (conv + c.num_hidden_layers * layer)


def projector_flops_train(parts, vision_width: int, images: int) -> float:
    """Forward + backward FLOPs of the two-layer MLP projector (trained: backward = 2x forward,
    the trainer's convention; it runs on all visual tokens, before compression)."""
    h = parts.hidden_size
    fwd = 2 * parts.num_visual_tokens * (vision_width * h + h * h) * images
    return 3 * fwd


def load_batches(folder: Path, processor, parts, batch_size: int,
                 count: int) -> tuple[list[dict], float]:
    """``count`` collated batches of image samples from a freshly generated shapes set, and the
    median seconds to read + collate one batch (the same in every mode, so not in the step
    time; a Trainer with ``dataloader_num_workers=0`` pays it inside each step)."""
    from sts_train.data import LlavaCollator, LlavaDataset
    from sts_train.shapes import generate_shapes

    needed = batch_size * count
    paths = generate_shapes(folder / "shapes", n_alignment=0, n_instruction=needed + needed // 19 + 1,
                            n_eval=0, image_size_px=336, seed=0)  # every 20th sample is text-only
    data = LlavaDataset(paths["instruction"], None, processor, num_image_tokens=parts.num_visual_tokens)
    indices = [i for i in range(len(data)) if "image" in data.samples[i]]
    collate = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)
    batches, seconds = [], []
    for k in range(count):
        start = time.perf_counter()
        batches.append(collate([data[i] for i in indices[k * batch_size : (k + 1) * batch_size]]))
        seconds.append(time.perf_counter() - start)
    return batches, statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured rounds (each runs every mode once)")
    ap.add_argument("--warmup", type=int, default=2, help="rounds run first and discarded")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    add_output_options(ap)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 1:
        ap.error("--steps, --batch-size and --threads must be >= 1, --warmup >= 0")
    check_output_options(ap, args)

    import torch
    import transformers

    from sts_train.adapters import model_parts
    from sts_train.compress import TokenCompressor
    from sts_train.factory import build_model, build_processor
    from sts_train.flops import LayerDims, llm_step_flops
    from sts_train.skipper import LayerSkipper

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build_model("demo", seed=0), build_processor("demo")
    parts = model_parts(model)
    model.config.use_cache = model.config.text_config.use_cache = False
    # Instruction stage: LLM (embeddings and head included) + projector train, vision frozen.
    model.requires_grad_(False)
    parts.language_model.requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)
    parts.projector.requires_grad_(True)
    model.train()  # the compressor and the skipper act in training mode only
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)  # Trainer default: adamw_torch_fused
    compressor = TokenCompressor(model, parts, processor.tokenizer.pad_token_id)
    skipper = LayerSkipper(parts.decoder_layers)
    dims, vision = LayerDims.of(parts), model.config.vision_config

    with tempfile.TemporaryDirectory(prefix="sts-bench-") as tmp:
        batches, data_time_s = load_batches(Path(tmp), processor, parts, args.batch_size, count=4)

    def step(batch: dict, mode: str) -> tuple[float, float, float, int, dict]:
        """One timed train step; returns (seconds, LLM FLOPs, whole-step FLOPs, LLM seq len,
        seconds per phase: forward, backward, optimizer = clip + AdamW step + zero_grad)."""
        keep_ratio, skipped = MODES[mode]
        compressor.set(TOKEN_METHOD.get(mode, "uniform"), keep_ratio)
        skipper.set_skipped(skipped)
        start = time.perf_counter()
        loss = model(**batch).loss
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        seconds = end - start
        phases = {"forward": forward_end - start, "backward": backward_end - forward_end,
                  "optimizer": end - backward_end}
        if not torch.isfinite(loss):
            raise RuntimeError(f"mode {mode}: loss is {loss.item()}")
        rows, images = batch["input_ids"].shape[0], batch["pixel_values"].shape[0]
        # As SparsityController.account: every row runs at the padded length the LLM saw.
        llm = llm_step_flops([compressor.last_seq_len] * rows, dims, num_layers=parts.num_layers,
                             skipped_layers=len(skipped), llm_trainable=True)
        fixed = (vision_flops_fwd(vision, images)
                 + projector_flops_train(parts, vision.hidden_size, images))
        return seconds, llm, llm + fixed, compressor.last_seq_len, phases

    names = list(MODES)
    load_start = os.getloadavg()[0]
    rounds: list[dict[str, tuple]] = []
    for r in range(args.warmup + args.steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        batch = batches[r % len(batches)]
        result = {mode: step(batch, mode) for mode in order}
        if r >= args.warmup:
            rounds.append(result)
        tag = "warmup" if r < args.warmup else "round"
        print(f"{tag} {r}: " + "  ".join(f"{m} {result[m][0]:.3f}s" for m in names), file=sys.stderr)

    def median_over_rounds(fn) -> float:
        return statistics.median(fn(rd) for rd in rounds)

    def compute_s(result: tuple) -> float:
        """Forward + backward: the work the FLOPs count. The optimizer's time is the same in
        every mode (same trainable parameters), so it caps the whole step's speedup."""
        return result[4]["forward"] + result[4]["backward"]

    best = {mode: min(rd[mode][0] for rd in rounds) for mode in names}
    modes_out = {}
    for mode in names:
        ratios = [rd["dense"][0] / rd[mode][0] for rd in rounds]
        speedup = statistics.median(ratios)
        flops_llm = median_over_rounds(lambda rd: rd["dense"][1] / rd[mode][1])
        flops_whole = median_over_rounds(lambda rd: rd["dense"][2] / rd[mode][2])
        speedup_compute = median_over_rounds(lambda rd: compute_s(rd["dense"]) / compute_s(rd[mode]))
        modes_out[mode] = {
            "token_method": TOKEN_METHOD.get(mode, "uniform"),
            "keep_ratio": MODES[mode][0],
            "skipped_layers": list(MODES[mode][1]),
            "llm_seq_len_median": median_over_rounds(lambda rd: rd[mode][3]),
            "median_step_time_s": median_over_rounds(lambda rd: rd[mode][0]),
            "speedup_vs_dense": speedup,
            "speedup_min_max_over_rounds": [min(ratios), max(ratios)],
            # Least-contended estimate: a loaded machine only ever adds time to a step.
            "min_step_time_s": best[mode],
            "speedup_of_min_times": best["dense"] / best[mode],
            "flops_speedup": flops_llm,
            "realized_fraction": speedup / flops_llm,
            "flops_speedup_whole_step": flops_whole,
            "realized_fraction_whole_step": speedup / flops_whole,
            "phase_median_s": {k: median_over_rounds(lambda rd: rd[mode][4][k])
                               for k in ("forward", "backward", "optimizer")},
            "speedup_forward_backward": speedup_compute,
            "realized_fraction_forward_backward_whole_step": speedup_compute / flops_whole,
            "step_flops_llm_median": median_over_rounds(lambda rd: rd[mode][1]),
            # Whole-step FLOPs per second: equal across modes means no mode wastes time.
            "throughput_gflop_s": median_over_rounds(lambda rd: rd[mode][2] / rd[mode][0] / 1e9),
        }
    both = modes_out["both"]
    text_tokens = [int(b["attention_mask"].sum()) // b["input_ids"].shape[0] - parts.num_visual_tokens
                   for b in batches]
    out = {
        "modes": modes_out,
        "targets": {
            "both_speedup_ge": TARGET_SPEEDUP,
            "both_speedup": both["speedup_vs_dense"],
            "speedup_met": both["speedup_vs_dense"] >= TARGET_SPEEDUP,
            "realized_fraction_ge": TARGET_REALIZED,
            "realized_met_llm_flops": both["realized_fraction"] >= TARGET_REALIZED,
            "realized_met_whole_step_flops": both["realized_fraction_whole_step"] >= TARGET_REALIZED,
        },
        # merging against pooling to the same kept tokens: median over rounds of the time ratio
        "merge_vs_pooling": statistics.median(rd["merged"][0] / rd["tokens"][0] for rd in rounds),
        "flops_note": (
            "flops_speedup / realized_fraction: LLM part only, as SparsityController.account "
            "(vision tower not counted). *_whole_step: adds the frozen vision tower's forward "
            "and the projector's forward + backward (analytic, same in every mode). "
            "*_forward_backward: the step without the optimizer (clip + AdamW + zero_grad), whose "
            "time is the same in every mode and is not in any FLOPs count."
        ),
        "config": {
            "model": "demo", "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0],
            "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
            "batches_cycled": len(batches), "visual_tokens": parts.num_visual_tokens,
            "data_time_s_per_batch_excluded": data_time_s,
            "text_tokens_per_sample_mean": statistics.mean(text_tokens),
            "dense_seq_len_padded": [b["input_ids"].shape[1] for b in batches],
            "decoder_layers": parts.num_layers,
            "optimizer": "AdamW(fused, lr 1e-5), clip_grad_norm 1.0",
            "trainable": "LLM + projector; vision tower frozen",
            "peak_memory": "not measured (ru_maxrss is per process; all modes share one)",
        },
    }
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
