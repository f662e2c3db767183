"""``sts-profile analyze`` end to end on a checkpoint series written by the plain HF Trainer.

    PYTHONPATH=. .venv/bin/pytest tests/test_profile_analyze.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from sts_profile.cli import app

NUM_LAYERS = 2
STEPS = (1, 2, 3)
TOKEN_METRICS_PER_CKPT = NUM_LAYERS * 3 + 1 + 3 + 1 + 4 * 3 * 2  # attention, neighbour, mergeable, dense, probes (delta, se)

cli_runner = CliRunner()
_DATA: dict = {}  # the calibration JSON, set once by the autouse fixture below


@pytest.fixture(autouse=True, scope="module")
def _remember_data(shapes_dir):
    _DATA["json"] = shapes_dir["instruction"]


def _cli(*args):
    return cli_runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, shapes_dir, test_processor):
    """Three checkpoints of the test-size model, written by ``transformers.Trainer`` itself into a
    stage sub-folder: ``run/instruction/checkpoint-{1,2,3}``."""
    from transformers import Trainer, TrainingArguments

    from sts_train.data import LlavaCollator, LlavaDataset
    from sts_train.factory import build_model

    root = tmp_path_factory.mktemp("hf") / "run"
    dataset = LlavaDataset(shapes_dir["instruction"], None, test_processor, num_image_tokens=16)
    args = TrainingArguments(
        output_dir=str(root / "instruction"), max_steps=len(STEPS), save_steps=1, per_device_train_batch_size=2,
        learning_rate=5e-3, report_to=[], use_cpu=True, logging_steps=1, save_only_model=True,
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=build_model("test", seed=0), args=args, train_dataset=dataset,
                      data_collator=LlavaCollator(test_processor.tokenizer.pad_token_id),
                      processing_class=test_processor)
    trainer.train()
    return root


def _analyze(run, out, *extra, data=True):
    """Analyze with 4 samples in one batch; the plain Trainer leaves no record of its data."""
    flags = ["--data", _DATA["json"]] if data else []
    return _cli("analyze", run, "--out", out, "--samples", 4, "--batch-size", 4, *flags, *extra)


@pytest.fixture(scope="module")
def analyzed(trainer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    result = _analyze(trainer_run, out, "--trace", "--max-loss-increase", 0.1)
    assert result.exit_code == 0, result.output
    return out, result


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("layers", "tokens", "cost", "checkpoints")}


@pytest.mark.slow
def test_analyze_writes_tables_plots_report_and_schedule(analyzed, trainer_run):
    from sts_profile.analysis import Analysis
    from sts_train.schedule import load_schedule

    out, result = analyzed
    assert "[1/3] instruction/checkpoint-1" in result.output and "batch 1/1" in result.output
    tables = _tables(out)
    layers, tokens, cost = tables["layers"], tables["tokens"], tables["cost"]
    assert list(layers.columns) == ["checkpoint", "step", "stage", "layer", "token_type", "metric", "value"]
    assert list(tokens.columns) == ["checkpoint", "step", "stage", "layer", "metric", "method", "keep_ratio",
                                    "threshold", "value"]
    assert list(cost.columns) == ["layer", "component", "seq_len", "flops_fwd", "time_fwd_s"]
    passive = layers[layers["metric"].isin(["block_influence", "angular_distance", "relative_update_norm"])]
    assert len(passive) == len(STEPS) * NUM_LAYERS * 3 * 3
    assert passive.groupby(["checkpoint", "layer", "token_type", "metric"]).size().eq(1).all()
    assert len(layers) == len(passive) + len(STEPS) * NUM_LAYERS * 3  # skip_loss_delta(_se), skip_kl
    assert len(tokens) == len(STEPS) * TOKEN_METRICS_PER_CKPT
    assert sorted(set(layers["step"])) == list(STEPS) and set(layers["stage"]) == {"instruction"}
    assert layers["value"].notna().all() and tokens["value"].notna().all()
    assert list(cost["component"]) == ["decoder_layer"] * NUM_LAYERS + ["vision_tower", "projector", "lm_head", "total"]
    for name, df in tables.items():  # the CSV holds the same table
        csv = pd.read_csv(out / f"{name}.csv")
        assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
    # facade
    analysis = Analysis(out)
    pd.testing.assert_frame_equal(analysis.layer_redundancy(), layers)
    assert set(analysis.token_redundancy("mergeable_frac")["threshold"]) == {0.8, 0.9, 0.95}
    assert list(analysis.checkpoints()["checkpoint"]) == [f"instruction/checkpoint-{s}" for s in STEPS]
    # plots, report, schedule
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "redundancy_block_influence.png" in plots and "token_keep_ratio.png" in plots
    report = (out / "report.html").read_text()
    assert "plots/redundancy_block_influence.png" in report
    schedule = load_schedule(out / "schedule.yaml")
    schedule.check_model(NUM_LAYERS)
    assert [s.name for s in schedule.stages] == ["instruction"]
    assert analysis.schedule() == schedule
    manifest = json.loads((out / "analysis.json").read_text())
    assert manifest["ckpt_dir"] == str(trainer_run.resolve()) and manifest["num_layers"] == NUM_LAYERS
    # the cost model's text length: padded batch length minus each row's visual tokens (one batch of 4)
    from sts_train.data import load_llava_json

    samples = {s["id"]: s for s in load_llava_json(_DATA["json"])}
    ids = manifest["calibration"]["sample_ids"]
    from sts_train.data import encode_conversation
    from sts_train.factory import build_processor

    tok = build_processor("test").tokenizer
    rows = [(len(encode_conversation(samples[i]["conversations"], tok, num_image_tokens=16,
                                     image_token_id=4)["input_ids"]), 16 if samples[i].get("image") else 0)
            for i in ids]
    padded = max(n for n, _ in rows)
    assert len(ids) == 4 and manifest["text_len"] == round(sum(padded - v for _, v in rows) / len(rows))


@pytest.mark.slow
def test_trace_parses_with_torch_tb_profiler(analyzed):
    from torch_tb_profiler import consts
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    out, _ = analyzed
    files = list((out / "trace").iterdir())
    assert len(files) == 1 and files[0].name.endswith(".pt.trace.json.gz")
    match = consts.WORKER_PATTERN.match(files[0].name)
    worker, span = match.group(1), match.group(2)[1:]
    assert worker == "llava-L2-H64"
    # what RunLoader does per file (it runs this in a subprocess)
    data = RunProfileData.parse(worker, span, str(files[0]), str(out / ".cache"))
    profile = RunGenerator(worker, span, data).generate_run_profile()
    assert len(data.events) > 100 and profile is not None


@pytest.mark.slow
def test_interrupt_and_resume_gives_identical_tables(analyzed, trainer_run, tmp_path, monkeypatch):
    from sts_profile import plots, runner

    out = tmp_path / "out"
    real = runner.measure_checkpoint
    calls = []

    def interrupted(plan, index):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return real(plan, index)

    monkeypatch.setattr(runner, "measure_checkpoint", interrupted)
    monkeypatch.setattr(plots, "write_plots", lambda *a, **k: {})  # tables are what is compared
    result = _analyze(trainer_run, out, "--max-loss-increase", 0.1)
    assert result.exit_code == 130, result.output
    assert not (out / "analysis.json").exists() and not (out / "layers.parquet").exists()
    assert sorted(p.name for p in (out / ".cache").glob("*.json")) == ["instruction__checkpoint-1.json", "owner.json"]

    calls.clear()
    monkeypatch.setattr(runner, "measure_checkpoint", lambda plan, index: calls.append(index) or real(plan, index))
    result = _analyze(trainer_run, out, "--max-loss-increase", 0.1)
    assert result.exit_code == 0, result.output
    assert calls == [1, 2] and "cached result" in result.output
    resumed, full = _tables(out), _tables(analyzed[0])
    for name in ("layers", "tokens", "checkpoints"):
        pd.testing.assert_frame_equal(resumed[name], full[name], check_exact=True)
    pd.testing.assert_frame_equal(resumed["cost"].drop(columns="time_fwd_s"), full["cost"].drop(columns="time_fwd_s"))

    # the finished folder now belongs to this run (a later analyze of it resumes, not refuses)
    assert json.loads((out / "analysis.json").read_text())["ckpt_dir"] == str(trainer_run.resolve())


@pytest.mark.slow
def test_single_checkpoint_is_analyzed_with_a_warning(trainer_run, tmp_path):
    out = tmp_path / "one"
    result = _cli("analyze", trainer_run / "instruction" / "checkpoint-3", "--out", out, "--samples", 2,
                  "--no-probes", "--data", _DATA["json"])
    assert result.exit_code == 0, result.output
    assert "trends across training need two or more" in result.output
    manifest = json.loads((out / "analysis.json").read_text())
    assert any("only one checkpoint" in n for n in manifest["notes"])
    assert "only one checkpoint" in (out / "report.html").read_text()
    assert set(pd.read_parquet(out / "layers.parquet")["metric"]) == {
        "block_influence", "angular_distance", "relative_update_norm"}


def _copy_run(trainer_run: Path, dest: Path) -> Path:
    shutil.copytree(trainer_run, dest)
    return dest


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_analyze(tmp_path / "empty", tmp_path / "out"),
                    str(tmp_path / "empty"), "not a run or model folder")
    assert not (tmp_path / "out").exists()


def test_unusable_device_and_broken_manifest(trainer_run, tmp_path):
    # cuda:99 is past any machine's devices: refused before the output folder is made
    _one_line_error(_analyze(trainer_run, tmp_path / "out", "--device", "cuda:99"), "--device cuda:99: ")
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "tables"
    broken.mkdir()
    (broken / "analysis.json").write_text("{broken")
    _one_line_error(_cli("schedule", broken, "--target-speedup", 1.3, "-o", tmp_path / "s.yaml"),
                    f"{broken / 'analysis.json'}: not valid JSON; re-run `sts-profile analyze`")
    _one_line_error(_cli("schedule", broken, "--target-speedup", 1.3, "-o", tmp_path),
                    f"{tmp_path}: is a folder; pass a file path")
    assert not (tmp_path / "s.yaml").exists()


def test_checkpoints_of_different_architectures(trainer_run, tmp_path):
    run = _copy_run(trainer_run, tmp_path / "run")
    config_path = run / "instruction" / "checkpoint-2" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["num_hidden_layers"] = 4
    config_path.write_text(json.dumps(config))
    _one_line_error(_analyze(run, tmp_path / "out"),
                    "different architectures", "num_hidden_layers")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_config(trainer_run, tmp_path):
    """A config.json edited in every checkpoint alike passes the architecture check; loading
    then refuses weights of other shapes, or too few or too many of them, rather than starting the
    parameters they lack from random values; and the failed analysis leaves nothing behind that
    would mark its folder as this run's."""
    for key, value, message in (("intermediate_size", 96, "the weights have other shapes than config.json says"),
                                ("num_hidden_layers", 3, "config.json has parameters the weights lack (9, e.g. "
                                 "model.language_model.layers.2.input_layernorm.weight)"),
                                ("num_hidden_layers", 1, "the weights hold parameters config.json has no place "
                                 "for (9, e.g. model.language_model.layers.1.input_layernorm.weight)")):
        run = _copy_run(trainer_run, tmp_path / f"run-{key}-{value}")
        for config_path in run.rglob("config.json"):
            config = json.loads(config_path.read_text())
            if "text_config" in config:
                config["text_config"][key] = value
                config_path.write_text(json.dumps(config))
        out = tmp_path / f"out-{key}-{value}"
        _one_line_error(_analyze(run, out), message, "fix config.json or re-save the model with save_pretrained")
        assert not out.exists()


def test_truncated_weight_file(trainer_run, tmp_path):
    run = _copy_run(trainer_run, tmp_path / "run")
    weights = run / "instruction" / "checkpoint-3" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _one_line_error(_analyze(run, tmp_path / "out"), str(weights), "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(trainer_run, tmp_path):
    run = _copy_run(trainer_run, tmp_path / "run")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        for file in run.rglob(name):
            file.unlink()
    _one_line_error(_analyze(run, tmp_path / "out"),
                    "checkpoint-1", "no tokenizer", "save_pretrained")
    assert not (tmp_path / "out").exists()


def test_calibration_data_named_by_the_run_but_missing(trainer_run, tmp_path):
    run = _copy_run(trainer_run, tmp_path / "run")
    (run / "sts_run.yaml").write_text("data:\n  json: gone.json\n  images: .\n")
    _one_line_error(_analyze(run, tmp_path / "out", data=False), f"{run / 'sts_run.yaml'}: its data.json"
                    " 'gone.json' is not found", "pass the calibration data with --data JSON --images DIR")
    _one_line_error(_analyze(run, tmp_path / "out", "--images", tmp_path, data=False), "without --data")
    assert not (tmp_path / "out").exists()


def test_calibration_data_without_images(trainer_run, tmp_path):
    text_only = [s for s in json.loads(Path(_DATA["json"]).read_text()) if "image" not in s]
    assert text_only
    data = tmp_path / "text.json"
    data.write_text(json.dumps(text_only))
    _one_line_error(_analyze(trainer_run, tmp_path / "out", "--data", data, data=False), str(data), "no images")
    _one_line_error(_analyze(trainer_run, tmp_path / "out", data=False), "no calibration data", "--data")
    # the run's own data, named by the sts_run.yaml that sts-train writes, is found too
    run = _copy_run(trainer_run, tmp_path / "run")
    (run / "instruction" / "sts_run.yaml").write_text(f"data: {{json: {data.name}}}\nstage: {{name: instruction}}\n")
    shutil.copy(data, run / "instruction" / data.name)
    _one_line_error(_analyze(run, tmp_path / "out", data=False), data.name, "no images")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_output_folder_with_another_analysis(analyzed, trainer_run, tmp_path):
    out, _ = analyzed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = _copy_run(trainer_run, tmp_path / "other")
    _one_line_error(_analyze(other, out), str(out), "another run", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    _one_line_error(_analyze(trainer_run, busy), "not empty", "--overwrite")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    _one_line_error(_analyze(trainer_run, busy / "notes.txt" / "out"), "notes.txt is a file, not a folder")
    # --overwrite replaces the other analysis (its cache included) and leaves other files alone
    replaced = tmp_path / "replaced"
    shutil.copytree(out, replaced)
    (replaced / "notes.txt").write_text("mine")
    result = _analyze(other, replaced, "--no-probes", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((replaced / "analysis.json").read_text())["ckpt_dir"] == str(other.resolve())
    assert (replaced / "notes.txt").read_text() == "mine"
    assert "skip_kl" not in set(pd.read_parquet(replaced / "layers.parquet")["metric"])


@pytest.mark.slow
def test_schedule_command_derives_from_tables(analyzed, tmp_path):
    from sts_train.schedule import load_schedule

    out, _ = analyzed
    paper = tmp_path / "paper.yaml"
    result = _cli("schedule", out, "--policy", "paper", "--alpha", 0.4, "--eps", 0.1, "-o", paper)
    assert result.exit_code == 0, result.output
    assert load_schedule(paper).source["policy"] == "paper"
    derived = tmp_path / "derived.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _cli("schedule", out, "--target-speedup", 1.3, "-o", derived)
    assert result.exit_code == 0, result.output
    load_schedule(derived).check_model(NUM_LAYERS)
    # a budget out of reach: the fastest schedule found, and one line per stage that says so (no
    # Python warning display with its file, line and source)
    result = _cli("schedule", out, "--target-speedup", 1000, "-o", tmp_path / "far.yaml")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "not reachable" in line]
    assert lines and all(line.startswith("warning: stage ") for line in lines)
    assert "UserWarning" not in result.output and "derive_schedule(" not in result.output
    load_schedule(tmp_path / "far.yaml").check_model(NUM_LAYERS)
    _one_line_error(_cli("schedule", out, "--target-speedup", 1.3, "-o", derived), "--overwrite")
    _one_line_error(_cli("schedule", tmp_path, "--target-speedup", 1.3, "-o", tmp_path / "x.yaml"),
                    "not an analysis folder")


@pytest.mark.slow
def test_derived_schedule_drives_sts_train(analyzed, trainer_run, tmp_path):
    from sts_train.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig, StageConfig, TrainingConfig
    from sts_train.train import train

    out, _ = analyzed
    config = RunConfig(
        data=DataConfig(json=str(_DATA["json"])), output_dir=str(tmp_path / "sparse"),
        model=ModelConfig(path=str(trainer_run / "instruction" / "checkpoint-3")),
        stage=StageConfig(name="instruction"),
        schedule=ScheduleConfig(path=str(out / "schedule.yaml"), stage="instruction"),
        training=TrainingConfig(max_steps=2, per_device_train_batch_size=2, save_steps=2, logging_steps=1,
                                report_to=()))
    summary = train(config)
    assert summary["global_step"] == 2 and (tmp_path / "sparse" / "checkpoint-2" / "config.json").is_file()


# -- discovery layouts (JSON only, no model weights) ---------------------------------------------

def _model_folder(folder: Path, config: dict, step: int | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


@pytest.fixture(scope="module")
def config_dict():
    from sts_train.factory import build_config

    return build_config("test").to_dict()


def test_discover_layouts(tmp_path, config_dict):
    from sts_profile.discover import TrendWarning, discover_checkpoints

    hf = tmp_path / "hf"
    for n in (10, 9, 100):
        _model_folder(hf / f"checkpoint-{n}", config_dict, step=n)
    (hf / "runs").mkdir()  # TensorBoard logs are not checkpoints
    (hf / "config.json").write_text(json.dumps(config_dict))  # trainer.save_model(): repeats the last
    found = discover_checkpoints(hf)
    assert [c.name for c in found] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert [c.step for c in found] == [9, 10, 100] and {c.stage for c in found} == {"unknown"}

    loose = tmp_path / "loose"
    _model_folder(loose / "epoch-2", config_dict)
    _model_folder(loose / "epoch-1", config_dict)
    _model_folder(loose / "stepless", config_dict, step=50)
    assert [(c.name, c.step) for c in discover_checkpoints(loose)] == [("epoch-1", 1), ("epoch-2", 2), ("stepless", 50)]

    staged = tmp_path / "staged"
    _model_folder(staged / "instruction" / "checkpoint-5", config_dict, step=5)
    _model_folder(staged / "alignment" / "checkpoint-8", config_dict, step=8)
    _model_folder(staged / "stage-b" / "checkpoint-1", config_dict)
    (staged / "stage-b" / "sts_run.yaml").write_text("stage: {name: instruction2}\n")
    found = discover_checkpoints(staged)
    assert [(c.name, c.stage, c.step) for c in found] == [
        # stages that count again from 0 are shifted after the stage before them
        ("alignment/checkpoint-8", "alignment", 8), ("instruction/checkpoint-5", "instruction", 8 + 5),
        ("stage-b/checkpoint-1", "instruction2", 13 + 1)]

    with pytest.warns(TrendWarning, match="two or more"):
        (single,) = discover_checkpoints(hf / "checkpoint-10")
    assert single.step == 10 and single.path == hf / "checkpoint-10" and single.run == single.path

    # HF scripts often save_model() into each stage's output_dir too: the stage folder is then
    # a model folder itself, but it holds checkpoints, so it is a stage run (its final model,
    # like the run's own, repeats the last checkpoint)
    final = tmp_path / "final"
    for stage, steps in (("alignment", (4, 8)), ("instruction", (5, 10))):
        for n in steps:
            _model_folder(final / stage / f"checkpoint-{n}", config_dict, step=n)
        (final / stage / "config.json").write_text(json.dumps(config_dict))
    (final / "config.json").write_text(json.dumps(config_dict))
    assert [(c.name, c.stage, c.step) for c in discover_checkpoints(final)] == [
        ("alignment/checkpoint-4", "alignment", 4), ("alignment/checkpoint-8", "alignment", 8),
        ("instruction/checkpoint-5", "instruction", 13), ("instruction/checkpoint-10", "instruction", 18)]


def _stage_runs(root: Path, config: dict, runs: dict) -> None:
    """``runs``: folder -> (sts_run.yaml text or None, modification time of its checkpoints)."""
    for folder, (run_yaml, mtime) in runs.items():
        for n in (1, 2):
            _model_folder(root / folder / f"checkpoint-{n}", config, step=n)
            os.utime(root / folder / f"checkpoint-{n}", (mtime + n, mtime + n))
        if run_yaml is not None:
            (root / folder / "sts_run.yaml").write_text(run_yaml)


def _stage_sequence(root: Path, by_time: str | None = None) -> list[tuple[str, int]]:
    """(stage, step) of each checkpoint found; ``by_time``: the runs the warning says are ordered
    by when they were written (None: no warning)."""
    from sts_profile.discover import StageOrderWarning, discover_checkpoints

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = discover_checkpoints(root)
    said = [str(w.message) for w in caught if issubclass(w.category, StageOrderWarning)]
    assert said == ([] if by_time is None else [
        f"stage runs ordered by when their checkpoints were written: {by_time}; neither their stage names "
        "(alignment/pretrain before instruction/finetune) nor an sts_run.yaml model.path says which came "
        "first: check that order, or rename the stage folders"])
    return [(c.stage, c.step) for c in found]


def test_stage_runs_are_ordered_as_they_were_trained(tmp_path, config_dict):
    """Stage runs that count from step 0 again are ordered by what they say about themselves,
    not by folder name: LLaVA's own stage names, when the checkpoints were written, and the
    checkpoint a run started from (its sts_run.yaml) over both."""
    from sts_profile.discover import discover_checkpoints

    # LLaVA's scripts name the stages pretrain and finetune ("finetune" sorts first by name);
    # the names hold even when a copy made finetune's files look older
    _stage_runs(tmp_path / "llava", config_dict, {"finetune": (None, 1000), "pretrain": (None, 5000)})
    assert _stage_sequence(tmp_path / "llava") == [("pretrain", 1), ("pretrain", 2), ("finetune", 3), ("finetune", 4)]
    # other names: the run whose checkpoints were written first ("dpo" sorts first by name)
    # (which the analysis warns of: a copy that does not keep file times loses it)
    _stage_runs(tmp_path / "other", config_dict, {"dpo": (None, 5000), "sft": (None, 1000)})
    assert [s for s, _ in _stage_sequence(tmp_path / "other", "sft, then dpo")] == ["sft", "sft", "dpo", "dpo"]
    # a run started from another run's checkpoint follows it, whatever the times and names say;
    # the path is as the run was given it: absolute, or relative to the folder above the runs
    for given in (str(tmp_path / "linked" / "zeta" / "checkpoint-2"), "zeta/checkpoint-2"):
        root = tmp_path / "linked"
        shutil.rmtree(root, ignore_errors=True)
        _stage_runs(root, config_dict, {
            "zeta": ("stage: {name: zeta}\n", 5000),
            "alpha": (f"stage: {{name: alpha}}\nmodel: {{path: {given}}}\n", 1000),
            "mid": ("stage: {name: mid}\nmodel: {path: " + str(root / "alpha" / "checkpoint-2") + "}\n", 500)})
        # a checkpoint saved in the folder above makes it a run too, holding every other one:
        # a run follows the innermost run that holds its start
        _model_folder(root / "checkpoint-0", config_dict, step=0)
        os.utime(root / "checkpoint-0", (100, 100))
        # (only the checkpoint above and zeta, linked to nothing, are ordered by their times)
        assert [s for s, _ in _stage_sequence(root, "linked, then zeta")] == [
            "unknown", "zeta", "zeta", "alpha", "alpha", "mid", "mid"]
    # two runs of one stage, the second started from the first (relative to where training ran,
    # which is not here: the path's last two parts name the run): steps go on, not back to 1
    _stage_runs(tmp_path / "twice", config_dict, {
        "sft-b": ("stage: {name: instruction}\nmodel: {path: elsewhere/runs/sft-a/checkpoint-2}\n", 1000),
        "sft-a": ("stage: {name: instruction}\n", 5000)})
    assert _stage_sequence(tmp_path / "twice") == [("instruction", step) for step in (1, 2, 3, 4)]
    found = discover_checkpoints(tmp_path / "twice")
    assert [c.name for c in found] == ["sft-a/checkpoint-1", "sft-a/checkpoint-2", "sft-b/checkpoint-1",
                                       "sft-b/checkpoint-2"]
    # a run that names its own checkpoint (as a restart from it) was not started from the run
    # that holds it
    own = tmp_path / "own"
    restart = own / "sub" / "checkpoint-1"
    _stage_runs(own, config_dict, {"sub": (f"stage: {{name: sub}}\nmodel: {{path: {restart}}}\n", 10)})
    _model_folder(own / "checkpoint-0", config_dict, step=0)
    os.utime(own / "checkpoint-0", (100, 100))
    assert [s for s, _ in _stage_sequence(own, "sub, then own")] == ["sub", "sub", "unknown"]
    # two instruction runs, one started from the alignment run: the alignment run comes first by
    # its name, and only the two instruction runs are ordered by their times
    _stage_runs(tmp_path / "mixed", config_dict, {
        "align": ("stage: {name: alignment}\n", 100),
        "a": ("stage: {name: instruction}\nmodel: {path: align/checkpoint-2}\n", 5000),
        "b": ("stage: {name: instruction}\n", 1000)})
    assert [s for s, _ in _stage_sequence(tmp_path / "mixed", "b, then a")] == [
        "alignment", "alignment", "instruction", "instruction", "instruction", "instruction"]
    # two runs started from one checkpoint: only their own order rests on the times
    _stage_runs(tmp_path / "fork", config_dict, {
        "base": ("stage: {name: instruction}\n", 100),
        "y": ("stage: {name: instruction}\nmodel: {path: base/checkpoint-2}\n", 5000),
        "x": ("stage: {name: instruction}\nmodel: {path: base/checkpoint-2}\n", 1000)})
    assert _stage_sequence(tmp_path / "fork", "x, then y") == [("instruction", step) for step in range(1, 7)]


def test_single_checkpoint_finds_its_runs_data(tmp_path, config_dict):
    """``analyze run/checkpoint-N`` without --data: the run's sts_run.yaml names the stage and
    the calibration data, as for the whole run."""
    from sts_profile.discover import discover_checkpoints
    from sts_profile.runner import calibration_source

    run = tmp_path / "run"
    _model_folder(run / "checkpoint-7", config_dict, step=7)
    (run / "data.json").write_text("[]")
    (run / "sts_run.yaml").write_text("stage: {name: instruction}\ndata: {json: data.json, images: imgs}\n")
    with pytest.warns(UserWarning):
        found = discover_checkpoints(run / "checkpoint-7")
    assert found[0].stage == "instruction" and found[0].run == run
    config = SimpleNamespace(data_json=None, images=None, ckpt_dir=str(run / "checkpoint-7"))
    assert calibration_source(config, found) == (run / "data.json", run / "imgs")


def test_cache_key_follows_the_calibration_batches(tmp_path, config_dict):
    """Regenerated data with the same sample ids (the shapes generator's ids repeat) must not
    reuse results measured on the old data: the key hashes the collated batches themselves."""
    import torch

    from sts_profile.discover import Checkpoint
    from sts_profile.runner import Plan, batches_digest, cache_key

    _model_folder(tmp_path / "ckpt", config_dict, step=1)
    ckpt = Checkpoint(path=tmp_path / "ckpt", name="ckpt", step=1, stage="unknown", run=tmp_path)
    config = SimpleNamespace(measurement_key=lambda: {"samples": 2})
    batch = {"input_ids": torch.arange(6).view(2, 3), "pixel_values": torch.zeros(2, 3, 4, 4)}
    other = {**batch, "pixel_values": batch["pixel_values"].clone()}
    other["pixel_values"][1, 0, 0, 0] = 0.5

    def key(batches):
        plan = Plan(config=config, checkpoints=[ckpt], processor_dir=tmp_path, pad_token_id=0, facts={},
                    batches=batches, sample_ids=["a", "b"], calibration={}, text_len=3)
        return cache_key(plan, ckpt, with_cost=False)

    assert key([batch]) == key([{k: v.clone() for k, v in batch.items()}])
    assert key([batch]) != key([other])
    assert batches_digest([{**batch, "pixel_values": batch["pixel_values"].bfloat16()}]) != batches_digest([batch])


def test_discover_never_unpickles(tmp_path, config_dict, monkeypatch):
    import pickle

    from sts_profile.discover import discover_checkpoints

    folder = tmp_path / "run" / "checkpoint-1"
    _model_folder(folder, config_dict, step=1)
    (folder / "training_args.bin").write_bytes(b"not a pickle")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled a file"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled a file"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert discover_checkpoints(tmp_path / "run")[0].step == 1
    assert os.path.getsize(folder / "training_args.bin") == 12


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_splits_checkpoints_and_rank0_gathers(analyzed, trainer_run, tmp_path):
    """Two gloo processes under torchrun: each measures its share, rank 0 writes the same tables."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sts_profile.cli", "analyze", str(trainer_run), "--out", str(out), "--data", str(_DATA["json"]),
           "--samples", "4", "--batch-size", "4", "--max-loss-increase", "0.1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1: [2/3] instruction/checkpoint-2" in proc.stderr  # rank 1 measured its share
    tables, full = _tables(out), _tables(analyzed[0])
    for name in ("layers", "tokens", "checkpoints"):
        pd.testing.assert_frame_equal(tables[name], full[name], check_exact=True)


def test_frozen_llm_stage_gets_a_note():
    from sts_profile.analysis import analysis_notes, build_tables, llm_frozen_by_stage

    def result(name, step, stage, fingerprint):
        return {"checkpoint": name, "step": step, "stage": stage, "path": f"/r/{name}", "layers": [],
                "tokens": [], "cost": None, "llm_fingerprint": fingerprint, "notes": []}

    tables = build_tables([result("alignment/c-1", 1, "alignment", "aa"), result("alignment/c-2", 2, "alignment", "aa"),
                           result("instruction/c-1", 1, "instruction", "bb"),
                           result("instruction/c-2", 2, "instruction", "cc")])
    assert llm_frozen_by_stage(tables["checkpoints"]) == {"alignment": True, "instruction": False}
    notes = analysis_notes(tables, ["x", "x"])
    assert notes[0] == "x" and len(notes) == 2 and "LLM frozen in stage 'alignment'" in notes[1]
