"""Redundancy analysis of a run's checkpoints: tables, schedule, plots, report.

    sts-profile analyze runs/dense --out analysis/ --target-speedup 1.8

Library::

    from sts_profile.analysis import AnalyzeConfig, run_analysis, Analysis
    run_analysis(AnalyzeConfig(ckpt_dir="runs/dense", out_dir="analysis", target_speedup=1.8))
    a = Analysis("analysis")
    a.layer_redundancy()       # checkpoint, step, stage, layer, token_type, metric, value
    a.token_redundancy()       # checkpoint, step, stage, layer, metric, method, keep_ratio, threshold, value
    a.cost(); a.checkpoints(); a.schedule()

Flow: discover the checkpoints and check every input up front (weights readable, a tokenizer,
calibration data with images) so that a bad input writes nothing; then one checkpoint at a
time (one model in memory): one hooked forward per batch (:mod:`sts_profile.collect`), the
probes (:mod:`sts_profile.probes`), and for the first checkpoint the cost table
(:mod:`sts_profile.cost`). Each checkpoint's result is cached in ``OUT/.cache/`` under a key
of (checkpoint path, weight-file sizes and mtimes, measurement settings), so an interrupted
analysis resumes where it stopped and produces identical tables. Final files are written to a
staging folder and renamed into place. Under ``torchrun`` the checkpoints are split across
ranks (gloo) and rank 0 gathers the results and writes the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from sts_profile import __version__
from sts_profile import runner
from sts_train.configtools import atomic_write_text, check_file_target, check_parents
from sts_train.errors import StsError
from sts_train.modelio import check_device

MANIFEST_FILE = "analysis.json"
CACHE_DIR = ".cache"
OWNER_FILE = "owner.json"  # inside CACHE_DIR: which run an unfinished analysis belongs to
SCHEDULE_FILE = "schedule.yaml"
TRACE_DIR = "trace"
TABLES = ("layers", "tokens", "cost", "checkpoints")
LAYER_COLUMNS = ("checkpoint", "step", "stage", "layer", "token_type", "metric", "value")
TOKEN_COLUMNS = ("checkpoint", "step", "stage", "layer", "metric", "method", "keep_ratio", "threshold", "value")
COST_COLUMNS = ("layer", "component", "seq_len", "flops_fwd", "time_fwd_s")
CHECKPOINT_COLUMNS = ("checkpoint", "step", "stage", "path", "llm_fingerprint")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of one ``sts-profile analyze`` run.

    Measurement settings (they key the per-checkpoint cache): ``data_json``, ``images``,
    ``num_samples``, ``batch_size``, ``seed``, ``device``, ``dtype``, ``probes``,
    ``layers_for_attention``. Schedule budget (see :class:`sts_profile.derive.Budget`):
    ``target_speedup`` or ``max_loss_increase`` with policy ``profile``; ``alpha``/``eps`` with
    policy ``paper``. With no budget given, policy ``profile`` uses ``max_loss_increase=0.05``.
    """

    ckpt_dir: str
    out_dir: str
    data_json: str | None = None
    images: str | None = None
    num_samples: int = 32
    batch_size: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    probes: bool = True
    trace: bool = False
    layers_for_attention: tuple[int, ...] | None = None
    target_speedup: float | None = None
    max_loss_increase: float | None = None
    policy: str = "profile"
    alpha: float = 0.5
    eps: float = 0.2
    overwrite: bool = False

    def __post_init__(self):
        for key in ("num_samples", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--samples" if key == "num_samples" else "--batch-size"
                raise StsError(f"{flag} {value!r}: must be an integer >= 1")
        if self.dtype not in DTYPES:
            raise StsError(f"--dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        check_device(self.device)
        if self.layers_for_attention is not None:
            object.__setattr__(self, "layers_for_attention", tuple(int(i) for i in self.layers_for_attention))
        self.budget()  # validate the budget before any work

    def budget(self):
        """The :class:`sts_profile.derive.Budget` of this config."""
        from sts_profile.derive import Budget

        target, tolerance = self.target_speedup, self.max_loss_increase
        if self.policy == "profile" and target is None and tolerance is None:
            tolerance = 0.05
        return Budget(target_speedup=target, max_loss_increase=tolerance, policy=self.policy,
                      alpha=self.alpha, eps=self.eps)

    def measurement_key(self) -> dict:
        """The settings that change measured values (part of every cache key)."""
        keys = ("data_json", "images", "num_samples", "batch_size", "seed", "device", "dtype",
                "probes", "layers_for_attention")
        out = {k: getattr(self, k) for k in keys}
        for k in ("data_json", "images"):
            out[k] = None if out[k] is None else str(Path(out[k]).resolve())
        return out


def _owner(out: Path) -> str | None:
    for path in (out / MANIFEST_FILE, out / CACHE_DIR / OWNER_FILE):
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("ckpt_dir")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                return "<unreadable>"
    return None


def check_output_folder(out: Path, ckpt_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds something else than this run's analysis.

    Raises:
        StsError: ``out`` is a file; holds another run's analysis; or is not empty and holds no
            analysis (both unless ``overwrite``).
    """
    if out.exists() and not out.is_dir():
        raise StsError(f"{out}: exists and is not a folder; choose a new --out folder")
    check_parents(out, StsError, inside=True)  # analyze stages inside out
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    owner = _owner(out)
    if owner is None:
        raise StsError(f"{out}: folder is not empty and holds no analysis; choose a new --out folder "
                       "or pass --overwrite")
    if owner != str(ckpt_dir.resolve()):
        raise StsError(f"{out}: holds the analysis of another run ({owner}); choose a new --out folder "
                       "or pass --overwrite to replace it")


def _clear_previous(out: Path) -> None:
    """Remove the files an earlier analysis wrote (``--overwrite``); other files stay."""
    for name in (CACHE_DIR, TRACE_DIR, "plots", MANIFEST_FILE, SCHEDULE_FILE, "report.html", "report.md"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for table in TABLES:
        for suffix in (".parquet", ".csv"):
            (out / f"{table}{suffix}").unlink(missing_ok=True)


def build_tables(results: list[dict]) -> dict[str, pd.DataFrame]:
    """Tidy tables from per-checkpoint results (in checkpoint order)."""
    layers, tokens, checkpoints, cost = [], [], [], []
    for r in results:
        tag = {"checkpoint": r["checkpoint"], "step": r["step"], "stage": r["stage"]}
        layers += [{**tag, **row} for row in r["layers"]]
        tokens += [{**tag, **row} for row in r["tokens"]]
        checkpoints.append({**tag, "path": r["path"], "llm_fingerprint": r["llm_fingerprint"]})
        if r.get("cost") and not cost:
            cost = r["cost"]
    tables = {
        "layers": pd.DataFrame(layers, columns=list(LAYER_COLUMNS)),
        "tokens": pd.DataFrame(tokens, columns=list(TOKEN_COLUMNS)),
        "cost": pd.DataFrame(cost, columns=list(COST_COLUMNS)),
        "checkpoints": pd.DataFrame(checkpoints, columns=list(CHECKPOINT_COLUMNS)),
    }
    for name, df in tables.items():
        for col in ("step", "layer", "seq_len"):
            if col in df:
                df[col] = df[col].astype("int64")
        for col in ("value", "keep_ratio", "threshold", "flops_fwd", "time_fwd_s"):
            if col in df:
                df[col] = df[col].astype("float64")
    return tables


def llm_frozen_by_stage(checkpoints: pd.DataFrame) -> dict[str, bool]:
    """``{stage: True}`` where every checkpoint of a stage (two or more) has the same decoder weights."""
    out = {}
    for stage, group in checkpoints.groupby("stage", sort=False):
        if len(group) >= 2:
            out[str(stage)] = group["llm_fingerprint"].nunique() == 1
    return out


def analysis_notes(tables: dict[str, pd.DataFrame], extra: list[str]) -> list[str]:
    """Notes for the report: single checkpoint, frozen LLM stages, probe caveats."""
    notes = list(dict.fromkeys(extra))
    ckpts = tables["checkpoints"]
    for stage, frozen in llm_frozen_by_stage(ckpts).items():
        if frozen:
            notes.append(f"LLM frozen in stage {stage!r} (decoder weights identical across its "
                         "checkpoints): layer statistics cannot change there; flat layer curves in "
                         "this stage are not a finding")
    if (ckpts["stage"] == "unknown").any():
        notes.append("some checkpoints have no stage tag (no sts_run.yaml, no stage sub-folder): "
                     "they are analyzed as stage 'unknown'")
    return notes


def write_outputs(out: Path, tables: dict[str, pd.DataFrame], manifest: dict, *, budget,
                  notes: list[str], checkpoints: list, trace_file: Path | None) -> None:
    """Tables (parquet + CSV), schedule, plots, report and manifest; staged, then renamed in."""
    from sts_profile import plots, report
    from sts_profile.derive import derive_schedule
    from sts_train.flops import LayerDims
    from sts_train.schedule import dump_schedule

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        for name, df in tables.items():
            df.to_parquet(staging / f"{name}.parquet", index=False)
            df.to_csv(staging / f"{name}.csv", index=False)
        provenance = {"ckpt_dir": manifest["ckpt_dir"], "tables": str(out),
                      "calibration": manifest["calibration"]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schedule = derive_schedule(
                tables["layers"], tables["tokens"], num_layers=manifest["num_layers"],
                num_visual_tokens=manifest["num_visual_tokens"], budget=budget, provenance=provenance,
                dims=LayerDims(**manifest["dims"]), text_len=manifest["text_len"],
                llm_frozen=manifest["llm_frozen"] or None)
        notes = notes + [str(w.message) for w in caught]
        dump_schedule(schedule, staging / SCHEDULE_FILE, overwrite=True)
        plot_files = plots.write_plots(tables["layers"], tables["tokens"], tables["cost"], schedule,
                                       staging / "plots", manifest["num_layers"])
        if trace_file is not None:
            (staging / TRACE_DIR).mkdir()
            shutil.copy2(trace_file, staging / TRACE_DIR / trace_file.name)
        report.write_report(staging, layers=tables["layers"], tokens=tables["tokens"], cost=tables["cost"],
                            schedule=schedule, plots=plot_files, notes=notes, checkpoints=checkpoints)
        manifest = {**manifest, "notes": notes}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        # the manifest goes last: a folder with analysis.json is a complete analysis
        names = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST_FILE) + [MANIFEST_FILE]
        for name in names:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_analysis(config: AnalyzeConfig) -> "Analysis | None":
    """Analyze every checkpoint under ``config.ckpt_dir`` and write the outputs to ``config.out_dir``.

    Returns:
        The :class:`Analysis` of the output folder (None on ranks other than 0 under torchrun).

    Raises:
        StsError: a bad input (see :func:`runner.prepare`), an output folder that holds
            something else; nothing is written then.
    """
    out, ckpt_dir = Path(config.out_dir), Path(config.ckpt_dir)
    check_output_folder(out, ckpt_dir, config.overwrite)
    budget = config.budget()
    plan = runner.prepare(config)
    rank, world, created = runner.init_distributed()
    existed = out.exists()
    try:
        if rank == 0:
            if config.overwrite and out.is_dir():
                _clear_previous(out)
            (out / CACHE_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / CACHE_DIR / OWNER_FILE,
                              json.dumps({"ckpt_dir": str(ckpt_dir.resolve())}) + "\n")
        runner.barrier(world)
        mine = [i for i in range(len(plan.checkpoints)) if i % world == rank]
        results = {i: runner.checkpoint_result(plan, i, out / CACHE_DIR) for i in mine}
        results = runner.gather(results, world)
        if rank != 0:
            return None
        ordered = [results[i] for i in range(len(plan.checkpoints))]
        tables = build_tables(ordered)
        trace_file = runner.trace(plan, out / CACHE_DIR / TRACE_DIR) if config.trace else None
        probe_notes = [n for r in ordered for n in r.get("notes", [])]
        notes = analysis_notes(tables, plan.notes + probe_notes)
        manifest = {
            "tool": "sts-profile", "version": __version__, "ckpt_dir": str(ckpt_dir.resolve()),
            "config": asdict(config), "num_layers": plan.facts["num_layers"],
            "num_visual_tokens": plan.facts["num_visual_tokens"], "dims": plan.facts["dims"],
            "text_len": plan.text_len, "llm_frozen": llm_frozen_by_stage(tables["checkpoints"]),
            "calibration": plan.calibration,
            "checkpoints": [{"checkpoint": c.name, "step": c.step, "stage": c.stage, "path": str(c.path)}
                            for c in plan.checkpoints],
        }
        write_outputs(out, tables, manifest, budget=budget, notes=notes, checkpoints=plan.checkpoints,
                      trace_file=trace_file)
        return Analysis(out)
    except BaseException:
        if rank == 0:
            _forget_empty_start(out, existed)
        raise
    finally:
        runner.finish_distributed(created)


def _forget_empty_start(out: Path, existed: bool) -> None:
    """After a failure before any checkpoint was measured, remove the owner record (and the
    folders this analysis created), so that the folder does not stay marked as another run's."""
    cache = out / CACHE_DIR
    if not cache.is_dir() or any(p.name != OWNER_FILE for p in cache.iterdir()):
        return  # measured checkpoints are kept: analyzing the same run again continues from them
    shutil.rmtree(cache, ignore_errors=True)
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def schedule_from_tables(tables_dir: str | Path, budget, out_path: str | Path, overwrite: bool = False) -> Path:
    """Derive ``schedule.yaml`` from an analysis folder (``sts-profile schedule``)."""
    from sts_profile.derive import derive_from_tables_dir

    check_file_target(out_path, example="schedule.yaml")  # the output first: it costs nothing to check
    Analysis(tables_dir)  # a clear error for a folder that is not an analysis
    return derive_from_tables_dir(tables_dir, budget, out_path, overwrite=overwrite)


class Analysis:
    """Read-only view of an analysis folder, for notebooks: every getter returns a DataFrame.

    Raises:
        StsError: the folder holds no finished analysis (no ``analysis.json``).
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        manifest = self.out_dir / MANIFEST_FILE
        if not manifest.is_file():
            raise StsError(f"{self.out_dir}: not an analysis folder (no {MANIFEST_FILE}); "
                           "run `sts-profile analyze CKPT_DIR --out DIR` first")
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StsError(f"{manifest}: not valid JSON; re-run `sts-profile analyze` (with --overwrite)") from None

    def _table(self, name: str) -> pd.DataFrame:
        df = pd.read_parquet(self.out_dir / f"{name}.parquet")
        if "method" in df:
            df["method"] = df["method"].fillna("")
        return df

    def layer_redundancy(self, metric: str | None = None, token_type: str | None = None) -> pd.DataFrame:
        """Per checkpoint, layer, token type and metric (optionally filtered)."""
        df = self._table("layers")
        if metric is not None:
            df = df[df["metric"] == metric]
        if token_type is not None:
            df = df[df["token_type"] == token_type]
        return df.reset_index(drop=True)

    def token_redundancy(self, metric: str | None = None) -> pd.DataFrame:
        """Visual-token metrics and compression probes per checkpoint."""
        df = self._table("tokens")
        return (df if metric is None else df[df["metric"] == metric]).reset_index(drop=True)

    def cost(self) -> pd.DataFrame:
        """Forward FLOPs and time per decoder layer and model part."""
        return self._table("cost")

    def checkpoints(self) -> pd.DataFrame:
        """The analyzed checkpoints in training order."""
        return self._table("checkpoints")

    def schedule(self):
        """The derived :class:`sts_train.schedule.Schedule`."""
        from sts_train.schedule import load_schedule

        return load_schedule(self.out_dir / SCHEDULE_FILE)

    @property
    def notes(self) -> list[str]:
        return list(self.manifest.get("notes", []))

    def __repr__(self) -> str:
        n = len(self.manifest.get("checkpoints", []))
        return f"Analysis({str(self.out_dir)!r}, checkpoints={n}, layers={self.manifest.get('num_layers')})"
