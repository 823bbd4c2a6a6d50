#!/usr/bin/env python
"""Cascade stage networks: parameters, training-step time, peak memory, DDIM step time.

Usage::

    python benchmarks/bench_model.py                                  # CPU: demo stages, fp32 + bf16
    python benchmarks/bench_model.py --device cuda --profile production   # a bare GPU box (torch only)

For every stage of the chosen profile(s), decoder order(s) (``--decoders``) and with
activation checkpointing off and on, one fresh subprocess builds the stage
(:func:`xct_core.models.build_stage`) and its direct twin, runs one warm-up step and
``--steps`` timed training steps as the loop runs them: the twin's step
(:func:`xct_core.losses.direct_loss`) and the stage network's step
(:func:`xct_core.losses.diffusion_loss`; an anchored stage runs the twin forward for its
anchor), each with the physics term where the stage's weight is > 0 and AdamW, each timed
on its own; then ``--sample-steps`` timed DDIM model evaluations (eval mode, no_grad,
X-ray encoding computed once per sample as in :func:`xct_core.cascade.sample_cascade`).

FLOPs (``--flops yes``, the default): every stage of the demo AND production profiles, both
decoder orders, stage network and twin, counted with ``torch.utils.flop_counter`` on the
meta device (shapes only: no memory, no compute), per sample, split by network part
(:func:`count_flops`).
Precision: ``bf16`` = ``torch.autocast(dtype=bfloat16)`` (fp32 weights), ``fp32`` = none.

Peak memory, method:

* CUDA: ``torch.cuda.max_memory_allocated()`` over the timed steps (tensors only, not
  the allocator's cache or the CUDA context);
* CPU: the subprocess's peak resident set size (``ru_maxrss``) minus its RSS just before
  the first training step — i.e. the extra memory training needs on top of the loaded
  model and inputs (allocator caching included, so an upper bound on tensor memory).

On CPU the production stages do not fit the time budget; for them ``--estimate`` (on by
default on CPU) traces one forward+backward on the **meta device** (no memory, no
compute) and reports the peak of live tensor bytes (params + activations + grads), with
attention counted as a flash/memory-efficient kernel (O(N) memory: output + logsumexp),
which is what ``F.scaled_dot_product_attention`` uses on the GPU. It runs the model cast
to bf16 (autocast keeps fp32 master weights and runs norms in fp32, so add roughly the
fp32 weights and some norm outputs) and excludes the physics term, the optimiser state
(AdamW: 2 × fp32 params) and the CUDA context (~0.5-1 GB).

Results: ``benchmarks/results/model_<device>.json`` and ``.md`` (machine named inside).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from xct_core.config import Params, load_params  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------- helpers


def profile_params(profile: str, params_path: Path, overlay: Path) -> Params:
    return load_params(params_path, [overlay] if profile == "production" else [])


def with_stage(params: Params, k: int, **update: Any) -> Params:
    name = list(params.stages)[k - 1]
    stages = dict(params.stages)
    stages[name] = stages[name].model_copy(update=update)
    return params.model_copy(update={"stages": stages})


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if hasattr(os, "getloadavg"):
        desc += ", load average at start {:.1f} (shared machine: timings inflate with load)".format(os.getloadavg()[0])
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        desc = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), " + desc
    return desc


# ----------------------------------------------------------------------------- one measured run


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (profile, stage, decoder, checkpointing, precision) configuration in this
    process: a training step as the loop runs it — the direct twin (when the stage is anchored
    or ``train.direct_baseline`` is on) and the stage network, each timed on its own."""
    from xct_core.diffusion import CosineSchedule
    from xct_core.losses import PhysicsLoss, diffusion_loss, direct_loss
    from xct_core.models import build_stage

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    k = int(spec["stage"])
    update: dict[str, Any] = {"grad_checkpointing": bool(spec["ckpt"])}
    if spec.get("decoder"):
        update["decoder"] = spec["decoder"]
    params = with_stage(profile_params(spec["profile"], Path(spec["params"]), Path(spec["overlay"])), k, **update)
    cfg = list(params.stages.values())[k - 1]
    B = int(spec["batch"] or cfg.batch_size)
    S, P = cfg.size, params.drr.pixels
    t0 = time.perf_counter()
    net = build_stage(params, k, device=dev)
    twin = build_stage(params, k, mode="direct", device=dev) if (net.anchored or params.train.direct_baseline) else None
    build_s = time.perf_counter() - t0
    physics = PhysicsLoss.from_params(params, k) if cfg.physics_weight > 0 else None
    schedule = CosineSchedule.from_params(params.diffusion)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=cfg.lr) if twin is not None else None
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(B, 1, S, S, S, generator=g) * 2 - 1).to(dev)
    f = (torch.rand(B, 1, P, P, generator=g) * 6).to(dev)
    lat = (torch.rand(B, 1, P, P, generator=g) * 6).to(dev)
    prev = list(params.stages.values())[k - 2].size if k > 1 else None
    cond = (torch.rand(B, 1, prev, prev, prev, generator=g) * 2 - 1).to(dev) if prev else None
    amp = spec["precision"] == "bf16"
    gen = torch.Generator(device=dev).manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def one(model: torch.nn.Module, o: torch.optim.Optimizer, direct: bool) -> tuple[float, float]:
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if direct:
                loss, _ = direct_loss(model, x0, f, lat, cond, schedule=schedule, generator=gen,
                                      physics_weight=cfg.physics_weight, physics=physics)
            else:  # an anchored stage runs its twin (no grad) for the anchor, as the loop does
                loss, _ = diffusion_loss(model, x0, f, lat, cond, schedule=schedule, generator=gen,
                                         physics_weight=cfg.physics_weight, physics=physics,
                                         anchor_net=twin if net.anchored else None)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()
        sync()
        return float(loss.detach()), time.perf_counter() - t0

    out: dict[str, Any] = {**{k_: spec[k_] for k_ in ("profile", "stage", "ckpt", "precision")},
                           "decoder": cfg.decoder, "name": list(params.stages)[k - 1], "size": S,
                           "token_grid": cfg.token_grid, "dim": cfg.dim, "depth": cfg.depth, "batch": B,
                           "params_M": sum(p.numel() for p in net.parameters()) / 1e6, "build_s": build_s,
                           "twin": twin is not None}
    try:
        rss0 = _rss_bytes()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        losses = []
        t_net, t_twin = [], []
        for i in range(int(spec["steps"]) + 1):  # the first = warm-up (kernel selection, allocator growth)
            if twin is not None:
                loss, dt = one(twin, opt_twin, True)  # type: ignore[arg-type]
                losses.append(loss)
                if i:
                    t_twin.append(dt)
            loss, dt = one(net, opt, False)
            losses.append(loss)
            if i:
                t_net.append(dt)
        if dev.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["mem_method"] = "cuda.max_memory_allocated"
        else:
            out["peak_mem_gib"] = (_maxrss_bytes() - rss0) / 2**30
            out["mem_method"] = "peak RSS - RSS before training"
        out["net_step_s"] = sum(t_net) / len(t_net)
        out["twin_step_s"] = sum(t_twin) / len(t_twin) if t_twin else 0.0
        out["step_s"] = out["net_step_s"] + out["twin_step_s"]
        out["samples_per_s"] = B / out["step_s"]
        out["loss_finite"] = all(math.isfinite(v) for v in losses)
        # DDIM: one model evaluation per sampler step (X-ray encoding cached per sample)
        net.eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            ctx = net.encode_views(f, lat)
            tt = torch.full((B,), 500, dtype=torch.long, device=dev)
            aug = torch.zeros(B, dtype=torch.long, device=dev) if cond is not None else None
            anchor = x0 if net.anchored else None
            net(x0, tt, f, lat, cond, aug, context=ctx, anchor=anchor)
            sync()
            t0 = time.perf_counter()
            for _ in range(int(spec["sample_steps"])):
                net(x0, tt, f, lat, cond, aug, context=ctx, anchor=anchor)
            sync()
        out["ddim_step_s"] = (time.perf_counter() - t0) / int(spec["sample_steps"])
    except torch.OutOfMemoryError as e:  # report, do not crash the whole benchmark
        out["error"] = f"out of memory: {str(e).splitlines()[0]}"
    return out


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`run_one` in a fresh subprocess (clean peak-memory statistics)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as fh:
        cmd = [sys.executable, __file__, "--_one", json.dumps(spec), "--_out", fh.name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {**spec, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return {**spec, "error": f"exit {proc.returncode}: {tail[0]}"}
        return json.loads(Path(fh.name).read_text())


# ----------------------------------------------------------------------------- meta estimate


class _FlashAttentionMeta(torch.autograd.Function):
    """Memory model of a flash attention kernel: saves q, k, v, out and a logsumexp [B,h,N]."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def estimate(params: Params, k: int, ckpt: bool, batch: int, dtype: torch.dtype, profile: str) -> dict[str, Any]:
    """Peak live tensor bytes of one forward+backward on the meta device (see module doc)."""
    import torch.nn.functional as F
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from xct_core.models import build_stage

    class LiveBytes(TorchDispatchMode):
        def __init__(self, start: int) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.cur = self.peak = start

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
                self.cur -= self.live.pop(key)[1]
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata not in self.live:
                        n = t.untyped_storage().nbytes()
                        self.live[ref.cdata] = (ref, n)
                        self.cur += n
            self.peak = max(self.peak, self.cur)
            return out

    p = with_stage(params, k, grad_checkpointing=ckpt)
    cfg = list(p.stages.values())[k - 1]
    net = build_stage(p, k, device="meta").to(dtype)
    S, P = cfg.size, p.drr.pixels
    prev = list(p.stages.values())[k - 2].size if k > 1 else None
    param_bytes = sum(q.numel() * q.element_size() for q in net.parameters())
    buf_bytes = sum(b.numel() * b.element_size() for b in net.buffers())
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k_, v, **kw: _FlashAttentionMeta.apply(q, k_, v)  # type: ignore[assignment]
    try:
        with torch.device("meta"):
            x = torch.empty(batch, 1, S, S, S, dtype=dtype)
            img = torch.empty(batch, 1, P, P, dtype=dtype)
            cond = torch.empty(batch, 1, prev, prev, prev, dtype=dtype) if prev else None
            aug = torch.zeros(batch, dtype=torch.long) if prev else None
            anchor = torch.empty(batch, 1, S, S, S, dtype=dtype) if net.anchored else None
            mode = LiveBytes(param_bytes + buf_bytes)
            with mode:
                out = net(x, torch.zeros(batch, dtype=torch.long), img, img, cond, aug, anchor=anchor)
                fwd_peak = mode.peak
                out.float().square().mean().backward()
    finally:
        F.scaled_dot_product_attention = real_sdpa  # type: ignore[assignment]
    return {"profile": profile, "stage": k,
            "name": list(p.stages)[k - 1], "size": S, "token_grid": cfg.token_grid, "ckpt": ckpt, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "params_M": sum(q.numel() for q in net.parameters()) / 1e6,
            "fwd_peak_gib": fwd_peak / 2**30, "train_peak_gib": mode.peak / 2**30,
            "adamw_state_gib": 2 * 4 * sum(q.numel() for q in net.parameters()) / 2**30}


# ----------------------------------------------------------------------------- FLOPs

#: network parts for the FLOP split: part → module paths (under the stage network)
FLOP_PARTS: dict[str, tuple[str, ...]] = {
    "xray_encoder": ("encoder", "xray_global"),
    "fuse": ("backbone.fuse",),
    "conv_encoder": ("backbone.enc", "backbone.down", "backbone.to_tokens"),
    "transformer": ("backbone.blocks", "backbone.norm_tokens"),
    "decoder": ("backbone.dec",),
    "head": ("backbone.out",),
}


def count_flops(params: Params, k: int, profile: str, *, mode: str = "diffusion", decoder: str | None = None,
                batch: int = 1) -> dict[str, Any]:
    """FLOPs of one stage network (``torch.utils.flop_counter.FlopCounterMode``: 2 per
    multiply-add of convs, linears, matmuls and attention; interpolation, grid_sample, norms
    and activations are not counted) on the meta device — shapes only, so the production
    sizes cost nothing. Forward FLOPs per sample, split by part (:data:`FLOP_PARTS`), and
    forward + backward (all parameters trainable; the backward attribution to parts is not
    reliable, so only its total is kept)."""
    from torch.utils.flop_counter import FlopCounterMode

    from xct_core.models import build_stage

    p = with_stage(params, k, decoder=decoder) if decoder else params
    cfg = list(p.stages.values())[k - 1]
    net = build_stage(p, k, mode=mode, device="meta")  # type: ignore[arg-type]
    S, P = cfg.size, p.drr.pixels
    prev = list(p.stages.values())[k - 2].size if k > 1 else None
    root = type(net).__name__
    with torch.device("meta"):
        x = torch.empty(batch, 1, S, S, S) if mode == "diffusion" else None
        t = torch.zeros(batch, dtype=torch.long) if mode == "diffusion" else None
        img = torch.empty(batch, 1, P, P)
        cond = torch.empty(batch, 1, prev, prev, prev) if prev else None
        aug = torch.zeros(batch, dtype=torch.long) if prev else None
        anchor = torch.empty(batch, 1, S, S, S) if getattr(net, "anchored", False) else None
        with FlopCounterMode(display=False) as fwd:
            net(x, t, img, img, cond, aug, anchor=anchor)
        with FlopCounterMode(display=False) as both:
            net(x, t, img, img, cond, aug, anchor=anchor).sum().backward()
    counts = {name: sum(v.values()) for name, v in fwd.get_flop_counts().items()}
    total = fwd.get_total_flops()

    def part_flops(m: str) -> float:  # a module, or the members of a ModuleList (never called itself)
        path = f"{root}.{m}"
        if path in counts:
            return counts[path]
        return sum(v for name, v in counts.items() if name.startswith(path + ".") and name[len(path) + 1:].isdigit())

    parts = {part: sum(part_flops(m) for m in mods) / batch for part, mods in FLOP_PARTS.items()}
    parts["other"] = total / batch - sum(parts.values())
    return {"profile": profile, "stage": k, "name": list(p.stages)[k - 1], "size": S, "mode": mode,
            "decoder": cfg.decoder, "anchored": bool(getattr(net, "anchored", False)),
            "params_M": sum(q.numel() for q in net.parameters()) / 1e6,
            "fwd_gflop": total / batch / 1e9, "fwd_bwd_gflop": both.get_total_flops() / batch / 1e9,
            "parts_gflop": {kk: v / 1e9 for kk, v in parts.items()}}


def flop_table(profiles: list[tuple[str, Params]], stages: list[int]) -> list[dict[str, Any]]:
    """:func:`count_flops` for every (profile, stage, decoder order, mode)."""
    from xct_core.models.backbone import DECODER_ORDERS

    rows = []
    for prof, params in profiles:
        for k in [s for s in stages if s <= len(params.stages)]:
            for dec in DECODER_ORDERS:
                for mode in ("diffusion", "direct"):
                    rows.append(count_flops(params, k, prof, mode=mode, decoder=dec))
    return rows


# ----------------------------------------------------------------------------- report


def flop_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The FLOP tables of the report (rows of :func:`flop_table`)."""
    lines = ["## FLOPs per sample (meta device, torch.utils.flop_counter; batch 1)", "",
             "Forward GFLOP of one network and its split by part (% of the forward); fwd+bwd = one forward and "
             "backward with every parameter trainable. Train step = what one optimiser step of the stage costs "
             "per sample: the twin's fwd+bwd + (anchored stage) the twin's forward for the anchor + the stage "
             "network's fwd+bwd (physics loss, optimiser and interpolations not counted).", "",
             "| profile | stage | grid | decoder | net | params (M) | fwd GFLOP | fwd+bwd GFLOP | xray enc % | "
             "conv enc % | transformer % | decoder % | other % | train step GFLOP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["profile"], r["stage"], r["decoder"], r["mode"]): r for r in rows}
    for r in rows:
        pt = {kk: 100 * v / r["fwd_gflop"] for kk, v in r["parts_gflop"].items()}
        step = ""
        if r["mode"] == "diffusion":
            tw = by.get((r["profile"], r["stage"], r["decoder"], "direct"))
            if tw is not None:
                step = f"{r['fwd_bwd_gflop'] + tw['fwd_bwd_gflop'] + (tw['fwd_gflop'] if r['anchored'] else 0):.1f}"
        lines.append(f"| {r['profile']} | {r['name']} | {r['size']}³ | {r['decoder']} | "
                     f"{'stage' if r['mode'] == 'diffusion' else 'twin'} | {r['params_M']:.2f} | {r['fwd_gflop']:.2f} | "
                     f"{r['fwd_bwd_gflop']:.2f} | {pt['xray_encoder']:.1f} | {pt['conv_encoder'] + pt['fuse']:.1f} | "
                     f"{pt['transformer']:.1f} | {pt['decoder']:.1f} | {pt['other'] + pt['head']:.1f} | {step} |")
    lines.append("")
    pairs = [(a, by.get((a["profile"], a["stage"], "conv_first", "diffusion")))
             for a in rows if a["decoder"] == "upsample_first" and a["mode"] == "diffusion"]
    lines += ["Saving of `conv_first` over `upsample_first` (stage network forward):", ""]
    for a, b in pairs:
        if b is not None:
            lines.append(f"- {a['profile']} {a['name']} ({a['size']}³): {a['fwd_gflop']:.2f} → {b['fwd_gflop']:.2f} "
                         f"GFLOP (−{100 * (1 - b['fwd_gflop'] / a['fwd_gflop']):.1f} %); decoder "
                         f"{a['parts_gflop']['decoder']:.2f} → {b['parts_gflop']['decoder']:.2f} GFLOP "
                         f"(−{100 * (1 - b['parts_gflop']['decoder'] / a['parts_gflop']['decoder']):.1f} %)")
    return [*lines, ""]


def write_report(res: dict[str, Any], out_dir: Path, device: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"model_{device}.json", out_dir / f"model_{device}.md"
    lines = [f"# Stage network benchmark ({device})", "", f"Machine: {res['machine']}  ", f"Date: {res['date']}  ",
             f"Command: `{res['command']}`", ""]
    if res["measured"]:
        lines += ["## Measured (training step = forward + backward + AdamW, real loss incl. physics term)", "",
                  "| profile | stage | decoder | grid | tokens | params (M) | batch | precision | ckpt | stage net (s) "
                  "| twin (s) | step (s) | samples/s | peak mem (GiB) | DDIM step (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["measured"]:
            if "error" in r:
                lines.append(f"| {r['profile']} | {r['stage']} | {r.get('decoder', '')} | | | | | {r['precision']} | "
                             f"{r['ckpt']} | {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['profile']} | {r['name']} | {r['decoder']} | {r['size']}³ | {r['token_grid']}³ | "
                         f"{r['params_M']:.2f} | {r['batch']} | {r['precision']} | {'on' if r['ckpt'] else 'off'} | "
                         f"{r['net_step_s']:.3f} | {r['twin_step_s']:.3f} | {r['step_s']:.3f} | "
                         f"{r['samples_per_s']:.2f} | {r['peak_mem_gib']:.2f} | {r['ddim_step_s']:.3f} |")
        lines += ["", f"Peak memory method: {res['measured'][0].get('mem_method', '-')}. Step = the direct twin's "
                  "step (direct loss, forward + backward + AdamW) + the stage network's step (diffusion loss; an "
                  "anchored stage also runs the twin forward without gradients for its anchor), each timed on its "
                  "own, as the training loop runs them.", ""]
    if res.get("flops"):
        lines += flop_lines(res["flops"])
    if res["estimates"]:
        lines += ["## Estimated on the meta device (no compute): peak live tensor bytes, flash-attention memory model",
                  "", "| profile | stage | grid | tokens | params (M) | batch | dtype | ckpt | fwd peak (GiB) | "
                  "fwd+bwd peak (GiB) | + AdamW state (GiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["estimates"]:
            lines.append(f"| {r['profile']} | {r['name']} | {r['size']}³ | {r['token_grid']}³ | {r['params_M']:.2f} | "
                         f"{r['batch']} | {r['dtype']} | {'on' if r['ckpt'] else 'off'} | {r['fwd_peak_gib']:.2f} | "
                         f"{r['train_peak_gib']:.2f} | {r['adamw_state_gib']:.2f} |")
        lines += ["", "Estimate: model cast to the dtype (autocast keeps fp32 weights and fp32 norm outputs: "
                  "expect somewhat more), physics term, CUDA context and allocator cache excluded.", ""]
    lines += [*[f"Note: {n}" for n in res.get("notes", [])], "",
              "See the docstring of benchmarks/bench_model.py for the methods.", ""]
    from xct_core.atomic import write_text_atomic

    for path, text in ((js, json.dumps(res, indent=2) + "\n"), (md, "\n".join(lines))):
        write_text_atomic(path, text)
    return js, md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--profile", default=None, choices=["demo", "production", "all"],
                    help="default: demo on CPU, production on CUDA")
    ap.add_argument("--stages", default="1,2,3", help="comma-separated 1-based stage indices")
    ap.add_argument("--precision", default=None, help="comma list of bf16,fp32 (default: CPU fp32,bf16; CUDA bf16)")
    ap.add_argument("--ckpt", default="off,on", help="activation checkpointing settings to run: off,on")
    ap.add_argument("--decoders", default="params",
                    help="decoder orders to measure: 'params' (what params say) or a comma list of "
                         "conv_first,upsample_first")
    ap.add_argument("--flops", choices=["yes", "no"], default="yes",
                    help="FLOP tables (meta device) of every stage, both decoder orders, demo and production")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: the stage's batch_size)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--sample-steps", type=int, default=3, help="timed DDIM model evaluations")
    ap.add_argument("--estimate", choices=["auto", "yes", "no"], default="auto",
                    help="meta-device memory estimates of the production stages (auto: on CPU only)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--overlay", default=str(REPO / "params.production.yaml"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measured configuration")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        Path(a._out).write_text(json.dumps(run_one(json.loads(a._one))))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model: --device cuda but torch sees no GPU")
    profiles = {"demo": ["demo"], "production": ["production"], "all": ["demo", "production"]}[
        a.profile or ("demo" if a.device == "cpu" else "production")]
    precisions = (a.precision or ("fp32,bf16" if a.device == "cpu" else "bf16")).split(",")
    ckpts = [c.strip() == "on" for c in a.ckpt.split(",")]
    stages = [int(s) for s in a.stages.split(",")]
    res: dict[str, Any] = {"machine": machine(a.device), "device": a.device,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                           "measured": [], "estimates": [], "flops": []}
    for prof in profiles:
        n_stages = len(profile_params(prof, Path(a.params), Path(a.overlay)).stages)
        for k in [s for s in stages if s <= n_stages]:
            for dec in (None,) if a.decoders == "params" else tuple(a.decoders.split(",")):
                for prec in precisions:
                    for ck in ckpts:
                        spec = {"device": a.device, "profile": prof, "stage": k, "ckpt": ck, "precision": prec,
                                "decoder": dec, "batch": a.batch, "steps": a.steps, "sample_steps": a.sample_steps,
                                "params": a.params, "overlay": a.overlay}
                        r = measure(spec, a.timeout)
                        res["measured"].append(r)
                        print(json.dumps(r), flush=True)
    if a.flops == "yes":
        res["flops"] = flop_table([(p, profile_params(p, Path(a.params), Path(a.overlay))) for p in ("demo", "production")],
                                  stages)
    if a.estimate == "yes" or (a.estimate == "auto" and a.device == "cpu"):
        prod = profile_params("production", Path(a.params), Path(a.overlay))
        for k in [s for s in stages if s <= len(prod.stages)]:
            for ck in (False, True):
                r = estimate(prod, k, ck, 1, torch.bfloat16, "production")
                res["estimates"].append(r)
                print(json.dumps(r), flush=True)
    if not a.no_write:
        for p in write_report(res, Path(a.out_dir), a.device):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
