"""Tests for the schedule contract: validation messages, plan numbers, round trips, sampling.

Run: PYTHONPATH=. .venv/bin/pytest tests/test_schedule.py -q
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from sts_train.errors import ScheduleError
from sts_train.schedule import (
    DECAY_CURVES,
    LAYER_POLICIES,
    SCHEMA_VERSION,
    TOKEN_METHODS,
    LayerSparsity,
    Schedule,
    Stage,
    StepPlan,
    StepRange,
    TokenSparsity,
    dump_schedule,
    load_schedule,
    sample_skipped_layers,
)

EXAMPLE_YAML = """\
schema_version: 1
source:
  tool: sts-profile
stages:
  - name: alignment
    steps: {start: 0, end: 400}
    tokens:
      method: uniform
      keep_ratio: 0.25
      keep_ratio_end: 0.5
      curve: linear
    layers: null
  - name: instruction
    steps: {start: 400, end: 1000}
    tokens: null
    layers:
      policy: paper
      alpha: 0.5
      eps: 0.2
      never_skip: [0, -1]
"""


def ranged() -> dict:
    """The spec's example (ranged), as plain data; each test gets a fresh copy."""
    return yaml.safe_load(EXAMPLE_YAML)


def unranged() -> dict:
    return {
        "schema_version": 1,
        "source": {"tool": "test", "metrics": {"auc": 0.9}},
        "stages": [
            {"name": "finetune", "tokens": {"method": "merge", "keep_ratio": 0.5}},
            {"name": "other", "layers": {"policy": "per_layer", "skip_prob": [0.0, 0.3, 0.4, 0.1],
                                         "decay": "quadratic", "never_skip": [0]}},
        ],
    }


def paper_schedule(never_skip=(0, -1)) -> Schedule:
    layers = {"policy": "paper", "alpha": 0.5, "eps": 0.2, "never_skip": list(never_skip)}
    return Schedule.from_dict({"schema_version": 1, "stages": [
        {"name": "s", "steps": {"start": 0, "end": 100}, "layers": layers}]})


# --- accepted ---------------------------------------------------------------------------------

def test_example_accepted_with_defaults():
    s = Schedule.from_dict(ranged())
    assert s.schema_version == SCHEMA_VERSION == 1
    assert s.source == {"tool": "sts-profile"}
    assert [st.name for st in s.stages] == ["alignment", "instruction"]
    assert s.stages[0].steps == StepRange(0, 400)
    assert s.stages[0].tokens == TokenSparsity("uniform", 0.25, 0.5, "linear")
    assert s.stages[1].layers == LayerSparsity("paper", alpha=0.5, eps=0.2, never_skip=(0, -1))
    assert s.stages[1].layers.decay == "quadratic"
    assert s.ranged


def test_defaults_filled():
    s = Schedule.from_dict(unranged())
    tokens = s.stage_named("finetune").tokens
    assert (tokens.keep_ratio_end, tokens.curve) == (0.5, "constant")
    layers = LayerSparsity.from_dict({"policy": "per_layer", "skip_prob": [0.1, 0.2]})
    assert layers.decay == "linear" and layers.never_skip == (0, -1)
    assert layers.skip_prob == (0.1, 0.2)
    assert not s.ranged


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_every_token_method_accepted(method):
    assert TokenSparsity.from_dict({"method": method, "keep_ratio": 1}).keep_ratio == 1.0


def test_registries():
    assert TOKEN_METHODS == ("uniform", "random", "text_guided", "merge")
    assert LAYER_POLICIES == ("paper", "per_layer")
    values = {name: [f(x) for x in (0.0, 0.25, 0.5, 1.0)] for name, f in DECAY_CURVES.items()}
    assert values["constant"] == [1.0, 1.0, 1.0, 1.0]
    assert values["linear"] == [1.0, 0.75, 0.5, 0.0]
    assert values["quadratic"] == [1.0, 0.5625, 0.25, 0.0]
    assert values["cosine"] == pytest.approx([1.0, 0.8535533905932737, 0.5, 0.0], abs=1e-12)


def test_source_is_free_form_and_optional():
    d = unranged()
    d["source"] = {"checkpoints": ["a", "b"], "budget": {"flops": 1e18}, "nested": [{"x": 1}]}
    assert Schedule.from_dict(d).source == d["source"]
    del d["source"]
    assert Schedule.from_dict(d).source == {}


def test_stages_with_gaps_accepted():
    d = ranged()
    d["stages"][1]["steps"] = {"start": 500, "end": 1000}
    assert Schedule.from_dict(d).stage_at(450) is None


# --- rejected ---------------------------------------------------------------------------------

_DELETE = object()


def _set(path, value):
    """A fresh ranged example with ``path`` ("stages.1.tokens.keep_ratio") set to ``value``.

    ``value`` of ``_DELETE`` removes the key instead.
    """
    d = ranged()
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = d
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return d


BAD = [
    # (description, data, message regex)
    ("unknown token key", _set("stages.1.tokens", {"method": "uniform", "keep_rato": 0.5}),
     r"schedule\.stages\[1\]\.tokens\.keep_rato is not a known key; did you mean keep_ratio\?"
     r" allowed keys: method, keep_ratio, keep_ratio_end, curve"),
    ("unknown top key", _set("stagez", []), r"schedule\.stagez is not a known key.*allowed keys: "
     r"schema_version, source, stages"),
    ("unknown stage key", _set("stages.0.token", None), r"schedule\.stages\[0\]\.token is not a known"),
    ("unknown layer key", _set("stages.1.layers.beta", 1), r"schedule\.stages\[1\]\.layers\.beta is not"),
    ("missing schema_version", _set("schema_version", _DELETE),
     r"schedule\.schema_version is missing; add `schema_version: 1`"),
    ("future schema_version", _set("schema_version", 7),
     r"^schedule\.schema_version = 7 is newer than this sts version supports \(1\); upgrade sts$"),
    ("future schema wins over unknown keys", {"schema_version": 2, "stages": [], "new_thing": 1},
     r"schedule\.schema_version = 2 is newer"),
    ("schema_version as text", _set("schema_version", "1"),
     r"schedule\.schema_version = '1' is not an integer"),
    ("schema_version zero", _set("schema_version", 0), r"schedule\.schema_version = 0 is below 1"),
    ("source not a mapping", _set("source", ["a"]), r"schedule\.source must be a mapping \(got list\)"),
    ("top not a mapping", [1, 2], r"schedule must be a mapping"),
    ("no stages", _set("stages", []), r"schedule\.stages must be a non-empty list"),
    ("stage not a mapping", _set("stages.0", "alignment"),
     r"schedule\.stages\[0\] must be a mapping .*\(got str\)"),
    ("stage without name", _set("stages.0.name", _DELETE), r"schedule\.stages\[0\]\.name is missing"),
    ("empty name", _set("stages.0.name", ""), r"schedule\.stages\[0\]\.name = '' is empty"),
    ("duplicate name", _set("stages.1.name", "alignment"),
     r"schedule\.stages\[1\]\.name = 'alignment' repeats stages\[0\]\.name; give each stage a unique"),
    ("some stages without steps", _set("stages.1.steps", _DELETE),
     r"schedule\.stages\[1\]\.steps is missing .*give every stage steps or none"),
    ("negative start", _set("stages.0.steps.start", -1),
     r"schedule\.stages\[0\]\.steps\.start = -1 is below 0"),
    ("end not after start", _set("stages.0.steps", {"start": 10, "end": 10}),
     r"schedule\.stages\[0\]\.steps\.end = 10 is not after start = 10; make end > start"),
    ("float step", _set("stages.0.steps.end", 400.5),
     r"schedule\.stages\[0\]\.steps\.end = 400\.5 is not an integer"),
    ("steps missing end", _set("stages.0.steps", {"start": 0}),
     r"schedule\.stages\[0\]\.steps\.end is missing"),
    ("overlapping", _set("stages.1.steps.start", 300),
     r"schedule\.stages\[1\]\.steps\.start = 300 of stage 'instruction' is inside stages\[0\] 'alignment'"
     r" \(steps \[0, 400\)\): stages are overlapping; start it at 400 or later"),
    ("unordered", _set("stages.0.steps", {"start": 500, "end": 600}),
     r"schedule\.stages\[1\]\.steps\.start = 400 of stage 'instruction' comes before stages\[0\] "
     r"'alignment' \(steps \[500, 600\)\): stages are unordered; list stages in step order"),
    ("keep_ratio zero", _set("stages.0.tokens.keep_ratio", 0),
     r"schedule\.stages\[0\]\.tokens\.keep_ratio = 0\.0 is outside \(0, 1\]; write a number in \(0, 1\]"),
    ("keep_ratio above 1", _set("stages.0.tokens.keep_ratio", 1.5),
     r"schedule\.stages\[0\]\.tokens\.keep_ratio = 1\.5 is outside \(0, 1\]"),
    ("keep_ratio_end above 1", _set("stages.0.tokens.keep_ratio_end", 1.01),
     r"schedule\.stages\[0\]\.tokens\.keep_ratio_end = 1\.01 is outside \(0, 1\]"),
    ("keep_ratio text", _set("stages.0.tokens.keep_ratio", "half"),
     r"schedule\.stages\[0\]\.tokens\.keep_ratio = 'half' is not a number"),
    ("keep_ratio bool", _set("stages.0.tokens.keep_ratio", True), r"keep_ratio = True is not a number"),
    ("keep_ratio nan", _set("stages.0.tokens.keep_ratio", float("nan")), r"keep_ratio = nan is outside"),
    ("tokens missing method", _set("stages.0.tokens.method", _DELETE),
     r"schedule\.stages\[0\]\.tokens\.method is missing"),
    ("unknown method", _set("stages.0.tokens.method", "prune"),
     r"schedule\.stages\[0\]\.tokens\.method = 'prune' is not known; use one of: uniform, random, "
     r"text_guided, merge"),
    ("unknown curve", _set("stages.0.tokens.curve", "exp"),
     r"tokens\.curve = 'exp' is not known; use one of: constant, linear, quadratic, cosine"),
    ("tokens not a mapping", _set("stages.0.tokens", 0.5),
     r"schedule\.stages\[0\]\.tokens must be a mapping"),
    ("unknown policy", _set("stages.1.layers.policy", "random"),
     r"schedule\.stages\[1\]\.layers\.policy = 'random' is not known; use one of: paper, per_layer"),
    ("alpha too big", _set("stages.1.layers.alpha", 0.9),
     r"schedule\.stages\[1\]\.layers\.alpha = 0\.9 with eps = 0\.2 gives alpha\*\(1\+\|eps\|\) = 1\.08"
     r" >= 1, .*lower alpha or \|eps\|"),
    ("alpha exactly at limit", _set("stages.1.layers", {"policy": "paper", "alpha": 0.5, "eps": 1.0}),
     r"alpha\*\(1\+\|eps\|\) = 1 >= 1"),
    ("negative alpha", _set("stages.1.layers.alpha", -0.1), r"layers\.alpha = -0\.1 is outside \[0, inf\)"),
    ("eps out of range", _set("stages.1.layers.eps", 1.5), r"layers\.eps = 1\.5 is outside \[-1, 1\]"),
    ("paper without eps", _set("stages.1.layers.eps", _DELETE),
     r"schedule\.stages\[1\]\.layers\.eps is missing; policy paper needs it"),
    ("paper with skip_prob", _set("stages.1.layers.skip_prob", [0.1]),
     r"layers\.skip_prob is not used by policy paper; remove it"),
    ("paper with other decay", _set("stages.1.layers.decay", "linear"),
     r"layers\.decay = 'linear' does not apply to policy paper"),
    ("per_layer with alpha", 
     _set("stages.1.layers", {"policy": "per_layer", "skip_prob": [0.1], "alpha": 0.1}),
     r"layers\.alpha is not used by policy per_layer"),
    ("per_layer without skip_prob", _set("stages.1.layers", {"policy": "per_layer"}),
     r"layers\.skip_prob is missing; policy per_layer needs it"),
    ("skip_prob of 1", _set("stages.1.layers", {"policy": "per_layer", "skip_prob": [0.1, 1.0]}),
     r"schedule\.stages\[1\]\.layers\.skip_prob\[1\] = 1\.0 is outside \[0, 1\)"),
    ("negative skip_prob", _set("stages.1.layers", {"policy": "per_layer", "skip_prob": [-0.1]}),
     r"skip_prob\[0\] = -0\.1 is outside \[0, 1\)"),
    ("skip_prob not a list", _set("stages.1.layers", {"policy": "per_layer", "skip_prob": 0.3}),
     r"layers\.skip_prob = 0\.3 is not a list; write e\.g\. \[0\.0, 0\.3\]"),
    ("unknown decay", _set("stages.1.layers", {"policy": "per_layer", "skip_prob": [0.1], "decay": "step"}),
     r"layers\.decay = 'step' is not known; use one of: constant, linear, quadratic, cosine"),
    ("never_skip float", _set("stages.1.layers.never_skip", [0, 1.5]),
     r"schedule\.stages\[1\]\.layers\.never_skip\[1\] = 1\.5 is not an integer"),
    ("never_skip scalar", _set("stages.1.layers.never_skip", 0), r"layers\.never_skip = 0 is not a list"),
]


@pytest.mark.parametrize("data, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_schedule_rejected(data, message):
    with pytest.raises(ScheduleError, match=message) as info:
        Schedule.from_dict(data)
    assert "\n" not in str(info.value)


def test_direct_construction_validates_too():
    with pytest.raises(ScheduleError, match=r"^TokenSparsity\.keep_ratio = 2\.0 is outside \(0, 1\]"):
        TokenSparsity("uniform", 2.0)
    with pytest.raises(ScheduleError, match=r"^StepRange\.end = 3 is not after start = 5"):
        StepRange(5, 3)
    with pytest.raises(ScheduleError, match=r"^Schedule\.stages\[1\]\.name = 'a' repeats"):
        Schedule(1, {}, (Stage("a"), Stage("a")))
    with pytest.raises(ScheduleError, match=r"^Stage\.tokens is a dict, not a TokenSparsity"):
        Stage("a", tokens={"method": "uniform", "keep_ratio": 0.5})


# --- model checks -----------------------------------------------------------------------------

def test_check_model_skip_prob_length():
    s = Schedule.from_dict(unranged())
    s.check_model(4)
    with pytest.raises(ScheduleError, match=(
            r"^schedule\.stages\[1\]\.layers\.skip_prob \(stage 'other'\) has 4 entries but the model"
            r" has 32 layers; give exactly one probability per layer \(32 values\)$")):
        s.check_model(32)
    with pytest.raises(
            ScheduleError, match=r"skip_prob \(stage .other.\) has 4 entries but the model has 3 layers"):
        s.plan(0, num_layers=3, stage="other", total_steps=10)


@pytest.mark.parametrize("index", [4, -5])
def test_check_model_never_skip_out_of_range(index):
    s = paper_schedule(never_skip=(0, index))
    with pytest.raises(ScheduleError, match=(
            rf"schedule\.stages\[0\]\.layers\.never_skip\[1\] \(stage 's'\) = {index} is out of range"
            r" for a model with 4 layers; use indices in \[-4, 3\]")):
        s.check_model(4)
    with pytest.raises(ScheduleError, match=r"never_skip\[1\]"):
        s.plan(0, num_layers=4)
    paper_schedule(never_skip=(0, index)).check_model(8)  # fine for a bigger model


# --- plans ------------------------------------------------------------------------------------

def test_paper_plan_hand_computed():
    s = paper_schedule()
    # step 0, x = 0: p_l = 0.5 * 1 * (1 + 0.2 * (2l - 3) / 3); layers 0 and 3 never skipped.
    p0 = s.plan(0, num_layers=4)
    assert p0.stage == "s" and p0.progress == 0.0
    assert p0.skip_prob == pytest.approx((0.0, 0.4666666666666667, 0.5333333333333333, 0.0), abs=1e-12)
    # step 50, x = 0.5: (1 - x)**2 = 0.25 -> 0.125 * (1 -/+ 0.2/3)
    p50 = s.plan(50, num_layers=4)
    assert p50.progress == 0.5
    assert p50.skip_prob == pytest.approx((0.0, 0.11666666666666667, 0.13333333333333333, 0.0), abs=1e-12)
    assert p50.keep_ratio == 1.0 and p50.method is None and not p50.dense


def test_paper_plan_without_never_skip():
    s = paper_schedule(never_skip=())
    # step 0: 0.5 * (1 - 0.2), 0.5 * (1 - 0.2/3), 0.5 * (1 + 0.2/3), 0.5 * (1 + 0.2)
    assert s.plan(0, num_layers=4).skip_prob == pytest.approx(
        (0.4, 0.4666666666666667, 0.5333333333333333, 0.6), abs=1e-12)
    # step 75, x = 0.75: (0.25)**2 = 0.0625 -> 0.03125 * (0.8, 0.9333.., 1.0666.., 1.2)
    assert s.plan(75, num_layers=4).skip_prob == pytest.approx(
        (0.025, 0.029166666666666667, 0.03333333333333333, 0.0375), abs=1e-12)
    # one layer: the bracket is 1
    assert s.plan(50, num_layers=1).skip_prob == pytest.approx((0.125,), abs=1e-12)


def test_paper_plan_negative_eps_skips_early_layers_more():
    layers = LayerSparsity("paper", alpha=0.4, eps=-0.5, never_skip=())
    assert layers.skip_prob_at(0.0, 3) == pytest.approx((0.6, 0.4, 0.2), abs=1e-12)


def test_token_keep_ratio_linear():
    s = Schedule.from_dict(ranged())
    # keep_ratio 0.25 -> 0.5 over [0, 400): 0.5 + (0.25 - 0.5) * (1 - x)
    expected = {0: 0.25, 100: 0.3125, 200: 0.375, 300: 0.4375, 399: 0.499375}
    for step, keep in expected.items():
        plan = s.plan(step, num_layers=4)
        assert plan.stage == "alignment" and plan.method == "uniform"
        assert plan.keep_ratio == pytest.approx(keep, abs=1e-12), step
        assert plan.skip_prob == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("curve, x, keep", [
    ("constant", 0.5, 0.25), ("quadratic", 0.5, 0.4375), ("cosine", 0.5, 0.375), ("cosine", 1.0, 0.5)])
def test_token_keep_ratio_other_curves(curve, x, keep):
    tokens = TokenSparsity("random", 0.25, 0.5, curve)
    assert tokens.keep_ratio_at(x) == pytest.approx(keep, abs=1e-12)


def test_per_layer_decay_with_total_steps():
    s = Schedule.from_dict(unranged())
    # skip_prob [0, .3, .4, .1] * (1 - x)**2, layer 0 never skipped
    assert s.plan(0, num_layers=4, stage="other", total_steps=200).skip_prob == pytest.approx(
        (0.0, 0.3, 0.4, 0.1), abs=1e-12)
    plan = s.plan(100, num_layers=4, stage="other", total_steps=200)
    assert plan.progress == 0.5 and plan.stage == "other"
    assert plan.skip_prob == pytest.approx((0.0, 0.075, 0.1, 0.025), abs=1e-12)
    assert s.plan(150, num_layers=4, stage="other", total_steps=200).skip_prob == pytest.approx(
        (0.0, 0.01875, 0.025, 0.00625), abs=1e-12)
    # past total_steps progress is clipped to 1
    late = s.plan(500, num_layers=4, stage="other", total_steps=200)
    assert late.progress == 1.0 and late.dense


def test_per_layer_linear_default_decay():
    layers = LayerSparsity("per_layer", skip_prob=(0.2, 0.4, 0.8), never_skip=(-1,))
    assert layers.skip_prob_at(0.25, 3) == pytest.approx((0.15, 0.3, 0.0), abs=1e-12)


def test_named_unranged_stage_tokens():
    s = Schedule.from_dict(unranged())
    plan = s.plan(30, num_layers=2, stage="finetune", total_steps=100)
    assert plan == StepPlan("finetune", 30, 0.3, "merge", 0.5, (0.0, 0.0))
    assert not plan.dense


def test_dense_outside_ranges_and_in_dense_stage():
    d = ranged()
    d["stages"][1]["steps"] = {"start": 500, "end": 1000}
    s = Schedule.from_dict(d)
    for step in (450, 1000, 5000):
        plan = s.plan(step, num_layers=4)
        assert plan == StepPlan(None, step, 0.0, None, 1.0, (0.0,) * 4) and plan.dense
    plan = s.plan(750, num_layers=4)
    assert plan.stage == "instruction" and plan.progress == 0.5


def test_named_ranged_stage_uses_global_step():
    s = Schedule.from_dict(ranged())
    plan = s.plan(700, num_layers=4, stage="instruction")  # x = 300/600 = 0.5
    assert plan.progress == 0.5
    assert plan.skip_prob == pytest.approx((0.0, 0.11666666666666667, 0.13333333333333333, 0.0))
    assert s.plan(100, num_layers=4, stage="instruction").progress == 0.0  # clipped


def test_stage_lookup():
    s = Schedule.from_dict(ranged())
    assert s.stage_at(0).name == "alignment" and s.stage_at(399).name == "alignment"
    assert s.stage_at(400).name == "instruction" and s.stage_at(1000) is None
    assert s.stage_named("instruction") is s.stages[1]
    with pytest.raises(
            ScheduleError, match=r"no stage named 'pretrain'; available stages: alignment, instruction"):
        s.stage_named("pretrain")
    with pytest.raises(ScheduleError, match=r"available stages: alignment, instruction"):
        s.plan(0, num_layers=4, stage="pretrain")
    with pytest.raises(ScheduleError, match=r"no steps ranges; pick a stage by name"):
        Schedule.from_dict(unranged()).stage_at(0)


def test_plan_needs_stage_name_or_total_steps():
    s = Schedule.from_dict(unranged())
    with pytest.raises(
            ScheduleError, match=r"2 stages without steps ranges \(finetune, other\); pass a stage name"):
        s.plan(0, num_layers=4)
    with pytest.raises(
            ScheduleError, match=r"stage 'other' has no steps range, so its progress needs total_steps"):
        s.plan(0, num_layers=4, stage="other")
    one = unranged()
    del one["stages"][1]
    assert Schedule.from_dict(one).plan(50, num_layers=4, total_steps=100).stage == "finetune"
    with pytest.raises(ScheduleError, match=r"plan\.step = -1 is below 0; write an integer >= 0"):
        s.plan(-1, num_layers=4, stage="other", total_steps=10)
    with pytest.raises(ScheduleError, match=r"plan\.num_layers = 0 is below 1"):
        s.plan(0, num_layers=0, stage="other", total_steps=10)


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [ranged, unranged])
def test_round_trip_dict(make):
    s = Schedule.from_dict(make())
    assert Schedule.from_dict(s.to_dict()) == s
    assert Schedule.from_dict(copy.deepcopy(s.to_dict())).to_dict() == s.to_dict()


@pytest.mark.parametrize("make", [ranged, unranged])
def test_round_trip_file(tmp_path, make):
    s = Schedule.from_dict(make())
    path = dump_schedule(s, tmp_path / "out" / "schedule.yaml")
    assert load_schedule(path) == s
    text = path.read_text()
    assert text.startswith("schema_version: 1\nsource:")  # key order kept, not sorted
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left behind


def test_dump_flow_lists(tmp_path):
    s = Schedule.from_dict(unranged())
    text = dump_schedule(s, tmp_path / "s.yaml").read_text()
    assert "skip_prob: [0.0, 0.3, 0.4, 0.1]" in text and "never_skip: [0]" in text


def test_dump_refuses_overwrite(tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text("keep me")
    s = Schedule.from_dict(ranged())
    with pytest.raises(
            ScheduleError, match=r"schedule\.yaml already exists; pass overwrite=True \(--overwrite\)"):
        dump_schedule(s, path)
    assert path.read_text() == "keep me"
    dump_schedule(s, path, overwrite=True)
    assert load_schedule(path) == s


def test_load_errors(tmp_path):
    with pytest.raises(ScheduleError, match=r": is a folder; pass the path of the schedule\.yaml inside it"):
        load_schedule(tmp_path)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ScheduleError, match=r"nope\.yaml: no such file; pass the path of a schedule\.yaml"):
        load_schedule(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema_version: 1\nstages: [\n  - name: a\n")
    with pytest.raises(
            ScheduleError, match=r"broken\.yaml: broken YAML at line \d+, column \d+: .*fix") as info:
        load_schedule(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ScheduleError, match=r"list\.yaml: top level is a list, not a mapping"):
        load_schedule(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ScheduleError, match=r"empty\.yaml: top level is empty"):
        load_schedule(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE_YAML.replace("keep_ratio: 0.25", "keep_rato: 0.25"))
    with pytest.raises(ScheduleError, match=(
            rf"^{re.escape(str(bad))}: schedule\.stages\[0\]\.tokens\.keep_rato is not a known key")):
        load_schedule(bad)


# --- sampling ---------------------------------------------------------------------------------

def test_sample_deterministic_and_step_dependent():
    probs = (0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0)
    first = sample_skipped_layers(probs, seed=3, step=10)
    assert first == sample_skipped_layers(list(probs), seed=3, step=10)
    assert list(first) == sorted(first) and not {0, 7} & set(first)
    draws = {sample_skipped_layers(probs, seed=3, step=s) for s in range(50)}
    assert len(draws) > 10
    assert sample_skipped_layers(probs, seed=4, step=10) != first or \
        sample_skipped_layers(probs, seed=4, step=11) != sample_skipped_layers(probs, seed=3, step=11)


def test_sample_frequency_matches_probability():
    probs = (0.0, 0.1, 0.3, 0.5, 0.9)
    counts = [0] * len(probs)
    for step in range(4000):
        for layer in sample_skipped_layers(probs, seed=0, step=step):
            counts[layer] += 1
    for p, count in zip(probs, counts):
        assert abs(count / 4000 - p) <= 0.03, (p, count)
    assert counts[0] == 0
