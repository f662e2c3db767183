"""sts-train end to end on the test-size model: checkpoints, resume, bad input through the CLI."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

from sts_train.cli import app
from sts_train.config import load_run_config
from sts_train.schedule import load_schedule, sample_skipped_layers
from sts_train.train import train

SCHEDULE = {
    "schema_version": 1,
    "source": {"tool": "test"},
    "stages": [{
        "name": "instruction",
        "tokens": {"method": "uniform", "keep_ratio": 0.25},
        "layers": {"policy": "per_layer", "skip_prob": [0.5, 0.5], "decay": "linear", "never_skip": []},
    }],
}


def _model_keys(saved: dict) -> dict:
    """transformers 5 writes LLaVA weights in the original (legacy) layout; map to module names."""
    out = {}
    for k, v in saved.items():
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def run_setup(tmp_path, shapes_dir):
    data_root = shapes_dir["images"].parent
    sched = _write(tmp_path / "schedule.yaml", SCHEDULE)
    cfg = {
        "model": {"size": "test"},
        "data": {"json": str(shapes_dir["instruction"]), "images": str(data_root)},
        "stage": {"name": "instruction"},
        "schedule": {"path": str(sched), "stage": "instruction"},
        "training": {"max_steps": 6, "per_device_train_batch_size": 2, "save_steps": 3,
                     "logging_steps": 2, "seed": 7, "weight_decay": 0.01, "report_to": []},
        "output_dir": str(tmp_path / "run"),
    }
    return tmp_path, cfg


def test_sparse_run_writes_loadable_checkpoints_and_logs(run_setup, shapes_dir):
    tmp, cfg = run_setup
    # 4 held-out samples in batches of 3 and 1; the last keeps one of its five answers, so the
    # mean of the two batch means is not the mean over answer tokens
    held = json.loads(shapes_dir["instruction_eval"].read_text())
    held[-1]["conversations"], held[-1]["kinds"] = held[-1]["conversations"][:2], held[-1]["kinds"][:1]
    (tmp / "held_out.json").write_text(json.dumps(held))
    cfg["data"].update(eval_json=str(tmp / "held_out.json"), eval_images=str(shapes_dir["images"].parent))
    cfg["training"]["per_device_eval_batch_size"] = 3
    config_path = _write(tmp / "run.yaml", cfg)
    summary = train(load_run_config(config_path))
    out = tmp / "run"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    log = [json.loads(line) for line in (out / "sts_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6))
    # plans are the pure function of (schedule, step, seed)
    sched = load_schedule(tmp / "schedule.yaml")
    for r in log:
        plan = sched.plan(r["step"], num_layers=2, stage="instruction", total_steps=6)
        assert r["skipped_layers"] == list(sample_skipped_layers(plan.skip_prob, seed=7, step=r["step"]))
        assert r["kept_visual_tokens"] * 4 == r["dense_visual_tokens"]
        assert r["flops"] < r["dense_flops"]
    assert summary["visual_tokens_saved_frac"] == pytest.approx(0.75)
    assert summary["flops"] == pytest.approx(sum(r["flops"] for r in log))
    assert json.loads((out / "sts_summary.json").read_text())["global_step"] == 6
    # the checkpoint is a plain transformers model: same names, no missing/unexpected keys
    ckpt = out / "checkpoint-6"
    loaded, info = AutoModelForImageTextToText.from_pretrained(ckpt, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    saved = _model_keys(load_file(ckpt / "model.safetensors"))
    state = loaded.state_dict()
    assert saved.keys() == state.keys()
    for k in saved:
        assert torch.equal(saved[k], state[k]), k
    assert yaml.safe_load((out / "sts_run.yaml").read_text())["schedule"]["stage"] == "instruction"
    # the summary's eval loss is over every answer token, as `sts-train evaluate` computes it
    # from the saved checkpoint; the HF Trainer's own (batch means weighted 3:1) differs
    from sts_train.adapters import model_parts
    from sts_train.data import LlavaCollator, LlavaDataset
    from sts_train.evaluate import eval_loss
    from sts_train.modelio import load_processor

    processor, tokens = load_processor(ckpt), model_parts(loaded).num_visual_tokens
    collate = LlavaCollator(processor.tokenizer.pad_token_id)

    def loss_of(samples, name):
        (tmp / name).write_text(json.dumps(samples))
        return eval_loss(loaded, LlavaDataset(tmp / name, shapes_dir["images"].parent, processor,
                                              num_image_tokens=tokens), collate, batch_size=4)

    assert summary["eval_loss"] == pytest.approx(loss_of(held, "all.json"), rel=1e-5)
    hf_style = (3 * loss_of(held[:3], "first3.json") + loss_of(held[3:], "last.json")) / 4
    assert abs(hf_style - summary["eval_loss"]) > 1e-3
    assert json.loads((out / "sts_summary.json").read_text())["eval_loss"] == summary["eval_loss"]


def test_resume_gives_same_plans_and_weights(run_setup):
    tmp, cfg = run_setup
    full = _write(tmp / "full.yaml", cfg)
    train(load_run_config(full))
    cfg_b = dict(cfg, output_dir=str(tmp / "resumed"))
    part = _write(tmp / "part.yaml", cfg_b)
    train(load_run_config(part, {"training.max_steps": 6}))
    # interrupt after step 4 (0-based): checkpoint-3 is the last one kept, the log ran on
    shutil.rmtree(tmp / "resumed" / "checkpoint-6")
    log_path = tmp / "resumed" / "sts_log.jsonl"
    log_path.write_text("".join(log_path.read_text().splitlines(True)[:5]))
    train(load_run_config(part, {"training.logging_steps": 3}), resume=True)
    # the steps after the checkpoint ran again and are logged once
    assert [json.loads(x)["step"] for x in log_path.read_text().splitlines()] == list(range(6))
    # a resumed run records the config it resumed with, once its checkpoint has loaded
    assert yaml.safe_load((tmp / "resumed" / "sts_run.yaml").read_text())["training"]["logging_steps"] == 3
    a = load_file(tmp / "run" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp / "resumed" / "checkpoint-6" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plans_a = [json.loads(x)["skipped_layers"] for x in (tmp / "run" / "sts_log.jsonl").read_text().splitlines()]
    plans_b = [json.loads(x)["skipped_layers"] for x in log_path.read_text().splitlines()]
    assert plans_a == plans_b


def test_a_named_ranged_stage_starts_at_the_runs_first_step(run_setup):
    """A schedule whose instruction stage covers steps [4, 10) of a two-stage plan, run as its
    own 6-step instruction run (each run starts at step 0): run step s is stage step 4 + s, so
    the keep ratio rises 0.25 -> 1.0 over the run, not over its first 4 steps clipped at 0."""
    tmp, cfg = run_setup
    ranged = {**SCHEDULE, "stages": [
        {"name": "alignment", "steps": {"start": 0, "end": 4}, "tokens": {"method": "uniform", "keep_ratio": 0.5}},
        {"name": "instruction", "steps": {"start": 4, "end": 10},
         "tokens": {"method": "uniform", "keep_ratio": 0.25, "keep_ratio_end": 1.0, "curve": "linear"}}]}
    cfg["schedule"] = {"path": str(_write(tmp / "ranged.yaml", ranged)), "stage": "instruction"}
    train(load_run_config(_write(tmp / "run.yaml", cfg)))
    log = [json.loads(line) for line in (tmp / "run" / "sts_log.jsonl").read_text().splitlines()]
    assert [r["keep_ratio"] for r in log] == pytest.approx([0.25 + 0.75 * s / 6 for s in range(6)])
    assert all(r["stage"] == "instruction" for r in log)


def test_alignment_trains_projector_only(run_setup, shapes_dir):
    tmp, cfg = run_setup
    cfg = dict(cfg, stage={"name": "alignment"}, schedule={},
               data={"json": str(shapes_dir["alignment"]), "images": str(shapes_dir["images"].parent)})
    cfg["training"] = dict(cfg["training"], max_steps=2, save_steps=2)
    train(load_run_config(_write(tmp / "a.yaml", cfg)))
    from sts_train.factory import build_model

    before = build_model("test").state_dict()
    after = _model_keys(load_file(tmp / "run" / "checkpoint-2" / "model.safetensors"))
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)


runner = CliRunner()


def _cli(args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("case, patch, message", [
    ("layer index", {"layers": {"policy": "per_layer", "skip_prob": [0.1, 0.1, 0.1]}},
     "skip_prob .*3 entries but the model has 2 layers"),
    ("never_skip", {"layers": {"policy": "paper", "alpha": 0.5, "eps": 0.1, "never_skip": [5]}},
     "never_skip"),
    ("no visual token", {"tokens": {"method": "uniform", "keep_ratio": 0.01}},
     "keep_ratio 0.01 leaves no visual token of 16"),
])
def test_schedule_that_does_not_fit_the_model(run_setup, case, patch, message):
    tmp, cfg = run_setup
    stage = {"name": "instruction", **patch}
    _write(tmp / "schedule.yaml", {"schema_version": 1, "stages": [stage]})
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    import re

    assert re.search(message, res.output), res.output
    assert not (tmp / "run").exists()


def test_schedule_stage_defaults_to_the_run_stage_and_mismatches_are_refused(run_setup):
    tmp, cfg = run_setup
    _write(tmp / "schedule.yaml", {"schema_version": 1, "stages": [
        {"name": "alignment", "tokens": {"method": "uniform", "keep_ratio": 0.25}, "steps": {"start": 0, "end": 4}},
        {"name": "instruction", "tokens": {"method": "uniform", "keep_ratio": 0.5}, "steps": {"start": 4, "end": 10}}]})
    cfg["schedule"] = {"path": str(tmp / "schedule.yaml")}
    cfg["training"] = dict(cfg["training"], max_steps=2, save_steps=2)
    # no schedule.stage: the instruction run trains the instruction stage from its start, not
    # the alignment plan its steps 0-1 fall in by range
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp / "run" / "sts_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["keep_ratio"]) for r in log] == [("instruction", 0.5)] * 2
    for schedule, message in (
        ({"path": str(tmp / "schedule.yaml"), "stage": "alignment"},
         "schedule.stage = 'alignment' but stage.name = 'instruction': the instruction run would train with the"
         " alignment plan"),
        ({"stage": "instruction"}, "schedule.stage is set but schedule.path is not; add schedule.path"),
        ({"eval_sparse": True}, "schedule.eval_sparse is set but schedule.path is not"),
    ):
        res = _cli(["train", _write(tmp / "run.yaml", dict(cfg, schedule=schedule, output_dir=str(tmp / "r2")))])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    _write(tmp / "align_only.yaml", {"schema_version": 1, "stages": [
        {"name": "alignment", "tokens": {"method": "uniform", "keep_ratio": 0.25}}]})
    res = _cli(["train", _write(tmp / "run.yaml", dict(cfg, schedule={"path": str(tmp / "align_only.yaml")},
                                                      output_dir=str(tmp / "r2")))])
    assert res.exit_code == 2 and "no stage named 'instruction' for this instruction run" in res.output
    # stages named otherwise: several unranged ones still need a name
    _write(tmp / "custom.yaml", {"schema_version": 1, "stages": [
        {"name": "warm", "tokens": {"method": "uniform", "keep_ratio": 0.25}},
        {"name": "main", "tokens": {"method": "uniform", "keep_ratio": 0.5}}]})
    res = _cli(["train", _write(tmp / "run.yaml", dict(cfg, schedule={"path": str(tmp / "custom.yaml")},
                                                      output_dir=str(tmp / "r2")))])
    assert res.exit_code == 2 and "stage" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp / "r2").exists()


def test_text_guided_needs_instruction_text(run_setup, shapes_dir):
    tmp, cfg = run_setup
    samples = json.loads(shapes_dir["instruction"].read_text())[:2]
    samples[1]["conversations"] = samples[1]["conversations"][:2]  # one turn, whose question is
    samples[1]["conversations"][0]["value"] = "<image>"             # the image alone
    samples[1]["kinds"] = samples[1]["kinds"][:1]
    data = tmp / "notext.json"
    data.write_text(json.dumps(samples))
    _write(tmp / "schedule.yaml", {"schema_version": 1, "stages": [
        {"name": "instruction", "tokens": {"method": "text_guided", "keep_ratio": 0.5}}]})
    cfg["data"]["json"] = str(data)
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 2
    assert f"data entry 1 (id '{samples[1]['id']}') has no instruction text" in res.output


def test_bad_model_folder_and_data(run_setup, shapes_dir):
    tmp, cfg = run_setup
    bert = tmp / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = _cli(["train", _write(tmp / "r1.yaml", dict(cfg, model={"path": str(bert)}))])
    assert res.exit_code == 2 and "model type 'bert' is not supported" in res.output
    broken = tmp / "broken.json"
    broken.write_text('[{"id": "a", "conversations": [}')
    res = _cli(["train", _write(tmp / "r2.yaml", dict(cfg, data={"json": str(broken), "images": str(tmp)}))])
    assert res.exit_code == 2 and "broken.json" in res.output and "JSON" in res.output
    res = _cli(["train", _write(tmp / "r3.yaml", dict(cfg, data={"json": str(shapes_dir["instruction"]),
                                                                   "images": str(tmp)}))])
    assert res.exit_code == 2 and "instr-00000" in res.output and "not found" in res.output
    assert not (tmp / "run").exists()


def test_output_folder_with_a_run_is_refused(run_setup):
    tmp, cfg = run_setup
    cfg["training"] = dict(cfg["training"], max_steps=1, save_steps=1)
    path = _write(tmp / "run.yaml", cfg)
    assert _cli(["train", path]).exit_code == 0
    before = (tmp / "run" / "checkpoint-1" / "model.safetensors").read_bytes()
    res = _cli(["train", path])
    assert res.exit_code == 2
    assert "already holds a run; pass --resume to continue it or --overwrite to replace it" in res.output
    assert (tmp / "run" / "checkpoint-1" / "model.safetensors").read_bytes() == before
    assert _cli(["train", path, "--overwrite", "--set", "training.seed=1"]).exit_code == 0
    assert (tmp / "run" / "checkpoint-1" / "model.safetensors").read_bytes() != before


def test_unknown_config_key(run_setup):
    tmp, cfg = run_setup
    cfg["training"]["max_stepz"] = 3
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 2 and "config.training.max_stepz: unknown key" in res.output


@pytest.mark.parametrize("case, message", [
    ("folder", "is a folder; pass the path of the run config file inside it"),
    ("missing", "no such file; pass the path of a run config file"),
    ("binary", "not UTF-8 text; pass the path of a run config file"),
    ("broken", "broken YAML at line 2, column 6: expected ',' or ']'"),
])
def test_unreadable_run_config_is_one_line(tmp_path, case, message):
    path = tmp_path / "run.yaml"
    if case == "folder":
        path.mkdir()
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif case == "broken":
        path.write_text("training: [1, 2\nmodel: {size: test}\n")
    res = _cli(["train", path])
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1


@pytest.mark.parametrize("patch, message", [
    ({"lr_scheduler_type": "cosine_warmup"}, "training.lr_scheduler_type = 'cosine_warmup' is unknown; use one of linear, cosine"),
    ({"warmup_steps": -1}, "training.warmup_steps = -1 is negative; use a value >= 0"),
    ({"report_to": ["tensorbord"]}, "training.report_to: 'tensorbord' is not installed or not known"),
    ({"report_to": ["none", "tensorboard"]}, "'none' must be the only entry; use [none] or list the integrations"),
    ({"save_total_limit": -1}, "training.save_total_limit = -1 is negative; use null or 0 to keep every checkpoint"),
])
def test_bad_training_values_fail_before_anything_is_written(run_setup, patch, message):
    tmp, cfg = run_setup
    cfg["training"].update(patch)
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("report_to", [[], ["none"], ["all"], ["tensorboard"]])
def test_training_values_hf_accepts_pass(report_to):
    from sts_train.config import TrainingConfig
    from sts_train.train import check_training_args

    check_training_args(TrainingConfig(max_steps=1, report_to=tuple(report_to), lr_scheduler_type="linear",
                                       save_total_limit=0))


def test_set_fills_a_commented_out_section_and_refuses_bad_yaml(run_setup):
    tmp, cfg = run_setup
    cfg["training"] = dict(cfg["training"], max_steps=1, save_steps=1)
    path = _write(tmp / "run.yaml", cfg)
    path.write_text(path.read_text() + "stage:\n")  # a section whose keys are all commented out (null)
    assert load_run_config(path, {"stage.name": "alignment"}).stage.name == "alignment"
    res = _cli(["train", path, "--set", "data.json=[x"])
    assert res.exit_code == 2 and "--set 'data.json=[x': the value is not valid YAML; quote it" in res.output
    res = _cli(["train", path, "--set", "output_dir.x=1"])
    assert res.exit_code == 2 and "--set output_dir.x: output_dir is" in res.output and "not a section" in res.output


def test_eval_steps_needs_held_out_data(run_setup):
    tmp, cfg = run_setup
    cfg["training"] = dict(cfg["training"], eval_steps=2)
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 2 and "training.eval_steps = 2 but data.eval_json is not set; add a held-out LLaVA JSON" \
        " as data.eval_json, or drop eval_steps" in res.output
    assert not (tmp / "run").exists()


def test_overwrite_only_replaces_a_run(run_setup, monkeypatch):
    tmp, cfg = run_setup
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    # a folder of other files is neither trained into (a later --overwrite would delete them with
    # the run) nor replaced
    for flags in ([], ["--overwrite"]):
        res = _cli(["train", _write(tmp / "run.yaml", dict(cfg, output_dir=str(mine))), *flags])
        assert res.exit_code == 2 and f"{mine}: holds files but no run; choose a new or empty output_dir" in res.output
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    monkeypatch.chdir(mine)  # the current folder is never replaced, even when it holds a run
    (mine / "sts_run.yaml").write_text("{}\n")
    res = _cli(["train", _write(tmp / "here.yaml", dict(cfg, output_dir=".")), "--overwrite"])
    assert res.exit_code == 2 and ".: is or contains the current folder; choose a new folder" in res.output
    assert (mine / "notes.txt").read_text() == "keep"
    # --overwrite does not delete the run's own inputs when they lie inside its output_dir
    run = tmp / "holder"
    one = dict(cfg, output_dir=str(run), training=dict(cfg["training"], max_steps=1, save_steps=1))
    assert _cli(["train", _write(tmp / "holder.yaml", one)]).exit_code == 0
    (run / "inputs").mkdir()
    moved = dict(one, data=dict(cfg["data"], json=str(shutil.copy(cfg["data"]["json"], run / "inputs"))))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    res = _cli(["train", _write(tmp / "moved.yaml", moved), "--overwrite"])
    assert res.exit_code == 2 and f"{run}: --overwrite would delete data.json ({moved['data']['json']}), which lies" \
        " inside it; move it out or choose another output_dir" in res.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # nor images reached through a link inside it (the link would go), given relative to here
    monkeypatch.chdir(tmp)
    (run / "inputs" / "images").symlink_to(Path(cfg["data"]["images"]))
    linked = dict(one, data=dict(cfg["data"], images="holder/inputs/images"))
    res = _cli(["train", _write(tmp / "linked.yaml", linked), "--overwrite"])
    assert res.exit_code == 2 and "--overwrite would delete data.images (holder/inputs/images)" in res.output
    assert (run / "inputs" / "images").is_symlink() and (run / "sts_run.yaml").is_file()
    # an output_dir under a file is refused before the model loads
    res = _cli(["train", _write(tmp / "under.yaml", dict(cfg, output_dir=str(mine / "notes.txt" / "run")))])
    assert res.exit_code == 2 and f"{mine / 'notes.txt'} is a file, not a folder; choose another path" in res.output


def test_resume_onto_another_model_is_one_line(run_setup):
    tmp, cfg = run_setup
    cfg["training"] = dict(cfg["training"], max_steps=1, save_steps=1)
    assert _cli(["train", _write(tmp / "run.yaml", cfg)]).exit_code == 0
    res = _cli(["train", _write(tmp / "other.yaml", dict(cfg, model={"size": "small"}, schedule={})), "--resume",
                "--set", "training.max_steps=2"])
    assert res.exit_code == 2 and "checkpoint-1: cannot resume from it (" in res.output
    assert "resume with the run's original model config, or start again with --overwrite" in res.output
    assert "Traceback" not in res.output
    # the run's record still describes what its checkpoints are
    assert yaml.safe_load((tmp / "run" / "sts_run.yaml").read_text())["model"]["size"] == "test"
    # the same model in another stage: the weights load, the optimizer state (one group of
    # LLM + projector parameters) does not fit the projector-only stage
    res = _cli(["train", _write(tmp / "stage.yaml", dict(cfg, stage={"name": "alignment"}, schedule={})),
                "--resume", "--set", "training.max_steps=2"])
    assert res.exit_code == 2 and "checkpoint-1: cannot resume from it (" in res.output
    assert "resume with the run's original stage and trainable parts, or start again with --overwrite" in res.output
    assert yaml.safe_load((tmp / "run" / "sts_run.yaml").read_text())["stage"]["name"] == "instruction"


def test_run_folder_or_data_folder_given_for_a_file(run_setup, shapes_dir):
    tmp, cfg = run_setup
    cfg["training"] = dict(cfg["training"], max_steps=2, save_steps=1)
    assert _cli(["train", _write(tmp / "run.yaml", cfg)]).exit_code == 0
    res = _cli(["train", _write(tmp / "r.yaml", dict(cfg, model={"path": str(tmp / "run")},
                                                     output_dir=str(tmp / "next")))])
    assert res.exit_code == 2
    assert f"{tmp / 'run'}: is a training run, not a model folder; pass one of its checkpoints (latest: {tmp / 'run' / 'checkpoint-2'})" in res.output
    folder = shapes_dir["images"].parent
    res = _cli(["train", _write(tmp / "d.yaml", dict(cfg, data={"json": str(folder)}, output_dir=str(tmp / "d")))])
    assert res.exit_code == 2 and f"{folder}: is a folder; pass the LLaVA JSON file inside it, e.g. {folder / 'alignment.json'}" in res.output


def test_unreadable_image_in_a_dataloader_worker_is_one_line(run_setup, shapes_dir):
    tmp, cfg = run_setup
    data = tmp / "data"
    shutil.copytree(shapes_dir["images"].parent, data)
    for image in (data / "images").glob("*.png"):  # every image's pixels truncated (headers intact, so
        image.write_bytes(image.read_bytes()[:-30])  # the data check passes): the first batch meets one
    cfg["data"] = {"json": str(data / "instruction.json"), "images": str(data)}
    cfg["training"] = dict(cfg["training"], max_steps=2, save_steps=2, dataloader_num_workers=1)
    res = _cli(["train", _write(tmp / "run.yaml", cfg)])
    assert res.exit_code == 2, res.output
    message = res.output.split("error: ", 1)[1]  # after the progress bar's carriage returns
    assert message.startswith(f"{data / 'instruction.json'}") and message.count("\n") == 1
    assert "Traceback" not in res.output and "DataLoader worker" not in res.output
    assert f"cannot read image {data / 'images'}" in res.output and "replace the file" in res.output
    # headers cut too: found before training, or, with data.check_images off, when read
    for image in (data / "images").glob("*.png"):
        image.write_bytes(image.read_bytes()[:40])
    res = _cli(["train", _write(tmp / "run.yaml", dict(cfg, output_dir=str(tmp / "r2")))])
    assert res.exit_code == 2 and "is not a readable image (19 of 20 samples have one)" in res.output
    assert not (tmp / "r2").exists()
    cfg["data"] = dict(cfg["data"], check_images=False)
    res = _cli(["train", _write(tmp / "run.yaml", dict(cfg, output_dir=str(tmp / "r3")))])
    assert res.exit_code == 2 and f"cannot read image {data / 'images'}" in res.output


def test_gradient_accumulation_has_one_plan_per_optimizer_step(run_setup):
    tmp, cfg = run_setup
    cfg["training"] = dict(cfg["training"], max_steps=3, save_steps=3, gradient_accumulation_steps=2)
    train(load_run_config(_write(tmp / "run.yaml", cfg)))
    log = [json.loads(line) for line in (tmp / "run" / "sts_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    # both micro-batches (2 samples each, 16 visual tokens per image; one sample in 20 is
    # text-only) are accounted to the optimizer step: one micro-batch holds at most 32 tokens
    assert all(r["dense_visual_tokens"] in (48, 64) for r in log)
    assert all(r["kept_visual_tokens"] * 4 == r["dense_visual_tokens"] for r in log)
    sched = load_schedule(tmp / "schedule.yaml")
    for r in log:
        plan = sched.plan(r["step"], num_layers=2, stage="instruction", total_steps=3)
        assert r["skipped_layers"] == list(sample_skipped_layers(plan.skip_prob, seed=7, step=r["step"]))


def test_ranks_share_layer_plans_but_not_random_token_draws():
    """Under DDP every rank skips the same layers (a pure function of schedule, step, seed),
    while random token dropping draws per rank (rank 0 draws what a single process draws)."""
    from sts_train.adapters import model_parts
    from sts_train.compress import TokenCompressor
    from sts_train.factory import build_model
    from sts_train.schedule import Schedule
    from sts_train.skipper import LayerSkipper
    from sts_train.train import SparsityController

    model = build_model("test", seed=0)
    parts = model_parts(model)
    sched = Schedule.from_dict({"schema_version": 1, "stages": [{
        "name": "instruction", "tokens": {"method": "random", "keep_ratio": 0.5},
        "layers": {"policy": "per_layer", "skip_prob": [0.5, 0.5], "decay": "constant", "never_skip": []}}]})

    def controller(rank):
        return SparsityController(schedule=sched, stage_name="instruction", seed=7, parts=parts,
                                  compressor=TokenCompressor(model, parts, 0), skipper=LayerSkipper(parts.decoder_layers),
                                  llm_trainable=True, rank=rank, total_steps=10)

    for step in range(4):
        plans, draws = [], []
        for rank in (0, 1):
            c = controller(rank)
            plans.append(c.begin_step(step).skipped_layers)
            draws.append(torch.randperm(16, generator=c.compressor.generator))
            c.compressor.remove()
            c.skipper.remove()
        single = torch.randperm(16, generator=torch.Generator().manual_seed(7 * 1_000_003 + step))
        assert plans[0] == plans[1]
        assert torch.equal(draws[0], single) and not torch.equal(draws[0], draws[1])
