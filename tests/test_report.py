"""HTML report builder (xct_core.report): pictures written and referenced, tables complete,
text escaped. Small synthetic volumes; pictures people look at go to the artifacts dir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xct_core.config import Params
from xct_core.evaluation import EvalProtocol
from xct_core.hu import get_window
from xct_core.metrics import ssim_taps
from xct_core.report import ReportCase, build_report, read_gate_reports, save_case_images, save_training_curves


def _volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 16
    c = np.arange(n) - (n - 1) / 2
    X, Y, Z = np.meshgrid(c, c, c, indexing="ij")
    gt = np.where(X**2 + Y**2 + Z**2 < 36, 40.0, -1000.0).astype(np.float32)
    gt[X > 4] += 300.0  # right/left asymmetry
    rec = gt + 25.0
    std = np.abs(X).astype(np.float32)
    return gt, rec, std


def _img_srcs(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_with_pictures_tables_gates_and_curves(tmp_path: Path, artifacts_dir: Path) -> None:
    gt, rec, std = _volumes()
    out = tmp_path / "rep"
    w = get_window("soft_tissue")
    xr = {"frontal": (np.ones((8, 8), np.float32), np.full((8, 8), 2.0, np.float32))}
    imgs = save_case_images(out / "images", "p<1>", volumes={"reconstruction": rec}, window=w,
                            spacing=np.diag([3.0, 3.0, 3.0, 1.0]), ground_truth=gt, uncertainty=std, xrays=xr)
    assert set(imgs) == {"slices", "xrays"} and all(p.is_file() for p in imgs.values())
    with Image.open(imgs["slices"]) as im:  # rows: gt, recon, error, uncertainty (4 rows x 6 panels)
        assert im.height > 300 and im.width > im.height
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "stage1.json").write_text(json.dumps({"stage": 1, "passed": False, "checks": [
        {"name": "psnr", "metric": "psnr_window_db", "op": ">", "threshold": 28.0, "value": 21.5, "passed": False,
         "margin": -6.5}]}))
    train = tmp_path / "train"
    (train / "plots" / "stage1").mkdir(parents=True)
    (train / "plots" / "stage1" / "train.csv").write_text("step,loss,lr\n1,1.0,0.001\n2,0.5,0.001\n3,0.25,0.001\n")
    curves = save_training_curves(train, out / "images")
    assert set(curves) == {"stage1"} and curves["stage1"].is_file()
    m = {"psnr_hu_db": 18.5, "psnr_window_db": 22.0, "ssim_window": 0.5, "mae_hu": 80.0, "psnr_slice_avg_db": 23.0,
         "baseline_psnr_hu_db": 15.0, "baseline_psnr_window_db": 17.25, "direct_psnr_window_db": 20.125}
    ctx = EvalProtocol.from_params(Params()).label_context(gt.shape[0])
    html_path = build_report(out / "report.html", title="t", cases=[ReportCase("p<1>", m, imgs)], summary=m,
                             notes=["mean-volume baseline: leave-one-out"], warnings=["low <PSNR>"],
                             gates=read_gate_reports(gates), curves=curves, info={"model": "models:/x@champion"},
                             label_context=ctx)
    html = html_path.read_text()
    srcs = _img_srcs(html)
    assert len(srcs) == 3 and all((out / s).is_file() for s in srcs) and not any(s.startswith("/") for s in srcs)
    assert "p&lt;1&gt;" in html and "<1>" not in html and "low &lt;PSNR&gt;" in html
    assert "mean volume" in html and "direct regression" in html and "17.25" in html and "20.12" in html
    assert "psnr_window_db" in html and "FAIL" in html and "21.5" in html
    assert "slice-average" in html  # X2CT-style numbers are labelled
    (artifacts_dir / "report_slices.png").write_bytes(imgs["slices"].read_bytes())


def test_report_without_optional_parts(tmp_path: Path) -> None:
    """One case, no ground truth/gates/curves: still a valid page; no empty sections."""
    _, rec, _ = _volumes()
    imgs = save_case_images(tmp_path / "images", "only", volumes={"reconstruction": rec}, window=get_window("wide"))
    html = build_report(tmp_path / "r.html", title="solo", cases=[ReportCase("only", {"psnr_hu_db": 1.0}, imgs)],
                        label_context=EvalProtocol.from_params(Params()).label_context()).read_text()
    assert "3D PSNR [-1024,1024] HU, range 2048 (dB)" in html  # the HU range of params, in the label
    assert "Promotion gates" not in html and "Training curves" not in html and "mean volume" not in html
    assert [s for s in _img_srcs(html)] == ["images/only_slices.png"]
    assert save_training_curves(tmp_path / "missing", tmp_path / "images") == {}
    assert read_gate_reports(tmp_path / "missing") == []


def test_ssim_label_states_the_taps_actually_used(tmp_path: Path) -> None:
    """The SSIM row's label comes from the taps the evaluator used on that grid
    (:func:`xct_core.metrics.ssim_taps`: 7 at 16³, 11 at 64³), never a fixed "11³"; without
    the grid's context the report refuses to guess."""
    protocol = EvalProtocol.from_params(Params())
    m = {"ssim_window": 0.5, "psnr_window_db": 20.0}
    labels = {}
    for size in (16, 64):
        html = build_report(tmp_path / f"r{size}.html", title="t", cases=[ReportCase("a", m)], summary=m,
                            label_context=protocol.label_context(size)).read_text()
        row = re.search(r"<td>(3D SSIM in the window[^<]*)</td>", html)
        assert row, html
        labels[size] = row.group(1)
    taps16, taps64 = ssim_taps(16, protocol.ssim_win), ssim_taps(64, protocol.ssim_win)
    assert (taps16, taps64) == (7, 11)
    assert f"{taps16}³" in labels[16] and "11³" not in labels[16]
    assert f"{taps64}³" in labels[64] and f"σ {protocol.ssim_sigma:g}" in labels[64]
    with pytest.raises(ValueError, match="ssim_window"):
        build_report(tmp_path / "none.html", title="t", cases=[ReportCase("a", m)], summary=m)
    assert not (tmp_path / "none.html").exists()


def test_stage_two_report_shows_the_previous_stage_upsampled_and_the_gain(tmp_path: Path) -> None:
    """A stage-2 summary (>= 5 patients) gets the "previous stage upsampled" column and the
    gain over it with its patient interval; a stage-1 summary has neither."""
    from xct_core.intervals import bootstrap_interval

    ctx = EvalProtocol.from_params(Params()).label_context(32)
    cases = [ReportCase(f"p{i}", {"psnr_window_db": 25.0 + i, "upsampled_psnr_window_db": 24.0 + 0.9 * i,
                                  "gain_over_upsampled_db": 1.0 + 0.1 * i}) for i in range(6)]
    summary = {k: float(np.mean([c.metrics[k] for c in cases])) for k in cases[0].metrics}
    html = build_report(tmp_path / "r2.html", title="t", cases=cases, summary=summary, label_context=ctx).read_text()
    head = re.search(r"<h2>Cascade and baselines.*?<thead>(.*?)</thead>", html, re.S).group(1)
    assert "<th>previous stage upsampled</th>" in head
    iv = bootstrap_interval([c.metrics["gain_over_upsampled_db"] for c in cases])["interval"]
    assert (f"PSNR gain in the window over the previous stage upsampled (dB): {summary['gain_over_upsampled_db']:.4g} "
            f"[{iv[0]:.4g}, {iv[1]:.4g}]") in html
    one = [ReportCase(c.case_id, {"psnr_window_db": c.metrics["psnr_window_db"]}) for c in cases]
    html1 = build_report(tmp_path / "r1.html", title="t", cases=one, summary={"psnr_window_db": 27.5},
                         label_context=ctx).read_text()
    assert "previous stage upsampled" not in html1
