"""Stage-aware sparse training on the Hugging Face Trainer.

    sts-train train run.yaml                     # or: python -m sts_train.cli train run.yaml

One plan per optimizer step, a pure function of (schedule, global step, seed, layer count):
every rank computes the same plan without talking, and a resumed run recomputes the same
plans. The plan sets the :class:`~sts_train.compress.TokenCompressor` (keep ratio, method) and
the :class:`~sts_train.skipper.LayerSkipper` (skipped layers) before the step's first
micro-batch; both act in training mode only, so evaluation and generation run dense.

Outputs in ``output_dir``: ``checkpoint-N/`` (standard HF layout, processor included),
``sts_run.yaml`` (the resolved config), ``sts_log.jsonl`` (one line per optimizer step),
``sts_summary.json`` and TensorBoard events under ``runs/``. Its ``eval_loss`` (also logged at
``eval_steps``) is the mean over every supervised token of the held-out split, as
``sts-train evaluate`` computes it, not the HF Trainer's mean of per-batch means.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sts_train.adapters import ModelParts, model_parts
from sts_train.compress import TokenCompressor
from sts_train.config import STAGES, RunConfig
from sts_train.configtools import atomic_write_text, check_parents, check_replaceable, dump_yaml
from sts_train.errors import DataError, ScheduleError, StsError
from sts_train.evaluate import answer_loss_rows
from sts_train.flops import LayerDims, llm_step_flops
from sts_train.schedule import Schedule, load_schedule, sample_skipped_layers
from sts_train.skipper import LayerSkipper

RUN_CONFIG_FILE = "sts_run.yaml"
LOG_FILE = "sts_log.jsonl"
SUMMARY_FILE = "sts_summary.json"


@dataclass
class StepStats:
    """What one optimizer step ran (summed over its micro-batches)."""

    step: int
    stage: str | None
    method: str | None
    keep_ratio: float
    skipped_layers: tuple[int, ...]
    kept_visual_tokens: int = 0
    dense_visual_tokens: int = 0
    flops: float = 0.0
    dense_flops: float = 0.0
    step_time_s: float = 0.0

    def as_json(self) -> dict:
        d = dict(vars(self))
        d["skipped_layers"] = list(self.skipped_layers)
        return d


@dataclass
class SparsityController:
    """Turns (schedule, step) into settings of the compressor and skipper."""

    schedule: Schedule | None
    stage_name: str | None
    seed: int
    parts: ModelParts
    compressor: TokenCompressor
    skipper: LayerSkipper
    llm_trainable: bool
    rank: int = 0  # random token dropping differs per rank; layer skipping never does
    total_steps: int = 0
    current: StepStats | None = None
    history: list[StepStats] = field(default_factory=list)

    def __post_init__(self):
        self.dims = LayerDims.of(self.parts)
        # A run trains the stage it names from that stage's start: its step 0 is the start of
        # the stage's step range (a range sets the stage's length, not when this run began).
        steps = None if self.schedule is None or self.stage_name is None else \
            self.schedule.stage_named(self.stage_name).steps
        self.step_offset = 0 if steps is None else steps.start

    def plan(self, step: int):
        if self.schedule is None:
            return None
        return self.schedule.plan(
            step + self.step_offset, num_layers=self.parts.num_layers, stage=self.stage_name,
            total_steps=max(self.total_steps, 1),
        )

    def begin_step(self, step: int) -> StepStats:
        plan = self.plan(step)
        if plan is None:
            method, keep, skipped, stage = None, 1.0, (), self.stage_name
        else:
            method, keep, stage = plan.method, plan.keep_ratio, plan.stage
            skipped = sample_skipped_layers(plan.skip_prob, seed=self.seed, step=step)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + self.rank * 1_000_000_007)
        self.compressor.set(method, keep, generator)
        self.skipper.set_skipped(skipped)
        self.current = StepStats(step, stage, method if keep < 1.0 else None, keep, tuple(skipped))
        return self.current

    def account(self, inputs: dict) -> None:
        """Add one micro-batch's tokens and FLOPs (actual and dense) to the current step."""
        if self.current is None:
            return
        rows, dense_len = inputs["input_ids"].shape
        pixel_values = inputs.get("pixel_values")
        dense_visual = 0 if pixel_values is None else pixel_values.shape[0] * self.parts.num_visual_tokens
        n_skipped = len(self.current.skipped_layers)
        self.current.kept_visual_tokens += self.compressor.last_kept_visual_tokens
        self.current.dense_visual_tokens += dense_visual
        self.current.flops += llm_step_flops(
            [self.compressor.last_seq_len] * rows, self.dims, num_layers=self.parts.num_layers,
            skipped_layers=n_skipped, llm_trainable=self.llm_trainable,
        )
        self.current.dense_flops += llm_step_flops(
            [dense_len] * rows, self.dims, num_layers=self.parts.num_layers, llm_trainable=self.llm_trainable,
        )


class SparsityCallback(TrainerCallback):
    """Sets the plan at each optimizer step's start; times and logs the step at its end."""

    def __init__(self, controller: SparsityController, output_dir: Path, write: bool):
        self.controller, self.output_dir, self.write = controller, output_dir, write
        self._t0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.controller.total_steps = state.max_steps
        log = self.output_dir / LOG_FILE
        if self.write and log.is_file():
            # the log keeps the steps before this session's first (none for a fresh run; on a
            # resume the steps after the checkpoint run again, so their old lines go)
            kept = [line for line in log.read_text().splitlines(True)
                    if line.strip() and json.loads(line)["step"] < state.global_step]
            atomic_write_text(log, "".join(kept), overwrite=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.begin_step(state.global_step)
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.controller.current
        if stats is None:
            return
        stats.step_time_s = time.perf_counter() - self._t0
        self.controller.history.append(stats)
        if self.write:
            with open(self.output_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(stats.as_json()) + "\n")


class StsTrainer(Trainer):
    """HF Trainer that accounts the sparse work of each micro-batch and logs it."""

    sts: SparsityController

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counting = self._eval_rows is not None and not model.training
        labels = inputs.get("labels")  # before HF may pop them (label smoothing)
        result = super().compute_loss(model, inputs, return_outputs or counting, num_items_in_batch)
        if model.training:
            self.sts.account(inputs)
        elif counting and labels is not None:
            loss, outputs = result
            # per row from the logits (HF's loss here is scaled by the token count of all ranks),
            # on the labels of the sequence the LLM ran (the compressor's forward records them)
            llm_labels = getattr(outputs, "llm_labels", None)
            rows = answer_loss_rows(outputs.logits, labels if llm_labels is None else llm_labels)
            self._eval_rows.append(self.accelerator.gather_for_metrics(rows))  # drops DDP's padding rows
            result = result if return_outputs else loss
        return result

    _eval_rows: list[torch.Tensor] | None = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The HF loop, with the loss over every supervised token of the split (what
        ``sts-train evaluate`` reports) instead of the HF Trainer's mean of per-batch means:
        summed per sample from the logits, gathered over ranks without DDP's padding samples."""
        self._eval_rows = []
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            rows = torch.cat(self._eval_rows) if self._eval_rows else None
        finally:
            self._eval_rows = None
        if rows is not None and rows[:, 1].sum() > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = float(rows[:, 0].sum() / rows[:, 1].sum())
        return output

    def log(self, logs: dict, start_time: float | None = None) -> None:
        recent = [s for s in self.sts.history if s.step >= self._sts_logged_upto]
        if recent and "loss" in logs:
            self._sts_logged_upto = recent[-1].step + 1
            dense_tokens = sum(s.dense_visual_tokens for s in recent)
            logs["sts/keep_ratio"] = sum(s.keep_ratio for s in recent) / len(recent)
            logs["sts/kept_visual_tokens_frac"] = (
                sum(s.kept_visual_tokens for s in recent) / dense_tokens if dense_tokens else 1.0
            )
            logs["sts/skipped_layers"] = sum(len(s.skipped_layers) for s in recent) / len(recent)
            # this process's micro-batches (rank 0's under DDP), forward + backward, without the
            # recomputation of gradient checkpointing
            logs["sts/flops_ratio"] = sum(s.flops for s in recent) / max(sum(s.dense_flops for s in recent), 1.0)
            logs["sts/step_time_s"] = sum(s.step_time_s for s in recent) / len(recent)
        super().log(logs, start_time)

    _sts_logged_upto = 0

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.x saves LLaVA weights in the legacy key layout and converts them in
        # from_pretrained, but the Trainer's resume path loads the raw state dict: every key
        # is "missing" and the run silently resumes from the initial weights. Load through
        # from_pretrained instead and insist on an exact match.
        model = self.model if model is None else model
        dtype = next(model.parameters()).dtype
        with _resume_errors(resume_from_checkpoint, "the run's original model config"):
            loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype, local_files_only=True)
            model.load_state_dict(loaded.state_dict(), strict=True)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # the optimizer state has one group per trainable set: another stage does not fit it
        with _resume_errors(checkpoint, "the run's original stage and trainable parts"):
            super()._load_optimizer_and_scheduler(checkpoint)


@contextlib.contextmanager
def _resume_errors(checkpoint, what: str) -> Iterator[None]:
    """A checkpoint that does not fit the run being resumed -> one-line :class:`StsError`."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StsError(f"{checkpoint}: cannot resume from it ({first[:160]}); resume with {what}, or start"
                       " again with --overwrite") from None


class _RecordConfig(TrainerCallback):
    """Writes ``sts_run.yaml`` when training begins: after a resumed checkpoint (weights,
    optimizer, scheduler) has loaded, so a resume that fails leaves the run's record as it was."""

    def __init__(self, write: Callable[[], object]):
        self.write = write

    def on_train_begin(self, args, state, control, **kwargs):
        self.write()


def check_training_args(training) -> None:
    """What ``TrainingArguments`` and the ``Trainer`` would refuse late (after the output folder is
    written): an unknown scheduler, a reporting integration that is not installed.

    Raises:
        StsError: one line naming the key and the values to use.
    """
    from transformers.integrations import get_available_reporting_integrations
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if training.lr_scheduler_type not in schedulers:
        raise StsError(f"training.lr_scheduler_type = {training.lr_scheduler_type!r} is unknown; use one of"
                       f" {', '.join(schedulers)}")
    reporters = list(training.report_to)
    alone = [name for name in ("none", "all") if name in reporters]
    if alone and len(reporters) > 1:
        raise StsError(f"training.report_to = {reporters}: {alone[0]!r} must be the only entry; use"
                       f" [{alone[0]}] or list the integrations")
    available = get_available_reporting_integrations()
    unknown = [name for name in reporters if name not in ("none", "all", *available)]
    if unknown:
        raise StsError(f"training.report_to: {unknown[0]!r} is not installed or not known; install it or"
                       f" use one of none, all, {', '.join(available)}")


def _check_output_dir(out: Path, resume: bool, overwrite: bool, inputs: dict[str, str | None]) -> None:
    """Refuse, before anything is written, an output folder this run must not write into or
    (``overwrite``) delete; ``inputs``: the run's input paths by their config key."""
    holds_run = out.is_dir() and (
        (out / RUN_CONFIG_FILE).exists() or any(out.glob("checkpoint-*"))
    )
    if resume and overwrite:
        raise StsError("pass either --resume or --overwrite, not both")
    if resume and not any(out.glob("checkpoint-*")):
        raise StsError(f"{out}: no checkpoint-N to resume from; drop --resume to start a new run")
    if holds_run and not (resume or overwrite):
        raise StsError(
            f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if out.exists() and not out.is_dir():
        raise StsError(f"{out}: exists and is not a folder; choose another output_dir")
    check_parents(out, StsError, inside=True)
    if not holds_run and out.is_dir() and any(out.iterdir()):
        raise StsError(f"{out}: holds files but no run; choose a new or empty output_dir")
    if overwrite:
        replaced = check_replaceable(out)
        for key, given in inputs.items():
            # as written (a link inside would be deleted) and as resolved (the files themselves)
            if given is not None and (Path(os.path.abspath(given)).is_relative_to(os.path.abspath(out))
                                      or Path(given).resolve().is_relative_to(replaced)):
                raise StsError(f"{out}: --overwrite would delete {key} ({given}), which lies inside it; move it"
                               " out or choose another output_dir")


def _freeze_for_stage(model, parts: ModelParts, config: RunConfig) -> None:
    stage = config.stage
    model.requires_grad_(False)
    parts.projector.requires_grad_(stage.train_projector)
    if stage.llm_trainable:
        parts.language_model.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    if stage.train_vision:
        parts.vision_tower.requires_grad_(True)
        # vision_feature_layer=-2 never uses the last layer and post-layernorm: they would
        # get no gradient (and break DDP), so they stay frozen.
        tower = parts.vision_tower.vision_model
        if parts.vision_feature_layer == -2:
            tower.encoder.layers[-1].requires_grad_(False)
        tower.post_layernorm.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise StsError("stage: nothing to train; enable train_projector, train_llm or train_vision")


def schedule_stage(schedule: Schedule, config: RunConfig) -> str | None:
    """The schedule stage this run trains: ``schedule.stage`` when given, else the stage named
    like ``stage.name``, else None (the stage by step ranges, or an unranged schedule's only one).

    Raises:
        StsError: the named stage is missing, or names the other training stage (an
            instruction run would train with the alignment plan); ``schedule.stage`` is omitted
            and the schedule names the other training stage but not this one.
    """
    run_stage, named = config.stage.name, config.schedule.stage
    names = [s.name for s in schedule.stages]
    if named is not None:
        schedule.stage_named(named)
        if named in STAGES and named != run_stage:
            raise StsError(f"schedule.stage = {named!r} but stage.name = {run_stage!r}: the {run_stage} run would "
                           f"train with the {named} plan; set schedule.stage: {run_stage} (add that stage to the "
                           "schedule) or fix stage.name")
        return named
    if run_stage in names:
        return run_stage
    if any(n in STAGES for n in names):
        raise StsError(f"{config.schedule.path}: no stage named {run_stage!r} for this {run_stage} run (stages: "
                       f"{', '.join(names)}); add a {run_stage!r} stage to the schedule")
    return None


def _check_schedule_fits(schedule: Schedule, parts: ModelParts, dataset, stage_name: str | None) -> None:
    schedule.check_model(parts.num_layers)
    # a plan must be computable (e.g. a schedule of several unranged stages needs a stage name)
    schedule.plan(0, num_layers=parts.num_layers, stage=stage_name, total_steps=1)
    stages = [schedule.stage_named(stage_name)] if stage_name else list(schedule.stages)
    for st in stages:
        if st.tokens is None:
            continue
        low = min(st.tokens.keep_ratio, st.tokens.keep_ratio_end)
        if round(low * parts.num_visual_tokens) < 1:
            raise ScheduleError(
                f"schedule stage {st.name!r}: keep_ratio {low} leaves no visual token of "
                f"{parts.num_visual_tokens}; use at least {1 / parts.num_visual_tokens:.4g}"
            )
        if st.tokens.method == "text_guided":
            for i, sample in enumerate(dataset.samples):
                if sample.get("image") and not _has_instruction_text(sample):
                    raise ScheduleError(
                        f"schedule stage {st.name!r} uses text_guided, but data entry {i} "
                        f"(id {sample.get('id')!r}) has no instruction text; use method uniform or merge"
                    )


def _has_instruction_text(sample: dict) -> bool:
    human = " ".join(t["value"] for t in sample["conversations"] if t["from"] == "human")
    return bool(human.replace("<image>", "").strip())


def _refuse_unsupported_launch(skips_layers: bool) -> None:
    truthy = {"1", "true", "yes"}
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if skips_layers and os.environ.get(var, "").lower() in truthy:
            raise StsError(
                f"layer skipping runs under DDP only, not {what}; launch with a DDP config "
                "(torchrun, or accelerate with distributed_type MULTI_GPU/MULTI_CPU)"
            )


def build_training_args(config: RunConfig, find_unused: bool) -> TrainingArguments:
    t = config.training
    return TrainingArguments(
        output_dir=str(config.output_path),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no",  # train() refuses eval_steps without eval_json
        eval_steps=t.eval_steps,
        seed=t.seed,
        data_seed=t.seed,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=t.bf16,
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=list(t.report_to),
        remove_unused_columns=False,
        # Skipped layers get no gradient, nor does the projector on a rank whose micro-batch is
        # text only: DDP must look for unused parameters, also with gradient checkpointing on
        # (the Trainer would turn it off by itself then).
        ddp_find_unused_parameters=True if find_unused else None,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train one stage as ``config`` says; returns the run summary.

    Raises:
        StsError: bad config, data, model or schedule (nothing is written then).
    """
    from sts_train.data import LlavaCollator, LlavaDataset
    from sts_train.modelio import load_model_and_processor, pad_token_id

    out = config.output_path
    _check_output_dir(out, resume, overwrite, {
        "data.json": config.data.json, "data.images": config.data.images, "data.eval_json": config.data.eval_json,
        "data.eval_images": config.data.eval_images, "model.path": config.model.path,
        "schedule.path": config.schedule.path})
    check_training_args(config.training)
    if config.training.eval_steps is not None and not config.data.eval_json:
        raise StsError(f"training.eval_steps = {config.training.eval_steps} but data.eval_json is not set; add a"
                       " held-out LLaVA JSON as data.eval_json, or drop eval_steps")
    schedule = load_schedule(config.schedule.path) if config.schedule.path else None
    stage_name = schedule_stage(schedule, config) if schedule is not None else None
    model, processor = load_model_and_processor(config.model.path, config.model.size, config.model.seed)
    parts = model_parts(model)
    images = config.data.images
    train_set = LlavaDataset(config.data.json, images, processor, num_image_tokens=parts.num_visual_tokens,
                             max_length=config.data.max_length, check_images=config.data.check_images)
    eval_set = None
    if config.data.eval_json:
        eval_set = LlavaDataset(config.data.eval_json, config.data.eval_images or images, processor,
                                num_image_tokens=parts.num_visual_tokens, max_length=config.data.max_length,
                                check_images=config.data.check_images)
    if len(train_set) == 0:
        raise DataError(f"{config.data.json}: no samples; add entries to the data file")
    skips_layers = schedule is not None and any(s.layers is not None for s in schedule.stages)
    if schedule is not None:
        _check_schedule_fits(schedule, parts, train_set, stage_name)
    _refuse_unsupported_launch(skips_layers)
    _freeze_for_stage(model, parts, config)
    model.config.use_cache = False
    model.config.text_config.use_cache = False

    text_only = any("image" not in sample for sample in train_set.samples)
    args = build_training_args(config, skips_layers or text_only)  # sets up the process group under torchrun
    # every rank has validated the output folder before rank 0 writes anything into it
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    write = args.process_index == 0
    if overwrite and write and out.exists():
        shutil.rmtree(out)
    if write:
        out.mkdir(parents=True, exist_ok=True)

    pad_id = pad_token_id(processor.tokenizer)
    controller = SparsityController(
        schedule=schedule, stage_name=stage_name, seed=config.training.seed, parts=parts,
        compressor=TokenCompressor(model, parts, pad_id), skipper=LayerSkipper(parts.decoder_layers),
        llm_trainable=config.stage.llm_trainable, rank=args.process_index,
    )
    if config.schedule.eval_sparse:
        controller.compressor.force = controller.skipper.force = True
    trainer = StsTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=LlavaCollator(pad_token_id=pad_id),
        processing_class=processor,
        callbacks=[SparsityCallback(controller, out, write)],
    )
    trainer.sts = controller
    if write:
        trainer.add_callback(_RecordConfig(lambda: dump_yaml(config, out / RUN_CONFIG_FILE)))
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    wall_s = time.perf_counter() - started
    summary = summarize(controller.history, wall_s, result.training_loss, trainer.state.global_step)
    if eval_set is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    if write:
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    controller.compressor.remove()
    controller.skipper.remove()
    return summary


def summarize(history: list[StepStats], wall_s: float, train_loss: float, global_step: int) -> dict:
    """Totals over the steps of this session, and the speedup they imply.

    ``speedup_estimate`` fits ``step_time = a + b * flops`` over the steps (least squares) and
    divides the predicted dense time by the measured time; with no spread in FLOPs it falls back
    to the FLOPs ratio. The first step (warm-up) is left out of the fit.
    """
    flops = sum(s.flops for s in history)
    dense = sum(s.dense_flops for s in history)
    kept = sum(s.kept_visual_tokens for s in history)
    dense_tokens = sum(s.dense_visual_tokens for s in history)
    summary = {
        "global_step": global_step,
        "steps_this_session": len(history),
        "train_loss": train_loss,
        "wall_time_s": wall_s,
        "step_time_s_total": sum(s.step_time_s for s in history),
        "visual_tokens_kept": kept,
        "visual_tokens_dense": dense_tokens,
        "visual_tokens_saved_frac": 1 - kept / dense_tokens if dense_tokens else 0.0,
        "layer_skips": sum(len(s.skipped_layers) for s in history),
        "flops": flops,
        "flops_dense": dense,
        "flops_saved_frac": 1 - flops / dense if dense else 0.0,
        "flops_speedup": dense / flops if flops else 1.0,
    }
    fit = [s for s in history[1:] if s.flops > 0]
    speedup = summary["flops_speedup"]
    if len(fit) >= 3:
        xs, ys = [s.flops for s in fit], [s.step_time_s for s in fit]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var > 0 and mx > 0:
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
            a = my - b * mx
            predicted_dense = sum(a + b * s.dense_flops for s in fit)
            actual = sum(ys)
            if predicted_dense > 0 and actual > 0 and b > 0:
                speedup = predicted_dense / actual
    summary["speedup_estimate"] = speedup if math.isfinite(speedup) else 1.0
    return summary
