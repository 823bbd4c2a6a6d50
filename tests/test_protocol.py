"""The honest evaluation protocol end to end (tiny data, seconds), the twin evaluation
compares against, and the refusal of left-right chest flips.

- preprocess renders honest views for val/test ids only (from the source CT, the detector
  of ``eval.detector``), records the detector in the manifest, and a detector change redoes
  exactly those files (their key holds it) while the clean outputs are reused;
- ``dataset_cases`` serves the views of the protocol asked for; ``EvalProtocol`` names it
  ("clean (inverse-crime)" for the old path) and records the detector for metrics.json;
- an anchored stage is compared against the twin SHIPPED IN the evaluated file (best.pt's),
  never a ``direct.pt`` of another step; a plain stage's ``direct.pt`` counts only when it
  is from the evaluated model's step;
- ``flip_lr > 0`` without ``allow_lr_flip`` is a config error; the real-CT profile does not flip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.preprocess import run_preprocess
from xct_core.config import load_params, params_from_dict
from xct_core.errors import ConfigError
from xct_core.evaluation import PROTOCOL_LABELS, EvalProtocol, dataset_cases, stage_twin, twin_of
from xct_core.io import CTVolume, grid_affine, save_ct
from xct_core.detector import DetectorModel, detector_postprocess, noise_rng
from xct_core.geometry import VIEWS
from xct_core.preprocess import PreprocessSettings, read_manifest, record_path, xray_file, xray_honest_file

REPO = Path(__file__).resolve().parents[1]
FOV = 64.0


def small_params(preprocess: dict | None = None, **eval_kw: object):
    stage = {"fov_mm": FOV, "token_grid": 4, "dim": 8, "depth": 1, "heads": 1, "lift_channels": 4,
             "enc_channels": [4, 4, 4]}
    return params_from_dict({
        "stages": {"stage1": {**stage, "size": 8, "conv_channels": [4]},
                   "stage2": {**stage, "size": 16, "conv_channels": [4, 4]}},
        "drr": {"geometry": "cone", "pixels": 16, "pixel_mm": FOV * 1.5 / 16},
        "preprocess": {"workers": 1, **(preprocess or {})},
        "eval": eval_kw,
    })


def phantom(shift: float) -> CTVolume:
    n, sp = 24, 3.0
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), axis=-1).astype(np.float64)
    rel = (idx - (n - 1) / 2) * sp
    hu = np.full((n, n, n), -1000.0, dtype=np.float32)
    hu[(np.abs(rel[..., 0]) < 28) & (np.abs(rel[..., 1]) < 22) & (np.abs(rel[..., 2]) < 30)] = 30.0 + shift
    hu[((rel[..., 0] - 15) ** 2 + (rel[..., 1] - 8) ** 2 + (rel[..., 2] - 10) ** 2) < 7**2] = 900.0
    return CTVolume(hu=hu, affine=grid_affine(hu.shape, sp, (12.0, -5.0, 30.0)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("protocol_in")
    for i, vid in enumerate(("tr_a", "tr_b", "va_c", "te_d")):
        save_ct(root / "volumes" / f"{vid}.nii.gz", phantom(10.0 * i))
    (root / "splits.json").write_text(json.dumps({"train": ["tr_a", "tr_b"], "val": ["va_c"], "test": ["te_d"]}))
    return root / "volumes", root / "splits.json"


def test_honest_views_for_val_test_only_keyed_by_the_detector(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    vols, splits = inputs
    out = tmp_path / "p"
    p = small_params()
    res = run_preprocess(vols, splits, out, p, progress=False)
    assert sorted(f.name for f in (out / "xrays_honest").iterdir()) == ["te_d.npz", "va_c.npz"]
    man = read_manifest(out)
    assert man["xrays_honest"]["detector"]["photons_per_pixel"] == p.eval.detector.photons_per_pixel
    assert man["xrays_honest"]["splits"] == ["val", "test"]
    assert xray_honest_file("va_c") in man["items"]["va_c"]["files"]
    assert xray_honest_file("tr_a") not in man["items"]["tr_a"]["files"]
    assert len(res.processed) == 4

    # a rerun touches nothing; a detector change redoes exactly the honest files
    assert run_preprocess(vols, splits, out, p, progress=False).files_written == 0
    clean_before = (out / xray_file("te_d")).read_bytes()
    honest_before = (out / xray_honest_file("te_d")).read_bytes()
    train_before = (out / xray_file("tr_a")).read_bytes()
    res2 = run_preprocess(vols, splits, out, small_params(detector={"scatter_fraction": 0.5}), progress=False)
    # val/test: the honest views; train: the DRRs that pass through the same detector (train_detector)
    assert res2.files_written == 4 and sorted(res2.processed) == ["te_d", "tr_a", "tr_b", "va_c"]
    assert (out / xray_file("te_d")).read_bytes() == clean_before
    assert (out / xray_file("tr_a")).read_bytes() != train_before
    assert (out / xray_honest_file("te_d")).read_bytes() != honest_before
    assert read_manifest(out)["params_digest"] != man["params_digest"]

    # a test id moved to train loses its honest views (train keeps the training renderer only)
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({"train": ["tr_a", "tr_b", "te_d"], "val": ["va_c"], "test": []}))
    res3 = run_preprocess(vols, moved, out, p, progress=False)
    assert "xrays_honest/te_d.npz" in res3.removed and not (out / xray_honest_file("te_d")).exists()
    assert xray_honest_file("te_d") not in json.loads(record_path(out, "te_d").read_text())["files"]


def test_train_detector_corrupts_exactly_the_train_views(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """preprocess.train_detector: a train id's stored DRRs are detector_postprocess of the clean
    training-renderer DRRs (same per-(seed, id, view) noise, bit for bit); val/test untouched;
    the switch and the detector params are in the train DRRs' cache key; off = as before."""
    vols, splits = inputs
    on, off = tmp_path / "on", tmp_path / "off"
    p_on = small_params()
    p_off = small_params(preprocess={"train_detector": False})
    assert p_on.preprocess.train_detector and not p_off.preprocess.train_detector
    run_preprocess(vols, splits, on, p_on, progress=False)
    run_preprocess(vols, splits, off, p_off, progress=False)
    model = DetectorModel.from_params(p_on)
    assert not model.noise_free and model.scatter_fraction > 0  # the defaults corrupt
    for vid in ("tr_a", "tr_b"):
        with np.load(on / xray_file(vid)) as zc, np.load(off / xray_file(vid)) as zo:
            clean = {v: zo[v] for v in VIEWS}
            for view in VIEWS:
                want = detector_postprocess(clean[view], model, p_on.drr.pixel_mm, noise_rng(model.seed, vid, view))
                np.testing.assert_array_equal(zc[view], want.astype(np.float32))
                assert np.abs(zc[view] - clean[view]).mean() > 1e-3  # scatter + noise changed it
            assert json.loads(str(zc["geometry"]))["detector"] == model.to_json()
            assert "detector" not in json.loads(str(zo["geometry"]))
    for vid in ("va_c", "te_d"):  # val/test: clean DRRs and honest views identical either way
        for rel in (xray_file(vid), xray_honest_file(vid)):
            assert (on / rel).read_bytes() == (off / rel).read_bytes(), rel
    man_on, man_off = read_manifest(on), read_manifest(off)
    assert man_on["xrays"]["train_detector"]["detector"] == model.to_json()
    assert "train_detector" not in man_off["xrays"] and "train_detector" not in man_off["params"]
    assert man_on["params_digest"] != man_off["params_digest"]

    # keys: off = the pre-switch key for every split; on changes train only, and follows the detector
    s_on, s_off = PreprocessSettings.from_params(p_on), PreprocessSettings.from_params(p_off)
    s_scatter = PreprocessSettings.from_params(small_params(detector={"scatter_fraction": 0.3}))
    sha = "0" * 64
    assert s_off.xray_key(sha, None, train=True) == s_off.xray_key(sha) == s_on.xray_key(sha)
    assert len({s_off.xray_key(sha, None, True), s_on.xray_key(sha, None, True), s_scatter.xray_key(sha, None, True)}) == 3
    assert s_scatter.xray_key(sha) == s_on.xray_key(sha)  # val/test DRRs: not keyed by the detector

    # switching it off restores the clean train DRRs bit for bit (only those are rewritten)
    res = run_preprocess(vols, splits, on, p_off, progress=False)
    assert res.files_written == 2 and res.processed == ["tr_a", "tr_b"]
    for vid in ("tr_a", "tr_b", "va_c", "te_d"):
        assert (on / xray_file(vid)).read_bytes() == (off / xray_file(vid)).read_bytes()


def test_dataset_cases_serve_the_protocols_views(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    vols, splits = inputs
    out = tmp_path / "p"
    run_preprocess(vols, splits, out, small_params(), progress=False)
    honest = list(dataset_cases(out, 2, "test", xrays="honest"))
    clean = list(dataset_cases(out, 2, "test", xrays="clean"))
    assert [c.id for c in honest] == [c.id for c in clean] == ["te_d"]
    h, c = honest[0], clean[0]
    with np.load(out / xray_honest_file("te_d")) as z:
        np.testing.assert_array_equal(h.frontal, z["frontal"])
    gap = float(np.sqrt(np.mean((h.frontal - c.frontal) ** 2)))
    assert 0.005 < gap < 0.5 * float(c.frontal.max())
    np.testing.assert_array_equal(h.target_hu, c.target_hu)
    assert h.geometries["frontal"] == c.geometries["frontal"]
    with pytest.raises(ValueError, match="xrays"):
        list(dataset_cases(out, 2, "test", xrays="dirty"))


def test_protocol_names_itself_and_records_the_detector() -> None:
    honest = EvalProtocol.from_params(small_params())
    clean = EvalProtocol.from_params(small_params(protocol="clean"))
    assert honest.xrays == "honest" and clean.xrays == "clean"
    assert clean.label == "clean (inverse-crime)" == PROTOCOL_LABELS["clean"] and honest.label.startswith("honest")
    rec = honest.record()
    assert rec["eval_protocol"] == "honest" and rec["eval_detector"]["scatter_fraction"] == 0.1
    assert "Poisson" in rec["eval_detector_text"]
    assert clean.record() == {"eval_protocol": "clean", "eval_protocol_label": "clean (inverse-crime)"}
    assert load_params(REPO / "params.yaml").eval.protocol == "honest"  # the demo's default


# --------------------------------------------------------------------------- the twin


def _export(path: Path, net: torch.nn.Module, params, step: int, *, mode: str, anchor=None) -> Path:
    from xct_core.checkpoint import export_stage_model

    return export_stage_model(path, net, params_json=params.model_dump_json(), stage=1, name="stage1", mode=mode,
                              step=step, anchor=anchor)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("anchored", [True, False])
def test_evaluation_compares_against_the_twin_the_model_ships(tmp_path: Path, anchored: bool) -> None:
    from xct_core.inference import load_stage
    from xct_core.layout import RunLayout
    from xct_core.models import build_stage

    p = small_params()
    if anchored:  # residual diffusion over the twin (params.yaml's choice); the schema default is "none"
        p = params_from_dict({**json.loads(p.model_dump_json()),
                              "stages": {k: {**json.loads(v.model_dump_json()), "anchor": "direct"}
                                         for k, v in p.stages.items()}})
    torch.manual_seed(0)
    diff = build_stage(p, 1)
    twin_best, twin_final = build_stage(p, 1, mode="direct"), build_stage(p, 1, mode="direct")
    with torch.no_grad():
        for t in twin_final.parameters():
            t.add_(1.0)  # the last step's twin: other weights than best's
    lay = RunLayout(tmp_path, 1)
    _export(lay.model("best"), diff, p, 300, mode="diffusion", anchor=twin_best if anchored else None)
    _export(lay.model("direct"), twin_final, p, 1200, mode="direct")
    best = load_stage(lay.model("best"), p, 1)
    twin, source = stage_twin(best, lay.model("direct"), p, 1)
    if anchored:  # best.pt's own twin, not direct.pt (step 1200)
        assert twin is not None and _same(twin, twin_best) and not _same(twin, twin_final)
        assert "best.pt (step 300)" in source
        assert twin_of(best, load_stage(lay.model("direct"), p, 1)) is twin  # whatever direct evaluate_case is given
    else:  # direct.pt is from another step: no twin rather than a wrong one
        assert twin is None and "step 1200" in source and "step 300" in source
        _export(lay.model("direct"), twin_best, p, 300, mode="direct")
        twin, source = stage_twin(best, lay.model("direct"), p, 1)
        assert twin is not None and _same(twin, twin_best) and source == "direct.pt (step 300)"


# --------------------------------------------------------------------------- no mirrored chests


def test_left_right_flips_need_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigError, match="heart on the right"):
        params_from_dict({"preprocess": {"augment": {"copies": 1, "flip_lr": 0.5}}})
    ok = params_from_dict({"preprocess": {"augment": {"copies": 1, "flip_lr": 0.5, "allow_lr_flip": True}}})
    assert ok.preprocess.augment.flip_lr == 0.5
    realct = load_params(REPO / "params.yaml", overlays=[REPO / "params.realct.yaml"])
    assert realct.preprocess.augment.flip_lr == 0.0 and realct.preprocess.augment.copies > 0
