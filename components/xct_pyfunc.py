"""The registered cascade as an MLflow pyfunc — "models from code" (no pickled objects).

``components/register.py`` logs THIS FILE as ``python_model`` (MLflow models from code: the
file is executed at load time and hands its model over with :func:`mlflow.models.set_model`)
with these artifacts:

* ``stage1`` … ``stageK`` — the exported stage models (:func:`xct_core.checkpoint.export_stage_model`:
  EMA ``state_dict`` + params JSON), loaded with ``torch.load(weights_only=True)``;
* ``params`` — the effective params as JSON (sampler steps, seed, HU window, schedule);
* ``calibration`` (when the evaluate step fitted one) — the last stage's ``calibration.json``
  (:class:`xct_core.calibration.Calibration`: σ-recalibration and the conformal interval
  fitted on val; ``xct reconstruct`` with this model writes the interval);

and ``code_paths=[xct_core]``, so the loader needs only torch and the xct science package.

``predict`` input: a mapping ``{"frontal": …, "lateral": …}`` of line integrals (∫mu dl,
dimensionless, ``[1, P, P]`` — one pair, ``P = drr.pixels``, image conventions of
docs/CONVENTIONS.md), or a one-row DataFrame with those columns; params ``steps`` (DDIM
steps; 0 or absent: the steps rule of :meth:`xct_core.diffusion.Sampler.from_params`),
``seed`` (default ``params.seed``) and ``samples`` (default ``reconstruct.samples``).
The registered model carries a signature (:func:`components.register.model_signature`:
float32 ``[-1, P, P]`` views, long params), so MLflow refuses a missing view, a wrong shape
or dtype and a non-integer param before ``predict`` runs (``pyfunc.predict`` and ``mlflow
models serve``); the checks below still guard a model loaded without it. The prediction IS
:func:`xct_core.inference.reconstruct` (what ``xct reconstruct`` runs): float32 ``[S, S, S]``
volume in HU (the last stage's grid, RAS+ axes), the point estimate ``eval.point_estimate``
(default: the mean of the samples).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def _as_image(x: Any, name: str, params: Any) -> np.ndarray:
    """A view as float32 line integrals, checked as ``xct reconstruct`` checks its inputs
    (:func:`xct_core.xray_io.check_line_integrals`: real, finite, 0 <= p <= limits.max_line_integral)."""
    from xct_core.errors import InputError
    from xct_core.xray_io import check_line_integrals

    arr = np.asarray(x)
    if arr.dtype == object:  # nested lists / arrays from a DataFrame cell
        arr = np.array(arr.tolist())
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be one line-integral image [1, P, P] or [P, P] (one X-ray pair per request), "
                         f"got shape {arr.shape}")
    try:
        return check_line_integrals(name, arr, params)
    except InputError as e:
        raise ValueError(str(e)) from None


def _unpack(model_input: Any) -> dict[str, Any]:
    """A mapping from a dict or a one-row DataFrame (how pyfunc serving hands inputs over)."""
    if isinstance(model_input, dict):
        return model_input
    if hasattr(model_input, "iloc") and hasattr(model_input, "columns"):
        if len(model_input) != 1:
            raise ValueError(f"expected one row (one X-ray pair), got {len(model_input)}")
        return {c: model_input.iloc[0][c] for c in model_input.columns}
    raise ValueError(f"expected {{'frontal': 2D, 'lateral': 2D}}, got {type(model_input).__name__}")


class XctCascadeModel(PythonModel):
    """Biplanar X-ray line integrals → CT volume in HU with the diffusion cascade."""

    def load_context(self, context: Any) -> None:

        from xct_core.config import params_from_dict
        from xct_core.inference import load_stages
        from xct_core.jsondoc import read_json_doc

        arts = context.artifacts
        self.params = params_from_dict(read_json_doc(arts["params"], "registered params"), "registered params")
        n = sum(1 for k in arts if k.startswith("stage"))
        if n < 1:
            raise ValueError("the registered model holds no stage artifacts")
        self.stages = load_stages([arts[f"stage{k}"] for k in range(1, n + 1)], self.params, "cpu")
        self.pixels = int(self.params.drr.pixels)
        from xct_core.calibration import read_calibration

        self.calibration = read_calibration(arts["calibration"]) if "calibration" in arts else None

    # no type hints on predict: MLflow would read them as an input schema (it wants list[...])
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """``{"frontal": 2D, "lateral": 2D[, "steps", "seed", "samples"]}`` → float32 ``[S, S, S]`` HU."""
        from xct_core.inference import reconstruct

        data = _unpack(model_input)
        missing = [v for v in ("frontal", "lateral") if v not in data]
        if missing:
            raise ValueError(f"missing input view(s): {', '.join(missing)}")
        views = {v: _as_image(data[v], v, self.params) for v in ("frontal", "lateral")}
        for v, img in views.items():
            if img.shape != (self.pixels, self.pixels):
                raise ValueError(f"{v} is {img.shape}, the model expects ({self.pixels}, {self.pixels}) (drr.pixels)")
        opts = {**(params or {}), **{k: data[k] for k in ("steps", "seed", "samples") if k in data}}
        steps = int(opts["steps"]) if opts.get("steps") else None
        seed = int(opts.get("seed", self.params.seed))
        samples = int(opts.get("samples") or self.params.reconstruct.samples)
        rec = reconstruct(self.stages, self.params, views["frontal"], views["lateral"], steps=steps, samples=samples,
                          seed=seed)
        return np.asarray(rec.point_hu(self.params.point_estimate_for(rec.stage)), dtype=np.float32)


mlflow.models.set_model(XctCascadeModel())
