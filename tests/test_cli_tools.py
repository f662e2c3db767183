"""The small sts-train commands: make-data, make-model, plan, evaluate."""

import json

import pytest
import yaml
from typer.testing import CliRunner
from transformers import AutoModelForImageTextToText

from sts_train.cli import app

runner = CliRunner()


def test_make_data_and_refuse_overwrite(tmp_path):
    out = tmp_path / "d"
    res = runner.invoke(app, ["make-data", str(out), "--n-alignment", "3", "--n-instruction", "4",
                              "--n-eval", "2", "--image-size", "56"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "instruction.json").read_text())) == 4
    # one image per sample: 3 captions, 4 QA (text-only is every 20th), 2 + 2 held out
    assert len(list((out / "images").glob("*.png"))) == 3 + 4 + 2 + 2
    res = runner.invoke(app, ["make-data", str(out)])
    assert res.exit_code == 2 and "not empty; choose a new folder or pass --overwrite" in res.output


def test_make_model_loads_with_auto_class(tmp_path):
    res = runner.invoke(app, ["make-model", "test", str(tmp_path / "m"), "--seed", "4"])
    assert res.exit_code == 0, res.output
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert model.config.text_config.num_hidden_layers == 2
    res = runner.invoke(app, ["make-model", "giant", str(tmp_path / "g")])
    assert res.exit_code == 2 and "unknown model size 'giant'" in res.output


def test_plan_prints_the_paper_formula(tmp_path):
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"schema_version": 1, "stages": [
        {"name": "instruction", "layers": {"policy": "paper", "alpha": 0.5, "eps": 0.2, "never_skip": [0, -1]}}]}))
    res = runner.invoke(app, ["plan", str(sched), "--layers", "4", "--steps", "10", "--every", "5"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines()[1:]]
    assert [r[0] for r in rows] == ["0", "5", "9"]
    # step 0: 0.5 * (1 + 0.2 * (2l - 3) / 3) for l = 1, 2; first and last never skipped
    assert rows[0][4:] == ["0.00", f"{0.5 * (1 - 0.2 / 3):.2f}", f"{0.5 * (1 + 0.2 / 3):.2f}", "0.00"]
    # step 5 of 10: progress 0.5, factor (1 - 0.5)^2
    assert rows[1][5] == f"{0.25 * 0.5 * (1 - 0.2 / 3):.2f}"
    res = runner.invoke(app, ["plan", str(sched), "--layers", "4", "--steps", "10", "--stage", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    assert "step  stage" not in res.output  # no table begun before the error


def test_evaluate_command_writes_json(tmp_path, shapes_dir, monkeypatch):
    runner.invoke(app, ["make-model", "test", str(tmp_path / "m")])
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate", str(tmp_path / "m"), "--data", str(shapes_dir["instruction_eval"]),
                              "--images", str(shapes_dir["images"].parent), "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["samples"] == 4 and result["answered"] == 4 * 5 and result["eval_loss"] > 0
    assert len(result["outcomes"]) == 20 and "outcomes" not in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nothing"), "--data", str(shapes_dir["instruction_eval"])])
    assert res.exit_code == 2 and "not a model folder" in res.output
    # bad data is refused before the model is loaded
    import sts_train.modelio

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(sts_train.modelio, "load_model", no_load)
    res = runner.invoke(app, ["evaluate", str(tmp_path / "m"), "--data", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and str(tmp_path / "missing.json") in res.output and "Traceback" not in res.output


def test_make_model_never_replaces_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["make-model", "test", ".", "--overwrite"])
    assert res.exit_code == 2 and ".: is or contains the current folder; choose a new folder" in res.output
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_evaluate_and_plan_check_their_flags_first(tmp_path):
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"schema_version": 1, "stages": [{"name": "instruction", "tokens": {
        "method": "uniform", "keep_ratio": 0.5}}]}))
    res = runner.invoke(app, ["plan", str(sched), "--layers", "4", "--steps", "0"])
    assert res.exit_code == 2 and "--steps 0: must be >= 1" in res.output
    res = runner.invoke(app, ["plan", str(sched), "--layers", "0", "--steps", "5"])
    assert res.exit_code == 2 and "--layers 0: must be >= 1 (the model's decoder layers)" in res.output
    res = runner.invoke(app, ["plan", str(sched), "--layers", "4", "--steps", "5", "--every", "-1"])
    assert res.exit_code == 2 and "--every -1: must be >= 1, or 0" in res.output
    # no model is loaded: the flags are refused before the evaluation starts
    res = runner.invoke(app, ["evaluate", str(tmp_path / "none"), "--data", str(sched), "--limit", "0"])
    assert res.exit_code == 2 and "--limit 0: must be >= 1" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "none"), "--data", str(sched), "--device", "tpu"])
    assert res.exit_code == 2 and "--device 'tpu' is not known; use cpu, cuda or cuda:N" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "none"), "--data", str(sched), "--json", str(tmp_path)])
    assert res.exit_code == 2 and f"{tmp_path}: is a folder; pass a file path, e.g. {tmp_path / 'eval.json'}" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "none"), "--data", str(sched), "--json", str(sched / "x.json")])
    assert res.exit_code == 2 and f"{sched / 'x.json'}: {sched} is a file, not a folder" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "none"), "--data", str(sched), "--json", str(sched)])
    assert res.exit_code == 2 and f"{sched}: file exists; choose another path or pass --overwrite" in res.output
    assert sched.read_text().startswith("schema_version: 1")


def test_overwrite_refuses_a_symbolic_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    res = runner.invoke(app, ["make-model", "test", str(tmp_path / "link"), "--overwrite"])
    assert res.exit_code == 2 and f"{tmp_path / 'link'}: is a symbolic link; pass the folder it points to" in res.output
    assert (tmp_path / "real" / "keep.txt").read_text() == "keep"


def test_make_data_names_the_option_of_a_bad_count(tmp_path):
    for flag, value, least in (("--n-alignment", "-1", 0), ("--n-eval", "-3", 0), ("--image-size", "8", 16)):
        res = runner.invoke(app, ["make-data", str(tmp_path / "d"), flag, value])
        assert res.exit_code == 2 and res.output.strip() == f"error: {flag} {value}: must be an integer >= {least}"
        assert not (tmp_path / "d").exists()


def test_overwrite_replaces_only_what_the_tool_wrote(tmp_path):
    # a folder of notes, or one whose record has the tool's file name but not its content (a Hugging
    # Face `datasets` folder also has a dataset_info.json)
    for command, record in ((["make-data"], "dataset_info.json"), (["make-model", "test"], "config.json")):
        for name, content in (("notes", None), ("other", '{"citation": ""}')):
            folder = tmp_path / f"{command[0]}-{name}"
            (folder / "notes").mkdir(parents=True)
            (folder / "notes" / "thesis.txt").write_text("keep")
            if content is not None:
                (folder / record).write_text(content)
            res = runner.invoke(app, [*command, str(folder), "--overwrite"])
            assert res.exit_code == 2 and "holds files but no" in res.output and "--overwrite would delete them" in res.output
            assert (folder / "notes" / "thesis.txt").read_text() == "keep"
    # what make-data wrote, it replaces
    data = tmp_path / "d"
    sizes = ["--n-alignment", "1", "--n-instruction", "1", "--n-eval", "1", "--image-size", "16"]
    assert runner.invoke(app, ["make-data", str(data), *sizes]).exit_code == 0
    res = runner.invoke(app, ["make-data", str(data), "--overwrite", *sizes, "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads((data / "dataset_info.json").read_text())["seed"] == 3


def test_output_under_a_file_or_unwritable_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["make-data", str(tmp_path / "afile" / "sub")])
    assert res.exit_code == 2 and f"{tmp_path / 'afile'} is a file, not a folder; choose another path" in res.output
    res = runner.invoke(app, ["make-model", "test", str(tmp_path / "afile" / "sub")])
    assert res.exit_code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in res.output
    from sts_train.configtools import atomic_write_text
    from sts_train.errors import StsError
    with pytest.raises(StsError, match=r"^/proc/nonexistent/x.json: cannot write"):
        atomic_write_text("/proc/nonexistent/x.json", "x")


def test_run_config_refuses_non_finite_numbers_and_mixed_key_types(tmp_path):
    from sts_train.config import load_run_config
    from sts_train.errors import StsError

    base = {"model": {"size": "test"}, "data": {"json": "d.json"}, "output_dir": str(tmp_path / "run")}
    for key, value in (("learning_rate", float("nan")), ("num_train_epochs", float("inf")), ("weight_decay", "inf")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({**base, "training": {key: value}}))
        with pytest.raises(StsError, match=rf"training.{key} = .* is not a finite number; give a finite value"):
            load_run_config(path)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(base) + "training: {max_steps: 5, on: 1, foo: 2}\n")
    with pytest.raises(StsError, match="training.True: unknown key"):
        load_run_config(path)


def test_schedule_numbers_in_exponent_form_without_a_dot(tmp_path):
    """YAML 1.1 reads 5e-1 as a string; the run config accepts it, so the schedule does too."""
    sched = tmp_path / "s.yaml"
    sched.write_text("schema_version: 1\nstages:\n- name: instruction\n  tokens: {method: uniform, keep_ratio: 5e-1}\n")
    res = runner.invoke(app, ["plan", str(sched), "--layers", "4", "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1].split()[:4] == ["0", "instruction", "uniform", "0.500"]
    sched.write_text(sched.read_text().replace("5e-1", "half"))
    res = runner.invoke(app, ["plan", str(sched), "--layers", "4", "--steps", "2"])
    assert res.exit_code == 2 and "'half' is not a number" in res.output
