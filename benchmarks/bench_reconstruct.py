#!/usr/bin/env python
"""Reconstruction latency: the path `xct reconstruct` runs, per cascade stage and in total.

Usage::

    python benchmarks/bench_reconstruct.py                                   # CPU, demo profile (16³/32³/64³)
    python benchmarks/bench_reconstruct.py --samples 1 2 --repeats 3 --repeats-k 1   # how K samples scale
    python benchmarks/bench_reconstruct.py --device cuda --profile production  # one GPU: 64³/128³/256³

What is timed (the functions ``xct reconstruct`` calls, in its order; one "run" = one user
invocation with a local model folder):

1. ``load_inputs`` — :func:`xct_core.xray_io.load_xray` of the frontal and lateral
   ``.npy`` + ``.json`` (as written by ``xct drr``) and
   :func:`~xct_core.xray_io.input_geometries`;
2. ``load_models`` — :func:`~xct_core.inference.load_stages` of the exported stage files
   (rebuild, lifting grids, weights, ``.to(device)``);
3. sampling — :func:`~xct_core.inference.reconstruct`: K samples of the cascade
   (:func:`xct_core.cascade.sample_cascade` → :func:`xct_core.diffusion.ddim_sample`,
   ``steps`` DDIM steps per stage, ``diffusion.eta`` of the params), split into
   ``setup`` (schedule, input tensors, generators), ``stage k`` (its X-ray encoding, for
   k > 1 its conditioning — upsampling + noise augmentation of stage k−1's output — and its
   DDIM loop; summed over the K samples), ``hu_conversion`` (the sampler's last update
   after the final network call, window inverse to HU, the running mean/std) and
   ``finalize`` (the std of K samples, output affine);
4. ``qa`` — :func:`~xct_core.qa.reprojection_qa` (DRRs of the output, PSNR/SSIM);
5. ``write`` — :func:`xct_core.io.save_nifti` of the mean (and std for K > 1) and the QA
   JSON (atomic writes), as the command does.

``total`` is the wall time from 1 to 5, measured on its own; ``overhead`` = every timed
piece except the stages; ``unaccounted`` = total − stages − overhead (Python glue between
the pieces; reported so that the bookkeeping can be checked). Stage boundaries come from
probes on the loaded networks: a wrapper on each stage's ``encode_views`` (the first thing
``sample_cascade`` does for a stage) and a forward hook that counts network evaluations per
sample, i.e. batch rows (= DDIM steps; ``forwards_per_sample``: ``reconstruct.sample_batch``
samples share one batched forward, each of its rows counts once). On CUDA each probe calls
``torch.cuda.synchronize()`` first — once per network forward, negligible next to a
forward at these grid sizes.

Per configuration: ``--warmup`` un-recorded runs (allocator growth, oneDNN/cuDNN plans,
CUDA context), then ``--repeats`` recorded runs; median and min over the repeats are
reported, and the per-DDIM-step time = stage time / forwards (per sample and step, so
amortised over a batch of samples).

Memory: CPU — peak resident set size of this process during the run (``VmHWM`` after
resetting it via ``/proc/self/clear_refs``; includes Python, torch and the loaded models);
CUDA — ``torch.cuda.max_memory_allocated()`` during the run (tensors only, not the CUDA
context or the allocator cache).

Precision: ``fp32`` is what ``xct reconstruct`` does on every device (xct_core/inference.py
uses no autocast); ``bf16`` wraps the sampling in ``torch.autocast(dtype=bfloat16)`` to show
what bf16 inference would give — NOT the shipped path (default on CUDA: both).

Models and inputs: stage networks of the profile's exact architecture with random weights
(``build_stage`` + the real exporter) — latency does not depend on the weights (no
data-dependent control flow in the networks or the sampler); a procedural torso phantom at
the finest stage grid, rendered to both views with the profile's ``drr`` geometry by the
same code as ``xct drr`` (line integrals + geometry JSON).

``--meta-check`` (default on) runs the production cascade's shapes through the same stage
probes and :func:`xct_core.cascade.sample_cascade` on the meta device (no compute, no
memory): it checks that 64³/128³/256³ fit together and that every stage does exactly
``steps`` network evaluations, so the GPU run has been exercised wherever no GPU is.

This module imports only torch, numpy and xct_core (no ray, mlflow, typer): it runs on a
bare torch GPU box. Results: ``benchmarks/results/reconstruct_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from xct_core.config import Params, load_params  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
VIEWS = ("frontal", "lateral")
#: phantom index of the benchmark input (any phantom: latency does not depend on it)
PHANTOM_INDEX = 0
K_SCALING_UNDER_LOAD = (
    "Under a load that changes between configurations the K-scaling rows are not a clean measurement: the "
    "sampling work is K × one sample by construction (K independent cascade runs, seeds seed … seed+K−1), so "
    "expect sampling(K) ≈ K × sampling(1) on an idle machine.")


# ----------------------------------------------------------------------------- device helpers


class Device:
    """Synchronisation and peak-memory bookkeeping for ``cpu`` / ``cuda`` / ``meta``."""

    def __init__(self, name: str) -> None:
        self.dev = torch.device(name)
        self.kind = self.dev.type

    def sync(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        elif self.kind == "cpu":
            _reset_hwm()

    def peak(self) -> tuple[float, str]:
        """``(GiB, method)`` since the last :meth:`reset_peak`."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated(self.dev) / 2**30, "torch.cuda.max_memory_allocated"
        hwm = _status_kib("VmHWM")
        if hwm is not None and _HWM_RESETTABLE[0]:
            return hwm / 2**20, "peak RSS of the process during the run (VmHWM, reset before it)"
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (r if sys.platform == "darwin" else r * 1024) / 2**30, "peak RSS since process start (ru_maxrss)"


_HWM_RESETTABLE = [True]


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        _HWM_RESETTABLE[0] = False


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:  # not Linux: the caller falls back to ru_maxrss
        return None
    return None


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:  # not Linux: keep platform's answer
        cpu = platform.processor() or platform.machine()
    desc = (f"{os.cpu_count()}-core CPU dev machine ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        desc = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), " + desc
    return desc


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


# ----------------------------------------------------------------------------- setup


def profile_params(profile: str, params_path: Path, overlay: Path) -> Params:
    """``params_path`` alone (demo) or with the production overlay deep-merged over it."""
    return load_params(params_path, [overlay] if profile == "production" else [])


def make_inputs(params: Params, out_dir: Path) -> dict[str, Path]:
    """A phantom at the finest stage grid rendered to ``{view}.npy`` + ``{view}.json`` with
    the same calls and JSON fields ``xct drr`` uses (line integrals, placed geometry)."""
    from xct_core.atomic import write_bytes_atomic, write_text_atomic
    from xct_core.drr import joseph_applies, render
    from xct_core.geometry import ProjectionGeometry
    from xct_core.phantoms import make_phantom

    last = list(params.stages.values())[-1]
    hu, _, affine = make_phantom(last.size, float(last.fov_mm) / last.size, PHANTOM_INDEX)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for view in VIEWS:
        placed = ProjectionGeometry.from_params(params.drr, view).place(affine, hu.shape)  # type: ignore[arg-type]
        method = ("reference" if params.drr.method == "reference" or not joseph_applies(affine, placed, hu.shape)
                  else "joseph")
        img = render(hu, affine, placed, mu_water=params.hu.mu_water, quantity="line_integral",
                     method=method, step_fraction=params.drr.step_fraction)  # type: ignore[arg-type]
        arr = np.ascontiguousarray(img.detach().cpu().numpy(), dtype=np.float32)
        meta = {"format": "xct-drr/1", **placed.to_json(), "quantity": "line_integral", "mu_water": params.hu.mu_water,
                "i0": params.drr.i0, "method": method, "step_fraction": params.drr.step_fraction,
                "ct": {"path": f"phantom #{PHANTOM_INDEX}", "shape": list(hu.shape), "affine": affine.tolist()}}
        npy = out_dir / f"{view}.npy"
        buf = _npy_bytes(arr)
        write_bytes_atomic(npy, buf)
        write_text_atomic(npy.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
        files[view] = npy
    return files


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def export_models(params: Params, out_dir: Path, seed: int = 0) -> list[Path]:
    """Random-weight stage networks of the profile's architecture, exported with the real
    exporter (what a trained model folder holds, minus the training)."""
    from xct_core.checkpoint import export_stage_model
    from xct_core.models import AnchoredStage, build_sampling_stage

    files = []
    for k, name in enumerate(params.stages, start=1):
        torch.manual_seed(1000 * seed + k)
        path = out_dir / f"stage{k}.pt"
        stage = build_sampling_stage(params, k)  # an anchored stage carries its direct twin
        net, twin = (stage.diffusion, stage.anchor) if isinstance(stage, AnchoredStage) else (stage, None)
        export_stage_model(path, net, params_json=params.model_dump_json(), stage=k,
                           name=name, mode="diffusion", step=0, anchor=twin)
        files.append(path)
    return files


# ----------------------------------------------------------------------------- stage probes


class StageProbe:
    """Timestamps at the stage boundaries of :func:`xct_core.cascade.sample_cascade`.

    Installs, on each stage network, a wrapper around ``encode_views`` (event ``enc k``:
    stage k begins) and a forward hook (event ``fwd k``: one network evaluation of stage k
    finished); :meth:`mark` adds the caller's own events (``start``, ``say`` — the
    per-sample log line :func:`~xct_core.inference.reconstruct` emits after the HU
    conversion —, ``end``). Every event first synchronises the device.
    """

    def __init__(self, nets: Sequence[nn.Module], device: Device) -> None:
        self.nets = list(nets)
        self.device = device
        self.events: list[tuple[str, int, float]] = []
        self.rows: dict[int, int] = {}  # event index of a forward → its batch rows (1 where absent)
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []

    def mark(self, kind: str, k: int = 0) -> None:
        self.device.sync()
        self.events.append((kind, k, time.perf_counter()))

    def _fwd(self, k: int, out: torch.Tensor) -> None:
        self.mark("fwd", k)
        self.rows[len(self.events) - 1] = int(out.shape[0])

    def __enter__(self) -> StageProbe:
        from xct_core.models.stage import unwrap

        for k, model in enumerate(self.nets, start=1):
            net = unwrap(model)
            orig = net.encode_views

            def encode_views(*args: Any, _k: int = k, _orig: Callable[..., Any] = orig, **kw: Any) -> Any:
                self.mark("enc", _k)
                return _orig(*args, **kw)

            net.encode_views = encode_views  # instance attribute shadows the method
            self._patched.append(net)
            self._handles.append(model.register_forward_hook(lambda _m, _a, o, _k=k: self._fwd(_k, o)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for net in self._patched:
            del net.encode_views
        self._handles, self._patched = [], []

    def attribute(self, last_stage: int) -> tuple[dict[str, float], dict[int, int]]:
        """Seconds per segment label and network forwards per stage (module docstring)."""
        seconds: dict[str, float] = defaultdict(float)
        forwards: Counter[int] = Counter()  # network evaluations of one sample: a forward counts its rows
        for i, (kind, k, _) in enumerate(self.events):
            if kind == "fwd":
                forwards[k] += self.rows.get(i, 1)
        for (k0, s0, t0), (k1, s1, t1) in pairwise(self.events):
            seconds[_segment(k0, s0, k1, s1, last_stage)] += t1 - t0
        return dict(seconds), dict(forwards)


def _segment(k0: str, s0: int, k1: str, s1: int, last: int) -> str:
    """The label of the time between two consecutive probe events."""
    if k0 in ("start", "say") and k1 == "enc" and s1 == 1:
        return "setup"
    if k0 in ("enc", "fwd") and ((k1 == "fwd" and s1 == s0) or (k1 == "enc" and s1 == s0 + 1)):
        return f"stage{s0}"
    if k0 == "fwd" and s0 == last and k1 == "say":
        return "hu_conversion"
    if k0 == "say" and k1 == "end":
        return "finalize"
    raise RuntimeError(f"unexpected probe event order: {k0} {s0} -> {k1} {s1}")


# ----------------------------------------------------------------------------- one run


def run_once(
    params: Params,
    inputs: dict[str, Path],
    model_files: Sequence[Path],
    out_dir: Path,
    device: Device,
    *,
    steps: int | None,
    samples: int,
    upto: int,
    precision: str,
    seed: int = 0,
) -> dict[str, Any]:
    """One ``xct reconstruct`` invocation's work (module docstring), timed piece by piece."""
    from xct_core.atomic import write_text_atomic
    from xct_core.inference import load_stages, reconstruct
    from xct_core.io import save_nifti
    from xct_core.qa import reprojection_qa
    from xct_core.xray_io import input_geometries, load_xray

    clock = time.perf_counter
    device.reset_peak()
    device.sync()
    t0 = clock()
    xf = load_xray(inputs["frontal"], "frontal", params)
    xl = load_xray(inputs["lateral"], "lateral", params)
    iso, geoms = input_geometries(xf, xl, params)
    t1 = clock()
    nets = load_stages(model_files, params, device.dev)
    device.sync()
    t2 = clock()
    amp = precision == "bf16"
    with StageProbe(nets, device) as probe:
        probe.mark("start")
        with torch.autocast(device.kind, dtype=torch.bfloat16, enabled=amp):
            rec = reconstruct(nets, params, xf.image, xl.image, isocenter=iso, steps=steps, samples=samples,
                              seed=seed, upto=upto, device=device.dev, log=lambda _m: probe.mark("say"))
        probe.mark("end")
    t3 = clock()
    qa, _ = reprojection_qa(rec.mean_hu, rec.affine, geoms, {"frontal": xf.image, "lateral": xl.image}, params)
    t4 = clock()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_nifti(out_dir / "ct.nii.gz", rec.mean_hu, rec.affine)
    if rec.std_hu is not None:
        save_nifti(out_dir / "ct_std.nii.gz", rec.std_hu, rec.affine)
    write_text_atomic(out_dir / "ct.qa.json", json.dumps({"reprojection": qa, "steps": rec.steps,
                                                          "seeds": rec.seeds}, indent=2, default=float) + "\n")
    t5 = clock()
    peak, mem_method = device.peak()
    seconds, forwards = probe.attribute(upto)
    stage_s = {k: seconds.get(f"stage{k}", 0.0) for k in range(1, upto + 1)}
    over = {
        "load_inputs_s": t1 - t0,
        "load_models_s": t2 - t1,
        "setup_s": seconds.get("setup", 0.0),
        "hu_conversion_s": seconds.get("hu_conversion", 0.0),
        "finalize_s": seconds.get("finalize", 0.0),
        "qa_s": t4 - t3,
        "write_s": t5 - t4,
    }
    total = t5 - t0
    sampling = sum(stage_s.values())
    overhead = sum(over.values())
    del nets
    return {
        "samples": samples, "steps": rec.steps, "precision": precision,
        "stage_s": stage_s, "forwards": {k: forwards.get(k, 0) for k in range(1, upto + 1)},
        **over, "sampling_s": sampling, "overhead_s": overhead, "total_s": total,
        "unaccounted_s": total - sampling - overhead, "reconstruct_call_s": t3 - t2,
        "peak_mem_gib": peak, "mem_method": mem_method,
        "output_shape": list(rec.mean_hu.shape), "output_finite": bool(np.isfinite(rec.mean_hu).all()),
    }


def summarise(runs: list[dict[str, Any]], params: Params, upto: int) -> dict[str, Any]:
    """Median / min over the recorded runs of one configuration."""

    def stat(vals: list[float]) -> dict[str, float]:
        return {"median_s": statistics.median(vals), "min_s": min(vals)}

    r0 = runs[0]
    k_samples = int(r0["samples"])
    stages = []
    for k in range(1, upto + 1):
        cfg = list(params.stages.values())[k - 1]
        times = [r["stage_s"][k] for r in runs]
        fwd = [r["forwards"][k] for r in runs]
        per_step = [t / f for t, f in zip(times, fwd, strict=True) if f]
        stages.append({
            "stage": k, "name": list(params.stages)[k - 1], "size": cfg.size,
            "includes": "X-ray encoding + DDIM loop" + (" + conditioning (upsample + noise augmentation of "
                                                        f"stage {k - 1}'s output)" if k > 1 else ""),
            **stat(times), "per_sample_median_s": statistics.median(times) / k_samples,
            "forwards_per_sample": fwd[0] / k_samples if len(set(fwd)) == 1 else None,
            "per_ddim_step_median_s": statistics.median(per_step) if per_step else None,
        })
    keys = ["load_inputs_s", "load_models_s", "setup_s", "hu_conversion_s", "finalize_s", "qa_s", "write_s"]
    return {
        "samples": k_samples, "steps": r0["steps"], "precision": r0["precision"], "repeats": len(runs),
        "stages": stages,
        "overhead": {k: stat([r[k] for r in runs]) for k in keys},
        "sampling": stat([r["sampling_s"] for r in runs]),
        "overhead_total": stat([r["overhead_s"] for r in runs]),
        "total": stat([r["total_s"] for r in runs]),
        "unaccounted": stat([r["unaccounted_s"] for r in runs]),
        "peak_mem_gib": max(r["peak_mem_gib"] for r in runs), "mem_method": r0["mem_method"],
        "runs": runs,
    }


# ----------------------------------------------------------------------------- meta check


def meta_check(params: Params, steps: int, profile: str) -> dict[str, Any]:
    """The cascade's shapes on the meta device through the same probes (no compute)."""
    from xct_core.cascade import sample_cascade
    from xct_core.diffusion import Sampler
    from xct_core.models import build_sampling_stage

    nets = [build_sampling_stage(params, k, device="meta").eval() for k in range(1, len(params.stages) + 1)]
    P = params.drr.pixels
    with torch.device("meta"):
        f, lat = torch.empty(1, 1, P, P), torch.empty(1, 1, P, P)
    with StageProbe(nets, Device("meta")) as probe:
        probe.mark("start")
        outs = sample_cascade(nets, f, lat, sampler=Sampler.from_params(params, steps), generator=None)
        probe.mark("say")
        probe.mark("end")
    _, forwards = probe.attribute(len(nets))
    sizes = [c.size for c in params.stages.values()]
    shapes = [list(o.shape) for o in outs]
    ok = shapes == [[1, 1, s, s, s] for s in sizes] and all(forwards.get(k) == steps for k in range(1, len(nets) + 1))
    return {"profile": profile, "device": "meta", "steps": steps, "stage_sizes": sizes, "output_shapes": shapes,
            "forwards_per_stage": [forwards.get(k, 0) for k in range(1, len(nets) + 1)],
            "params_M": [round(sum(p.numel() for p in n.parameters()) / 1e6, 3) for n in nets],
            "drr_pixels": P, "ok": ok}


# ----------------------------------------------------------------------------- report


def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def render_md(doc: dict[str, Any]) -> str:
    lines = [f"# Reconstruction latency ({doc['device']})", "",
             f"Machine: {doc['machine']}  ", f"GPU: {doc['gpu']}  ", f"Date: {doc['date']}  ",
             f"Command: `{doc['command']}`  ",
             f"Load average (1/5/15 min) at start {doc['loadavg_start']}, at end {doc['loadavg_end']}"
             + (" — **taken under load** (the machine is shared)" if doc.get("under_load") else ""), "",
             f"Profile: {doc['profile']}; stages {' → '.join(str(s['size']) + '³' for s in doc['architecture'])}; "
             f"DRR {doc['drr']['pixels']}² {doc['drr']['geometry']} beam; DDIM steps {doc['steps']} "
             f"({doc['steps_source']}), eta {doc['eta']:g}; warm-up runs {doc['warmup']}.", "",
             "| stage | grid | tokens | dim × depth | params (M) |", "|---|---|---|---|---|"]
    for s in doc["architecture"]:
        lines.append(f"| {s['name']} | {s['size']}³ | {s['token_grid']}³ | {s['dim']} × {s['depth']} | {s['params_M']:.2f} |")
    for res in doc["results"]:
        k = res["samples"]
        lines += ["", f"## K = {k} sample{'s' if k > 1 else ''}, {res['precision']}, {res['repeats']} repeats "
                  "(seconds; stage rows summed over the K samples)", "",
                  "| part | median | min | per sample (median) | forwards / sample | per DDIM step (median of stage / forwards) |",
                  "|---|---|---|---|---|---|"]
        for s in res["stages"]:
            lines.append(f"| stage {s['stage']} ({s['size']}³{', incl. conditioning' if s['stage'] > 1 else ''}) | "
                         f"{_f(s['median_s'])} | {_f(s['min_s'])} | {_f(s['per_sample_median_s'])} | "
                         f"{_f(s['forwards_per_sample'], 0)} | {_f(s['per_ddim_step_median_s'], 4)} |")
        lines.append(f"| **sampling (all stages)** | {_f(res['sampling']['median_s'])} | {_f(res['sampling']['min_s'])} "
                     f"| {_f(res['sampling']['median_s'] / k)} | | |")
        names = {"load_inputs_s": "load inputs (.npy + .json)", "load_models_s": "load stage models",
                 "setup_s": "sampler setup", "hu_conversion_s": "HU conversion (+ last DDIM update)",
                 "finalize_s": "finalize (std)", "qa_s": "reprojection QA (2 DRRs + PSNR/SSIM)",
                 "write_s": "write NIfTI + QA JSON"}
        for key, label in names.items():
            o = res["overhead"][key]
            lines.append(f"| {label} | {_f(o['median_s'])} | {_f(o['min_s'])} | | | |")
        lines.append(f"| **overhead (non-sampling)** | {_f(res['overhead_total']['median_s'])} | "
                     f"{_f(res['overhead_total']['min_s'])} | | | |")
        lines.append(f"| **total** | {_f(res['total']['median_s'])} | {_f(res['total']['min_s'])} | | | |")
        lines.append(f"| unaccounted (total − stages − overhead) | {_f(res['unaccounted']['median_s'], 4)} | "
                     f"{_f(res['unaccounted']['min_s'], 4)} | | | |")
        lines += ["", f"Peak memory: {res['peak_mem_gib']:.2f} GiB ({res['mem_method']})."]
    if len(doc["results"]) > 1:
        lines += ["", "## Scaling with K (median seconds)", "", "| precision | K | sampling | sampling / K | total |",
                  "|---|---|---|---|---|"]
        for res in doc["results"]:
            lines.append(f"| {res['precision']} | {res['samples']} | {_f(res['sampling']['median_s'])} | "
                         f"{_f(res['sampling']['median_s'] / res['samples'])} | {_f(res['total']['median_s'])} |")
    if doc.get("meta_check"):
        m = doc["meta_check"]
        lines += ["", f"## Meta-device check ({m['profile']} profile, no compute)", "",
                  f"Cascade {' → '.join(str(s) + '³' for s in m['stage_sizes'])} from {m['drr_pixels']}² X-rays through "
                  f"`sample_cascade` with {m['steps']} steps: outputs {m['output_shapes']}, network forwards per stage "
                  f"{m['forwards_per_stage']}, params (M) {m['params_M']} — {'OK' if m['ok'] else 'FAILED'}."]
    lines += ["", "## Notes", "", *[f"- {n}" for n in doc["notes"]], "",
              "Method: see the docstring of benchmarks/bench_reconstruct.py.", ""]
    return "\n".join(lines)


def write_report(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``reconstruct_<device>.json`` and ``.md``, each written atomically."""
    from xct_core.atomic import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"reconstruct_{doc['device']}"
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_text_atomic(js, json.dumps(doc, indent=2) + "\n")
    write_text_atomic(md, render_md(doc))
    return js, md


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--profile", default=None, choices=["demo", "production"],
                    help="demo = --params alone, production = with --overlay (default: demo on CPU, production on CUDA)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--overlay", default=str(REPO / "params.production.yaml"))
    ap.add_argument("--steps", type=int, default=None,
                    help="DDIM steps per stage (default: the configured eval.sample_steps or diffusion.sample_steps)")
    ap.add_argument("--samples", type=int, nargs="+", default=[1], help="K values to run (e.g. 1 2 4)")
    ap.add_argument("--stages", type=int, default=None, help="run stages 1..N (default: all)")
    ap.add_argument("--precision", default=None, help="comma list of fp32,bf16 (default: CPU fp32; CUDA fp32,bf16)")
    ap.add_argument("--repeats", type=int, default=3, help="recorded runs per configuration")
    ap.add_argument("--repeats-k", type=int, default=None,
                    help="recorded runs for each K > 1 (default: --repeats; K samples take K times as long)")
    ap.add_argument("--warmup", type=int, default=1, help="un-recorded runs before the first configuration of a precision")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--meta-check", choices=["auto", "yes", "no"], default="auto",
                    help="production cascade shapes on the meta device (auto: yes)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_reconstruct: --device cuda but torch sees no GPU")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    repeats_k = a.repeats if a.repeats_k is None else a.repeats_k
    if a.repeats < 1 or repeats_k < 1 or a.warmup < 0 or any(k < 1 for k in a.samples) or (a.steps is not None and a.steps < 1):
        sys.exit("bench_reconstruct: --repeats, --samples and --steps must be >= 1, --warmup >= 0")
    from xct_core.diffusion import Sampler
    from xct_core.models import build_stage

    profile = a.profile or ("demo" if a.device == "cpu" else "production")
    params = profile_params(profile, Path(a.params), Path(a.overlay))
    n_stages = len(params.stages)
    upto = a.stages or n_stages
    if not 1 <= upto <= n_stages:
        sys.exit(f"bench_reconstruct: --stages must be in 1..{n_stages}")
    precisions = (a.precision or ("fp32" if a.device == "cpu" else "fp32,bf16")).split(",")
    steps = Sampler.from_params(params, a.steps).steps_for(1)[0]
    device = Device(a.device)
    load_start = loadavg()
    arch = []
    for k, (name, cfg) in enumerate(params.stages.items(), start=1):
        n_par = sum(p.numel() for p in build_stage(params, k, device="meta").parameters())
        arch.append({"stage": k, "name": name, "size": cfg.size, "token_grid": cfg.token_grid, "dim": cfg.dim,
                     "depth": cfg.depth, "params_M": n_par / 1e6})
    work = Path(tempfile.mkdtemp(prefix="xct-bench-recon-"))
    results: list[dict[str, Any]] = []
    try:
        t = time.perf_counter()
        inputs = make_inputs(params, work / "xr")
        model_files = export_models(params, work / "model")
        prep_s = time.perf_counter() - t
        for prec in precisions:
            for i in range(a.warmup):
                run_once(params, inputs, model_files, work / "out", device, steps=a.steps, samples=1, upto=upto,
                         precision=prec)
                print(f"warm-up {i + 1}/{a.warmup} ({prec}) done", file=sys.stderr, flush=True)
            for k in a.samples:
                runs = []
                n_rep = a.repeats if k == 1 else repeats_k
                for r in range(n_rep):
                    runs.append(run_once(params, inputs, model_files, work / "out", device, steps=a.steps,
                                         samples=k, upto=upto, precision=prec))
                    print(f"{prec} K={k} repeat {r + 1}/{n_rep}: total {runs[-1]['total_s']:.3f} s, "
                          f"stages {[round(v, 3) for v in runs[-1]['stage_s'].values()]}", file=sys.stderr, flush=True)
                results.append(summarise(runs, params, upto))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = None
    if a.meta_check != "no":
        meta = meta_check(profile_params("production", Path(a.params), Path(a.overlay)), steps, "production")
    load_end = loadavg()
    gpu_line = (f"{torch.cuda.get_device_name(0)} (measured)" if a.device == "cuda" else
                "none lent to this session — GPU latency (production 64³/128³/256³) NOT measured; run "
                "`python benchmarks/bench_reconstruct.py --device cuda --profile production` on a GPU box")
    notes = [
        "Random-weight stage networks of the profile's exact architecture (exported and loaded with the real "
        "exporter/loader): latency does not depend on the weights — the networks and the DDIM sampler have no "
        "data-dependent control flow.",
        f"Inputs: procedural phantom #{PHANTOM_INDEX} at the finest stage grid rendered to frontal + lateral "
        "line-integral .npy + geometry .json by the same calls as `xct drr` (prepared once, "
        f"{prep_s:.1f} s incl. model export, not timed).",
        f"Precision fp32 is what `xct reconstruct` runs on every device (xct_core/inference.py uses no autocast); "
        f"bf16 = the sampling under torch.autocast(bfloat16), not the shipped path. Measured here: {', '.join(precisions)}.",
        "Model files come from a local folder (page cache warm after the warm-up); resolving/downloading an "
        "MLflow model URI (models:/, runs:/) and the HTML report (--report) are NOT measured.",
        f"Process start-up and imports (`xct` CLI, torch) are NOT in the totals. Peak memory method: "
        f"{results[0]['mem_method'] if results else '-'}.",
    ]
    if a.device == "cpu":
        notes.append("No GPU was lent to this session: the GPU numbers (production profile 64³/128³/256³, fp32 and "
                     "bf16) were NOT measured; the production cascade was only exercised on the meta device "
                     "(shapes and forward counts, no timing).")
        if load_start and load_start[0] > 0.5 * (os.cpu_count() or 1):
            notes.append(f"Taken under load: the {os.cpu_count()}-core machine was shared with other jobs (load "
                         f"average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end); timings are inflated "
                         "accordingly — compare min with median.")
            if len(a.samples) > 1:
                notes.append(K_SCALING_UNDER_LOAD)
    doc = {
        "benchmark": "reconstruct",
        "device": a.device,
        "machine": machine(a.device),
        "gpu": gpu_line,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python benchmarks/bench_reconstruct.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "under_load": bool(load_start and load_start[0] > 0.5 * (os.cpu_count() or 1)),
        "profile": profile,
        "architecture": arch,
        "drr": {"pixels": params.drr.pixels, "pixel_mm": params.drr.pixel_mm, "geometry": params.drr.geometry},
        "steps": steps,
        "steps_source": "--steps" if a.steps else ("eval.sample_steps" if params.eval.sample_steps
                                                   else "diffusion.sample_steps"),
        "eta": float(params.diffusion.eta),
        "stages_run": upto,
        "warmup": a.warmup,
        "results": results,
        "meta_check": meta,
        "notes": notes,
    }
    if not a.no_write:
        for p in write_report(doc, Path(a.out_dir)):
            print(f"wrote {p}")
    else:
        print(render_md(doc))
    return doc


if __name__ == "__main__":
    main()
