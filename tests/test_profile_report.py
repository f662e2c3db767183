"""Tests for the plots and the HTML report (sts_profile.plots, sts_profile.report).

Run: PYTHONPATH=. .venv/bin/pytest tests/test_profile_report.py -q
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sts_profile.derive import Budget, derive_schedule
from sts_profile.plots import caption, write_plots
from sts_profile.report import frozen_stages, key_numbers, write_report
from sts_train.flops import LayerDims, layer_flops_fwd
from test_profile_derive import NUM_LAYERS, NUM_VISUAL, _with_se, synthetic_tables

DIMS = LayerDims(256, 688, 4, 4, 64, 1000)
FROZEN_NOTE = "LLM frozen in stage alignment: layer statistics cannot change across its checkpoints"


@dataclass(frozen=True)
class FakeCheckpoint:
    """Stands in for the discovery's checkpoint record (a dataclass holding a Path)."""

    path: Path
    name: str
    step: int
    stage: str


def cost_table() -> pd.DataFrame:
    rows = []
    for seq_len in (128, 640):
        for layer in range(NUM_LAYERS):
            parts = layer_flops_fwd(seq_len, DIMS)
            for component in ("proj", "attention", "mlp"):
                rows.append((layer, component, seq_len, float(parts[component]), parts[component] * 1e-11))
        rows += [(-1, "vision_tower", seq_len, 3e9, 0.03), (-1, "lm_head", seq_len, 2.0 * seq_len * 256 * 1000, 0.001)]
    return pd.DataFrame(rows, columns=["layer", "component", "seq_len", "flops_fwd", "time_fwd_s"])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    layers, tokens = synthetic_tables()
    cost = cost_table()
    schedule = derive_schedule(layers, tokens, num_layers=NUM_LAYERS, num_visual_tokens=NUM_VISUAL,
                               budget=Budget(max_loss_increase=0.03), provenance={"tables": str(out)},
                               dims=DIMS, text_len=64)
    plots = write_plots(layers, tokens, cost, schedule, out / "plots", num_layers=NUM_LAYERS)
    ckpts = [FakeCheckpoint(Path("/runs/x") / c, c, s, g) for c, s, g in
             layers[["checkpoint", "step", "stage"]].drop_duplicates().itertuples(index=False)]
    page = write_report(out, layers=layers, tokens=tokens, cost=cost, schedule=schedule, plots=plots,
                        notes=["calibration: 8 samples"], checkpoints=ckpts)
    return out, layers, tokens, schedule, plots, page


def test_plots_written_and_openable(outputs):
    out, *_, plots, _ = outputs
    expected = {f"{kind}_{m}" for kind in ("redundancy", "heatmap")
                for m in ("block_influence", "angular_distance", "relative_update_norm", "skip_loss_delta", "skip_kl")}
    expected |= {"token_keep_ratio", "token_redundancy", "schedule_preview", "cost_per_layer"}
    assert set(plots) == expected
    for key, path in plots.items():
        assert path.parent == out / "plots" and path.name == f"{key}.png" and path.stat().st_size > 1000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not [p for p in (out / "plots").iterdir() if p.name.startswith(".")]   # no temp files left


def test_plots_skip_absent_data(tmp_path):
    layers, tokens = synthetic_tables()
    only = write_plots(layers[layers["metric"] == "block_influence"], None, None, None, tmp_path, NUM_LAYERS)
    assert set(only) == {"redundancy_block_influence", "heatmap_block_influence"}
    assert write_plots(None, pd.DataFrame(columns=tokens.columns), None, None, tmp_path / "empty", NUM_LAYERS) == {}
    no_compress = tokens[tokens["metric"] != "compress_loss_delta"]
    assert set(write_plots(None, no_compress, None, None, tmp_path / "t", NUM_LAYERS)) == {"token_redundancy"}


def test_report_page(outputs):
    out, layers, tokens, schedule, plots, page = outputs
    assert page == out / "report.html"
    text = page.read_text()
    for key, path in plots.items():
        assert f"src='plots/{path.name}'" in text                 # relative, so the folder can move
        assert html.escape(caption(key)) in text
    assert "Loss change when visual tokens are compressed" in text
    assert FROZEN_NOTE in text and "calibration: 8 samples" in text
    # The schedule is embedded as YAML.
    assert "schema_version: 1" in text and "policy: per_layer" in text and "method: merge" in text
    # Checkpoint table from the records (paths as text), one row per checkpoint.
    assert text.count("<td>/runs/x/") == 7 and "instruction/checkpoint-1000" in text
    # Key numbers: layer 2 is the most redundant, layer 5 the least (skip_loss_delta).
    assert re.search(r"<td>2 \(0\.001\).*?</td><td>5 \(0\.6", text)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_key_numbers_and_frozen_detection():
    layers, tokens = synthetic_tables()
    assert frozen_stages(layers) == ["alignment"]
    nums = key_numbers(layers, tokens)
    assert nums["instruction"]["metric"] == "skip_loss_delta"
    assert [l for l, _ in nums["instruction"]["most_redundant"]] == [2, 3, 4]
    assert [l for l, _ in nums["instruction"]["least_redundant"]] == [5, 0, 1]
    # Mean over checkpoints: merge is the best method at every ratio except 0.125 (uniform).
    best = nums["alignment"]["best_token_method"]
    assert best[0.5][0] == "merge" and best[0.25][0] == "merge" and best[0.125][0] == "uniform"
    assert best[0.5][1] == pytest.approx(0.008)


def test_key_numbers_give_the_best_methods_standard_error(tmp_path):
    layers, tokens = synthetic_tables()
    assert "best_token_method_se" not in key_numbers(layers, tokens)["alignment"]
    tokens = _with_se(tokens, lambda m, r: 0.002 if m == "merge" else 0.05)
    nums = key_numbers(layers, tokens)["alignment"]
    assert nums["best_token_method_se"] == pytest.approx({0.5: 0.002, 0.25: 0.002, 0.125: 0.05})  # merge, merge, uniform
    page = write_report(tmp_path, layers=layers, tokens=tokens, cost=None, schedule=None, plots={},
                        notes=[], checkpoints=[])
    assert "0.5: merge (+0.008 \u00b1 0.002); 0.25: merge (+0.025 \u00b1 0.002); 0.125: uniform (+0.08 \u00b1 0.05)" \
        in page.read_text()


def test_key_numbers_give_the_layer_probes_standard_error(tmp_path):
    layers, tokens = synthetic_tables()
    assert "layer_se" not in key_numbers(layers, tokens)["instruction"]
    se = layers[layers["metric"] == "skip_loss_delta"].assign(metric="skip_loss_delta_se")
    se["value"] = 0.001 * (se["layer"] + 1) * se["step"] / 1000  # mean over checkpoints 0.0007 x (l + 1)
    layers = pd.concat([layers, se], ignore_index=True)
    nums = key_numbers(layers, tokens)["instruction"]
    steps = sorted(set(se[se["stage"] == "instruction"]["step"]))
    assert nums["layer_se"] == pytest.approx({l: 0.001 * (l + 1) * np.mean(steps) / 1000 for l in range(6)})
    page = write_report(tmp_path, layers=layers, tokens=tokens, cost=None, schedule=None, plots={},
                        notes=[], checkpoints=[])
    # layer 2: skip deltas 0.001 x (0.9, 1.0, 1.1, 1.1) -> mean 0.001025; s.e. 0.003 x 0.7
    assert "2 (0.00103 \u00b1 0.0021), " in page.read_text()


def test_report_without_schedule_or_plots(tmp_path):
    layers, tokens = synthetic_tables(stages=(("alignment", (100, 200)), ("instruction", (400,))))
    notes = ["LLM frozen in stage 'alignment' (decoder weights identical): flat curves are not a finding"]
    page = write_report(tmp_path, layers=layers, tokens=None, cost=None, schedule=None, plots={},
                        notes=notes, checkpoints=[])
    text = page.read_text()
    assert "No schedule was derived" in text and "No plots" in text
    assert text.count("LLM frozen in stage") == 1                  # the caller's note is not repeated
    assert "stage instruction has one checkpoint" in text
    assert "alignment/checkpoint-100" in text                       # checkpoint table from the tables
