"""The whole recipe at the test size: train -> analyze -> schedule -> sparse train -> evaluate -> report."""

import json

import pytest
from typer.testing import CliRunner

from sts_profile.cli import app
from sts_train.schedule import load_schedule

pytestmark = pytest.mark.slow


def test_recipe_end_to_end_test_size(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    res = CliRunner().invoke(app, ["recipe", "--size", "test", "--work", str(work), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    # both runs trained both stages from checkpoints the dense analysis saw
    for run in ("dense", "sparse"):
        for stage, steps in (("alignment", 6), ("instruction", 8)):
            assert (work / run / stage / f"checkpoint-{steps}" / "model.safetensors").is_file()
    dense_log = [json.loads(x) for x in (work / "dense" / "instruction" / "sts_log.jsonl").read_text().splitlines()]
    sparse_log = [json.loads(x) for x in (work / "sparse" / "instruction" / "sts_log.jsonl").read_text().splitlines()]
    assert all(r["flops"] == r["dense_flops"] and not r["skipped_layers"] for r in dense_log)
    schedule = load_schedule(out / "schedule.yaml")
    assert {s.name for s in schedule.stages} == {"alignment", "instruction"}
    # the sparse run did what the schedule says at each step
    for r in sparse_log:
        plan = schedule.plan(r["step"], num_layers=2, stage="instruction", total_steps=8)
        assert r["keep_ratio"] == pytest.approx(plan.keep_ratio)
        assert set(r["skipped_layers"]) <= {i for i, p in enumerate(plan.skip_prob) if p > 0}
    flops_saved = 1 - sum(r["flops"] for r in sparse_log) / sum(r["flops"] for r in dense_log)
    assert summary["stages"]["instruction"]["flops_saved_frac"] == pytest.approx(flops_saved)
    q = summary["quality"]
    for run in ("dense", "sparse"):
        assert q[run]["answered"] == 8 * 5 and 0.0 <= q[run]["answer_accuracy"] <= 1.0
        assert q[run]["eval_loss_qa"] > 0 and q[run]["eval_loss_captions"] > 0
    # the no-model guesser, scored on the same questions from the same data
    from sts_train.data import load_llava_json
    from sts_train.evaluate import prior_accuracy
    prior = prior_accuracy(load_llava_json(work / "data" / "instruction.json"),
                           load_llava_json(work / "data" / "instruction_eval.json"))
    assert q["prior"] == prior and q["prior"]["answered"] == 8 * 5
    diff = q["accuracy_difference"]  # paired by answer: the plain difference of the accuracies
    assert diff["paired"] == 40
    assert diff["difference"] == pytest.approx(q["sparse"]["answer_accuracy"] - q["dense"]["answer_accuracy"])
    assert "outcomes" not in q["dense"]
    page = (out / "index.html").read_text()
    assert "answer prior (no model)" in page and f"{100 * prior['answer_accuracy']:.1f}%" in page
    assert "Dense vs stage-aware sparse training" in page and "schema_version: 1" in page
    assert (out / "wall_time.png").stat().st_size > 1000 and list((out / "plots").glob("redundancy_*.png"))
    assert set(summary["phases_s"]) >= {"data", "dense alignment", "analyze", "sparse instruction", "evaluate sparse"}


def test_recipe_refuses_existing_work_folder(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine.txt").write_text("keep")
    res = CliRunner().invoke(app, ["recipe", "--size", "test", "--work", str(tmp_path / "work"),
                                   "--out", str(tmp_path / "report")])
    assert res.exit_code == 2
    assert "--work " + str(tmp_path / "work") + ": folder is not empty; choose another folder or pass --overwrite" in res.output
    assert (tmp_path / "work" / "mine.txt").read_text() == "keep"
    # --overwrite replaces only a recipe's own folders: not one that holds something else
    for option, name, what in (("--work", "work", "recipe run"), ("--out", "report", "recipe report")):
        other = "report" if name == "work" else "work2"
        (tmp_path / name / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "mine.txt").write_text("keep")
        (tmp_path / name / "data" / "dataset_info.json").write_text("{}")  # another tool's data (LLaMA-Factory)
        (tmp_path / name / "summary.json").write_text("{}")
        res = CliRunner().invoke(app, ["recipe", "--size", "test", option, str(tmp_path / name),
                                       "--work" if option == "--out" else "--out", str(tmp_path / other),
                                       "--overwrite"])
        assert res.exit_code == 2
        assert f"{tmp_path / name}: holds files but no {what}, and --overwrite would delete them" in res.output
        assert (tmp_path / name / "mine.txt").read_text() == "keep"
    # nor a recipe's folder that also holds something else (the work folder's own data set is
    # what marks it as a recipe's)
    from sts_train.shapes import generate_shapes
    work, out = tmp_path / "work3", tmp_path / "report3"
    generate_shapes(work / "data", n_alignment=1, n_instruction=1, n_eval=1, image_size_px=16, seed=0)
    out.mkdir()
    (out / "summary.json").write_text('{"end_to_end": {}}')
    for folder, option in ((work, "--work"), (out, "--out")):
        (folder / "mymodel").mkdir()
        res = CliRunner().invoke(app, ["recipe", "--size", "test", "--work", str(work), "--out", str(out),
                                       "--overwrite"])
        assert res.exit_code == 2 and f"{option} {folder}: --overwrite would also delete mymodel, which the recipe" \
            " did not write; move it out or choose another folder" in res.output
        assert (folder / "mymodel").is_dir() and (work / "data" / "dataset_info.json").is_file()
        (folder / "mymodel").rmdir()


@pytest.mark.parametrize("args, message", [
    (["--policy", "paper", "--target-speedup", "2"], "--target-speedup does not apply to --policy paper"),
    (["--alignment-steps", "0"], "--alignment-steps = 0 must be an integer >= 1"),
    (["--size", "giant"], "unknown model size 'giant'"),
    (["--out", "WORK/report"], "overlap (writing the report replaces --out); choose two separate folders"),
])
def test_recipe_checks_its_options_before_touching_folders(tmp_path, args, message):
    for name in ("work", "report"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "earlier.txt").write_text("keep")
    args = [a.replace("WORK", str(tmp_path / "work")) for a in args]
    res = CliRunner().invoke(app, ["recipe", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report"),
                                   "--overwrite", *args])
    assert res.exit_code == 2 and message in res.output
    assert all((tmp_path / name / "earlier.txt").read_text() == "keep" for name in ("work", "report"))


def test_recipe_with_the_paper_formula_needs_no_budget(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    res = CliRunner().invoke(app, ["recipe", "--size", "test", "--policy", "paper", "--work", str(work),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    schedule = load_schedule(out / "schedule.yaml")
    assert schedule.source["policy"] == "paper"
    logs = {stage: [json.loads(x) for x in (work / "sparse" / stage / "sts_log.jsonl").read_text().splitlines()]
            for stage in ("alignment", "instruction")}
    # the formula: alignment pools to a quarter of the 16 tokens per image; instruction skips
    # layers, but a 2-layer model has only its never-skipped first and last
    assert all(r["keep_ratio"] == 0.25 and 4 * r["kept_visual_tokens"] == r["dense_visual_tokens"]
               for r in logs["alignment"])
    assert all(r["keep_ratio"] == 1.0 and r["skipped_layers"] == [] for r in logs["instruction"])
    assert json.loads((out / "summary.json").read_text())["config"]["target_speedup"] is None


def test_recipe_budget_defaults_to_a_2x_target_for_the_profile_policy_only():
    from sts_profile.recipe import RecipeConfig

    assert RecipeConfig().target_speedup == 2.0
    assert RecipeConfig(policy="paper").target_speedup is None
    assert RecipeConfig(max_loss_increase=0.1).target_speedup is None
