"""`xct reconstruct` and `xct evaluate`: the cascade on user X-rays and user CTs.

``xct reconstruct --model URI --frontal F --lateral L --out ct.nii.gz [--samples K] …``
writes ``ct.nii.gz`` (int16 HU, the point estimate ``eval.point_estimate`` of the model's
params — ``auto`` by default: the anchored last stage's twin, else the mean of the K samples —, affine = the stage grid centred at the input
geometry's isocentre), ``ct_std.nii.gz`` when K > 1 (voxel-wise std, HU), and — when the
model carries a ``calibration.json`` fitted on val for the stage run at the same K (a
registered model does; ``--calibration FILE`` gives one for a training folder) — the std is
the RECALIBRATED one (``s`` × sample std) and ``ct_lo.nii.gz`` / ``ct_hi.nii.gz`` hold the
calibrated split-conformal interval (``eval.calibration.level``, 90 % by default; HU); the
NIfTI descriptions and ``ct.qa.json`` say which. Without a usable calibration one line on
stderr says so and the raw sample std is written. Also ``ct.qa.json`` (reprojection QA: PSNR/SSIM of the output's DRRs vs the inputs); a view
below ``reconstruct.qa_min_*`` prints a warning line on stderr. ``--report r.html`` adds an
HTML report with pictures. Inputs, mappings and conventions: :mod:`xct_core.inference`;
model URIs: :mod:`components.model_uri`.

``xct evaluate --model URI --ct CT_OR_DIR --out DIR`` renders each CT's X-rays with the
model's training geometry (as the preprocess step), reconstructs, and writes
``DIR/metrics.json`` (per patient + means), ``DIR/per_patient.csv``,
``DIR/recon/<id>.nii.gz`` and ``DIR/report.html`` (+ ``DIR/images/``). A folder is
evaluated as a batch: every CT that loads is evaluated and reported; every one that does not
is listed on stderr as ``xct: error: <file>: <reason>`` (and under ``not_evaluated`` in
metrics.json / the HTML), and the command then exits 1; when none loads it exits 2 with the
list and writes nothing. Files in the folder that are neither NIfTI nor a DICOM series
folder are named on stderr (``xct: note: <file>: ignored …``).

The model's own params (geometry, window, sampler) drive the reconstruction; the local
params file (``--params``) supplies the ``reconstruct`` section (QA thresholds) and the CT
sanity checks (``data.ct``). When an MLflow run is active (in-process, or
``$MLFLOW_RUN_ID``), the HTML report and its pictures are logged to it under ``reports/``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params
from xct_core.config import Params
from xct_core.errors import ConfigError, InputError, XctError, error_line, note_line, printable, warning_line

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION, "
                                       "runs:/RUN_ID/PATH, or a local model folder / training folder / stage .pt")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="DDIM steps (default: model's eval.sample_steps "
                                                  "or diffusion.sample_steps)")]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", "-k", help="diffusion samples (default: "
                                                    "reconstruct.samples); K > 1 also writes the std")]
RecSamplesOpt = Annotated[Optional[int], typer.Option("--samples", "-k", help="diffusion samples (default: the K "
                                                       "the model's calibration was fitted at, else reconstruct.samples); "
                                                       "K > 1 also writes the std")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="noise seed of sample 1 (sample i: seed + i - 1; "
                                                 "default: model's seed)")]
StagesOpt = Annotated[Optional[int], typer.Option("--stages", help="run stages 1..N (default: all)")]




def _nifti_stem(out: Path) -> tuple[Path, str]:
    name = out.name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return out.with_name(name[: -len(suf)]), name[-len(suf):]
    raise ConfigError(f"--out must name a NIfTI file ending in .nii or .nii.gz, got {str(out)!r}")


def output_paths(out: Path) -> dict[str, Path]:
    """``{"mean": ct.nii.gz, "std": ct_std.nii.gz, "lo": ct_lo.nii.gz, "hi": ct_hi.nii.gz,
    "qa": ct.qa.json}`` for ``--out ct.nii.gz``."""
    stem, suf = _nifti_stem(out)
    return {"mean": out, "std": stem.with_name(stem.name + "_std" + suf), "lo": stem.with_name(stem.name + "_lo" + suf),
            "hi": stem.with_name(stem.name + "_hi" + suf), "qa": stem.with_name(stem.name + ".qa.json")}


def calibrated_samples(path: Path | None, stage: int, default: int) -> int:
    """The K a calibration for ``stage`` was fitted at (``--samples`` not given: the
    recalibrated std and the conformal interval hold only at that K), else ``default``
    (``reconstruct.samples``). An unreadable file is left to :func:`usable_calibration`."""
    if path is None:
        return default
    from xct_core.calibration import read_calibration

    try:
        cal = read_calibration(path)
    except XctError:
        return default
    return int(cal.samples) if cal.stage == stage and cal.samples >= 2 else default


def usable_calibration(path: Path | None, stage: int, samples: int, point_estimate: str = "mean") -> tuple[Any, str]:
    """(the :class:`~xct_core.calibration.Calibration` to apply or None, the line that says
    which std and interval are written)."""
    if samples < 2:
        return None, ""
    if path is None:
        return None, ("no calibration: the model carries no calibration.json (pass --calibration); "
                      "writing the raw sample std and no interval")
    from xct_core.calibration import read_calibration

    cal = read_calibration(path)
    if cal.point_estimate != point_estimate:
        return None, (f"{path}: calibration fitted around the {cal.point_estimate}, this model's point estimate is "
                      f"the {point_estimate}: writing the raw sample std and no interval")
    if cal.stage != stage or cal.samples != samples:
        return None, (f"{path}: calibration fitted for stage {cal.stage} at K = {cal.samples}, this run is stage "
                      f"{stage} at K = {samples}: writing the raw sample std and no interval")
    return cal, (f"calibrated on val ({path.name}): std = {cal.sigma_scale:.3g} x sample std; "
                 f"{cal.level:.0%} split-conformal interval = point +- {cal.q:.3g} x max(sample std, {cal.floor_hu:g} HU)")


def _model(uri: str, local: Params, tmp: str) -> tuple[Any, Params]:
    """Resolve the model; its params with the local ``reconstruct`` and ``limits`` sections."""
    from components.model_uri import resolve_model

    r = resolve_model(uri, dst_dir=tmp)
    return r, r.params.model_copy(update={"reconstruct": local.reconstruct, "limits": local.limits})


def _check_options(samples: int, steps: int | None, stages: int | None, n_files: int) -> None:
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if stages is not None and not 1 <= stages <= n_files:
        raise ConfigError(f"--stages must be in 1..{n_files} (the model has {n_files} stage(s)), got {stages}")


def _active_run_id() -> str | None:
    if os.environ.get("MLFLOW_RUN_ID"):
        return os.environ["MLFLOW_RUN_ID"]
    if "mlflow" in sys.modules:
        run = sys.modules["mlflow"].active_run()
        return run.info.run_id if run is not None else None
    return None


def log_report_to_mlflow(html_path: Path, images: list[Path]) -> str | None:
    """Log the HTML report and its pictures to the active MLflow run (``reports/``); the run's
    status is left alone. Returns the run id, or None when no run is active."""
    run_id = _active_run_id()
    if run_id is None:
        return None
    from components.tracking import get_client

    client = get_client()
    client.log_artifact(run_id, str(html_path), "reports")
    for p in images:
        client.log_artifact(run_id, str(p), "reports/images")
    return run_id


def _hu_note(p: Params) -> str:
    """What the output's HU can be: the networks' HU map's range (a window map saturates)."""
    net, w = p.hu.net_map(), p.hu.get_window()
    if p.hu.output == "window":
        return f"HU saturate at the model's output window [{net.lo:g}, {net.hi:g}] ({w.name}): not a full-range CT"
    return f"HU span the model's output range [{net.lo:g}, {net.hi:g}]; the {w.name} window is a display view"


def _check_utf8_names(paths: dict[str, Path]) -> None:
    """A one-line :class:`InputError` for a path that is not valid UTF-8 (raw bytes of a
    non-UTF-8 file system name), before anything is written: a report cannot show it."""
    for opt, p in paths.items():
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(p, f"{opt}: this file name is not valid UTF-8, so the --report cannot show it; "
                                "rename the file or leave out --report") from None


def _warn(line: str) -> None:
    print(warning_line(line), file=sys.stderr)


def reconstruct_cmd(
    model: ModelOpt,
    frontal: Annotated[Path, typer.Option("--frontal", help="frontal X-ray: .npy (+ .json from `xct drr`), "
                                          "8/16-bit PNG intensity, or DICOM")],
    lateral: Annotated[Path, typer.Option("--lateral", help="lateral X-ray (same formats)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output NIfTI (.nii.gz); _std and .qa.json beside it")],
    steps: StepsOpt = None,
    samples: RecSamplesOpt = None,
    seed: SeedOpt = None,
    stages: StagesOpt = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="also write an HTML report (+ images/)")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="calibration.json (or an evaluation "
                                                        "metrics.json) fitted on val: recalibrated std + _lo/_hi "
                                                        "interval (default: the registered model's)")] = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    device: Annotated[str, typer.Option("--device", help="torch device")] = "cpu",
) -> None:
    """Reconstruct a CT (HU NIfTI) from a frontal + lateral X-ray with the diffusion cascade.

    PNG/DICOM inputs are intensities: I/I0 = value / full scale, p = -ln(I/I0), with the
    model's training geometry. Image convention: row 0 superior; frontal shows the patient's
    right on the left columns, lateral shows anterior on the left columns.
    """
    from xct_core.atomic import check_writable, write_text_atomic
    from xct_core.inference import load_stages, reconstruct
    from xct_core.io import save_nifti
    from xct_core.jsondoc import json_text
    from xct_core.qa import reprojection_qa
    from xct_core.devices import parse_device
    from xct_core.xray_io import check_pair, input_geometries, load_xray

    device = parse_device(device)  # before anything is loaded or written
    paths = output_paths(out)
    if report is not None and report.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--report must name an .html file, got {str(report)!r}")
    if report is not None:  # the report shows these names (HTML, image titles): UTF-8 only
        _check_utf8_names({"--out": out, "--report": report, "--frontal": frontal, "--lateral": lateral})
    local = command_params(params, overlay, set_)
    k = int(samples if samples is not None else local.reconstruct.samples)
    for target in (paths["mean"], paths["qa"], *([paths["std"], paths["lo"], paths["hi"]] if k > 1 else []),
                   *([report] if report else [])):
        check_writable(target)  # before the model is loaded and sampled
    with tempfile.TemporaryDirectory(prefix="xct-model-") as tmp:
        resolved, mp = _model(model, local, tmp)
        _check_options(k, steps, stages, resolved.n_stages)
        xf = load_xray(frontal, "frontal", mp)
        xl = load_xray(lateral, "lateral", mp)
        input_warnings = xf.warnings + xl.warnings + check_pair(xf, xl)
        iso, geoms = input_geometries(xf, xl, mp)
        for w in input_warnings:  # what the inputs' metadata could not pin down, before sampling
            _warn(w)
        nets = load_stages(resolved.stage_files, mp, device)
        point_estimate = mp.point_estimate_for(stages or resolved.n_stages)
        cal_path = calibration or resolved.calibration
        if samples is None:  # the interval is valid at the K it was fitted at: that K is the default
            k = calibrated_samples(cal_path, stages or resolved.n_stages, k)
            for target in (paths["std"], paths["lo"], paths["hi"]):
                check_writable(target)  # (again: K may have changed from the local default)
        cal, cal_line = usable_calibration(cal_path, stages or resolved.n_stages, k, point_estimate)
    rec = reconstruct(nets, mp, xf.image, xl.image, isocenter=iso, steps=steps, samples=k, seed=seed,
                      upto=stages, device=device, log=lambda m: typer.echo(printable(m), err=True))
    point = rec.point_hu(point_estimate)
    qa, reproj = reprojection_qa(point, rec.affine, geoms, {"frontal": xf.image, "lateral": xl.image}, mp)
    window = mp.hu.get_window()
    doc = {
        "format": "xct-reconstruct-qa/1",
        "model": {"uri": model, "layout": resolved.layout, "stages_run": rec.stage,
                  "stage_files": [p.name for p in resolved.stage_files]},
        "inputs": {x.view: {"path": str(Path(x.source).resolve()), "format": x.fmt, "notes": x.notes}
                   for x in (xf, xl)},
        "input_warnings": input_warnings,
        "outputs": {"mean": str(paths["mean"]), "std": str(paths["std"]) if rec.std_hu is not None else None,
                    "lo": str(paths["lo"]) if cal is not None else None,
                    "hi": str(paths["hi"]) if cal is not None else None},
        "point_estimate": point_estimate,
        "grid": {"shape": list(rec.mean_hu.shape), "affine": rec.affine.tolist(), "isocenter": [float(v) for v in iso]},
        "sampling": {"steps": rec.steps, "samples": rec.samples, "seeds": rec.seeds, "eta": mp.diffusion.eta},
        "hu_note": _hu_note(mp),
        "reprojection": qa,
    }
    std_out = rec.std_hu if cal is None or rec.std_hu is None else cal.std(rec.std_hu)
    if std_out is not None:
        doc["uncertainty"] = {"mean_std_hu": float(std_out.mean()), "max_std_hu": float(std_out.max()),
                              "std": "recalibrated (s x sample std)" if cal is not None else "raw sample std (ddof 1)",
                              "calibration": cal.to_json() if cal is not None else None, "note": cal_line}
    save_nifti(paths["mean"], point, rec.affine, f"xct {point_estimate} of K={rec.samples} (HU)")
    if std_out is not None:
        what = f"recalibrated std s={cal.sigma_scale:.3g}" if cal is not None else "raw sample std"
        save_nifti(paths["std"], std_out, rec.affine, f"xct {what} K={rec.samples} (HU)")
    if cal is not None:
        lo, hi = cal.interval(point, rec.std_hu)
        what = f"xct {cal.level:.0%} conformal interval"
        save_nifti(paths["lo"], lo, rec.affine, f"{what} lower (HU)")
        save_nifti(paths["hi"], hi, rec.affine, f"{what} upper (HU)")
    write_text_atomic(paths["qa"], json_text(doc))
    if cal_line:
        typer.echo(printable(cal_line) if cal is not None else note_line(cal_line), err=True)
    for w in qa["warnings"]:
        _warn(w)
    written = ([paths["mean"]] + ([paths["std"]] if rec.std_hu is not None else [])
               + ([paths["lo"], paths["hi"]] if cal is not None else []) + [paths["qa"]])
    if report is not None:
        from xct_core.report import IMAGES, ReportCase, build_report, save_case_images

        imgs = save_case_images(report.parent / IMAGES, paths["mean"].name.split(".")[0],
                                volumes={"reconstruction": point}, window=window, spacing=rec.affine,
                                uncertainty=std_out,
                                xrays={v: ({"frontal": xf.image, "lateral": xl.image}[v], reproj[v]) for v in reproj})
        m = {f"reproj_psnr_{v}_db": q["psnr_db"] for v, q in qa["views"].items()}
        build_report(report, title=f"xct reconstruction: {paths['mean'].name}",
                     cases=[ReportCase(paths["mean"].name, m, imgs)], warnings=qa["warnings"],
                     info={"model": model, "frontal": str(frontal), "lateral": str(lateral), "stages run": rec.stage,
                           "DDIM steps": rec.steps, "samples (seeds)": f"{rec.samples} ({rec.seeds})"},
                     notes=[doc["hu_note"], qa["protocol"]])
        written.append(report)
        log_report_to_mlflow(report, list(imgs.values()))
    typer.echo(printable("wrote " + ", ".join(str(p) for p in written)))


# --------------------------------------------------------------------------- evaluate


def _list_cts(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """(id → CT path, ignored files): a NIfTI file / DICOM file or series folder (one CT), or
    a folder of NIfTI files and/or DICOM series sub-folders (its other files are ignored)."""
    if not root.exists():
        raise InputError(root, "no such file or directory")
    if root.is_file():
        name = root.name
        return {name.split(".")[0] if name.lower().endswith((".nii", ".nii.gz")) else root.stem: root}, []
    found: dict[str, Path] = {}
    other: list[Path] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")):
            found[p.name.split(".")[0]] = p
        elif p.is_dir() and any(q.is_file() for q in p.iterdir()):
            found[p.name] = p
        else:
            other.append(p)
    if not found:
        return {root.name: root}, []  # a DICOM series folder itself
    return found, other


def _load_cts(root: Path, local: Params) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Every CT under ``root`` that loads (id → volume) and every one that does not, with
    the one-line reason (``<file>: <problem>``); ignored files are named on stderr."""
    from xct_core.io import load_ct

    listed, ignored = _list_cts(root)
    for p in ignored:
        print(note_line(f"{p}: ignored (neither a .nii/.nii.gz file nor a DICOM series folder)"), file=sys.stderr)
    cts: dict[str, Any] = {}
    bad: list[tuple[Path, str]] = []
    for vid, p in listed.items():
        try:
            cts[vid] = load_ct(p, local.data.ct, limits=local.limits)
        except InputError as e:
            bad.append((p, str(e) if e.path is not None else f"{p}: {e.problem}"))
    return cts, bad


def evaluate_cmd(
    model: ModelOpt,
    ct: Annotated[Path, typer.Option("--ct", help="a CT (NIfTI, DICOM series folder) or a folder of them")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    steps: StepsOpt = None,
    samples: SamplesOpt = None,
    seed: SeedOpt = None,
    stages: StagesOpt = None,
    processed: Annotated[Optional[Path], typer.Option("--processed", help="processed data folder whose TRAIN "
                                                      "split gives the mean-volume baseline")] = None,
    gates: Annotated[Path, typer.Option("--gates", help="gate reports shown in the HTML (when present)")] = Path("reports/gates"),
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="calibration.json fitted on val "
                                                        "(default: the registered model's): conformal coverage, "
                                                        "recalibrated spread-skill")] = None,
    train_dir: Annotated[Optional[Path], typer.Option("--train-dir", help="training folder for the loss curves "
                                                      "(default: the model's, else params train.out_dir)")] = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    device: Annotated[str, typer.Option("--device", help="torch device")] = "cpu",
) -> None:
    """Evaluate the model on your CTs: render X-rays as in training, reconstruct, measure."""
    from xct_core.atomic import check_writable, write_text_atomic
    from xct_core.evaluation import EvalProtocol, evaluate_cts, rows_csv
    from xct_core.inference import load_stage, load_stages
    from xct_core.io import save_nifti
    from xct_core.jsondoc import json_text
    from xct_core.devices import parse_device
    from xct_core.report import IMAGES, ReportCase, build_report, read_gate_reports, save_case_images, save_training_curves

    device = parse_device(device)  # before anything is loaded or written
    local = command_params(params, overlay, set_)
    k = int(samples if samples is not None else local.reconstruct.samples)
    check_writable(out / "metrics.json")  # before any CT is loaded or reconstructed
    cts, bad = _load_cts(ct, local)
    if not cts:
        for _p, line in bad:
            print(error_line(line), file=sys.stderr)
        print(error_line(f"{ct}: none of the {len(bad)} CT(s) could be loaded; nothing evaluated"), file=sys.stderr)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="xct-model-") as tmp:
        resolved, mp = _model(model, local, tmp)
        _check_options(k, steps, stages, resolved.n_stages)
        nets = load_stages(resolved.stage_files, mp, device)
        n = stages or len(nets)
        direct = None
        if resolved.direct is not None and n == len(nets):
            direct = load_stage(resolved.direct, mp, n, device)
        cal, cal_line = usable_calibration(calibration or resolved.calibration, n, k, mp.point_estimate_for(n))
    if cal_line and cal is None:
        print(note_line(cal_line.replace("writing the raw sample std and no interval", "raw calibration metrics only")),
              file=sys.stderr)
    train_mean = None
    if processed is not None:
        from xct_core.evaluation import mean_volume_baseline

        train_mean = mean_volume_baseline(processed, n, "train")
    protocol = EvalProtocol.from_params(mp)
    cases, summary = evaluate_cts(cts, nets, mp, protocol=protocol, steps=steps, samples=k, seed=seed, upto=n,
                                  direct=direct, train_mean_hu=train_mean, device=device,
                                  log=lambda m: typer.echo(printable(m), err=True), calibration=cal)
    if processed is not None:
        summary["baseline"] += f" ({processed})"
    window = protocol.window
    described = {
        **protocol.describe(mp.stage(n).size),
        "ground_truth": "the CT resampled to the output stage grid (as the preprocess step); X-rays: "
                        + (f"{protocol.label}: {summary['eval_detector_text']}" if protocol.xrays == "honest" else
                           f"{protocol.label}: rendered from the finest stage grid with the model's drr geometry"),
        "baseline_*": summary["baseline"],
        "direct_*": "direct-regression twin (direct.pt)" if direct is not None else "not available (no direct.pt)",
        "upsampled_*": (f"the previous stage upsampled: stage {n - 1}'s point estimate ({mp.point_estimate_for(n - 1)}) "
                        f"from the same samples, on stage {n}'s grid as the cascade upsamples it" if n > 1
                        else "not measured (stage 1 has no previous stage)"),
    }
    doc = {"format": "xct-evaluate/1", "model": model, "protocol": described, **summary,
           "patients": [{"id": c.case_id, **c.metrics} for c in cases],
           "not_evaluated": [{"path": str(p), "error": line} for p, line in bad]}
    img_dir = out / IMAGES
    report_cases, images = [], []
    for c in cases:
        save_nifti(out / "recon" / f"{c.case_id}.nii.gz", c.recon.mean_hu, c.recon.affine)
        vols = {"reconstruction": c.recon.mean_hu}
        if c.direct_hu is not None:
            vols["direct regression"] = c.direct_hu
        if c.upsampled_hu is not None:
            vols["previous stage upsampled"] = c.upsampled_hu
        imgs = save_case_images(img_dir, c.case_id, volumes=vols, window=window, spacing=c.recon.affine,
                                ground_truth=c.target_hu, uncertainty=c.recon.std_hu,
                                xrays={v: (c.xrays[v], c.reprojections[v]) for v in c.xrays})
        images += list(imgs.values())
        report_cases.append(ReportCase(c.case_id, c.metrics, imgs))
    tdir = train_dir or (resolved.local_path if resolved.layout == "training" else Path(local.train.out_dir))
    curves = save_training_curves(tdir, img_dir) if tdir.is_dir() else {}
    images += list(curves.values())
    cal_plots: dict[str, Path] = {}
    if summary.get("calibration_curve"):
        from xct_core.report import save_calibration_plot

        mm = summary["mean"]
        cal_plots["calibration: expected vs observed coverage, rank histogram"] = save_calibration_plot(
            summary["calibration_curve"], img_dir / "calibration.png",
            f"{summary['n_patients']} CT(s): spread-skill {mm.get('spread_skill', float('nan')):.2f}, conformal "
            f"coverage {mm.get('conformal_coverage', float('nan')):.3f} (K = {k})")
        images += list(cal_plots.values())
    gate_docs = read_gate_reports(gates) if gates.is_dir() else []
    notes = [f"mean-volume baseline: {summary['baseline']}", f"SSIM: {described['ssim_window']}",
             "literature numbers are often slice averages (several dB higher than 3D PSNR): compare like with like"]
    notes += [f"not evaluated (could not be loaded): {line}" for _p, line in bad]
    html_path = build_report(out / "report.html", title=f"xct evaluation of {model}", cases=report_cases,
                             summary=summary["mean"], notes=notes, gates=gate_docs, curves=curves,
                             info={"model": model, "CTs": str(ct), "patients": summary["n_patients"],
                                   "stages run": n, "DDIM steps": summary["sample_steps"], "samples": k,
                                   "direct baseline": "yes" if direct is not None else "no (no direct.pt)"},
                             label_context=protocol.label_context(mp.stage(n).size), calibration=cal_plots)
    write_text_atomic(out / "metrics.json", json_text(doc))
    write_text_atomic(out / "per_patient.csv", rows_csv(doc["patients"]))
    log_report_to_mlflow(html_path, images)
    m = summary["mean"]
    typer.echo(f"{summary['n_patients']} CT(s): PSNR[-1024,1024] {m['psnr_hu_db']:.2f} dB, PSNR(window) "
               f"{m['psnr_window_db']:.2f} dB, SSIM {m['ssim_window']:.3f}, MAE {m['mae_hu']:.1f} HU")
    typer.echo(printable(f"wrote {out / 'metrics.json'}, {out / 'per_patient.csv'}, {html_path}"))
    if bad:
        for _p, line in bad:
            print(error_line(line), file=sys.stderr)
        print(error_line(f"{len(bad)} of {len(bad) + len(cts)} CT(s) could not be loaded and were not evaluated "
                         "(listed above; the others are in the report)"), file=sys.stderr)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the top-level `reconstruct` and `evaluate` commands to the root app."""
    app.command("reconstruct", no_args_is_help=True)(reconstruct_cmd)
    app.command("evaluate", no_args_is_help=True)(evaluate_cmd)
