"""Serve the registered cascade with ``mlflow models serve`` and post two X-rays over HTTP.

A tiny untrained two-stage cascade (16³ → 32³, 16-pixel cone-beam DRRs) is registered in
a sqlite registry under tmp_path with the real register step (helpers reused from
tests/test_register.py), then served from ``models:/xct-cascade@champion`` by the MLflow
CLI in a subprocess (``--env-manager local``, one uvicorn worker, cwd outside the repo so
the served code comes from the model's ``code_paths``). The request carries the frontal and
lateral line-integral images of a phantom rendered with :func:`xct_core.drr.render` in the
model's own ``params.drr`` geometry, in MLflow's ``{"inputs": {...}, "params": {...}}``
dict-of-tensors format (``[1, P, P]`` float32 views, the seed as a param: the registered
signature). Checks with known answers:

* the response is ``{"predictions": [S][S][S]}`` on the last stage's grid, finite, inside
  the HU window (the sampler's [-1, 1] output mapped back), and equal (to 1e-4 of the
  window width: float32 reduction order depends on the thread count) to the same pyfunc
  loaded in-process with the same seed — the HTTP/JSON path changes nothing;
* malformed requests — not JSON, unknown payload keys, a missing view, images of the
  wrong detector size, a view that is not numbers, a non-integer param, a wrong content
  type — are answered with a 4xx, promptly; shape, dtype, missing views and params are
  refused by MLflow's schema enforcement (the registered signature) before the model runs;
* what is served was not pickled: no ``*.pkl`` in the model, the pyfunc is loaded by
  MLflow's ``code_model`` loader from the copied ``xct_pyfunc.py`` (models from code), the
  stage weights are ``.pt`` state dicts, xct_core ships under ``code/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from test_evaluate import make_tiny_params
from test_register import NAME, _run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: bounded waits (seconds): server start-up, one request
STARTUP_S = 90.0
REQUEST_S = 60.0
SEED = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, body: bytes | None = None, content_type: str = "application/json",
          timeout: float = REQUEST_S) -> tuple[int, str]:
    """``(status, body text)`` of a GET (``body`` None) or POST; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode(errors="replace")


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no server log>"


def _mlflow_cli() -> list[str]:
    """The venv's ``mlflow`` console script (its bin dir also holds ``uvicorn``)."""
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


def _render_xrays(params: Any) -> dict[str, np.ndarray]:
    """Frontal and lateral line integrals of a phantom on the last stage's grid, rendered
    with the model's ``params.drr`` geometry (so the detector size is the one it expects)."""
    from xct_core.drr import render
    from xct_core.geometry import ProjectionGeometry
    from xct_core.phantoms import make_phantom

    last = list(params.stages.values())[-1]
    hu, _, affine = make_phantom(last.size, last.fov_mm / last.size, 0)
    out = {}
    for view in ("frontal", "lateral"):
        geom = ProjectionGeometry.from_params(params.drr, view)
        img = render(hu, affine, geom, mu_water=params.hu.mu_water)
        out[view] = np.asarray(img, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A sqlite registry with one tiny cascade registered as ``NAME@champion``."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    params = make_tiny_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {"root": root, "uri": uri, "params": params, "processed": None}
    summary = _run(env, "run1", seed=0, psnr2=25.0)
    assert summary["status"] == "promoted" and summary["alias"] == "champion", summary
    yield env
    mp.undo()


@pytest.fixture(scope="module")
def server(registry: dict[str, Any]) -> dict[str, Any]:
    """``mlflow models serve -m models:/NAME@champion`` on a free local port; stopped (TERM,
    then KILL) in teardown. The CLI runs in its own process group so its uvicorn child goes too."""
    root: Path = registry["root"]
    port = _free_port()
    log = root / "serve.log"
    env = {**os.environ,
           "MLFLOW_TRACKING_URI": registry["uri"],
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [*_mlflow_cli(), "models", "serve", "-m", f"models:/{NAME}@champion",
           "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local", "-w", "1"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                if _http(f"{base}/ping", timeout=2.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_S:.0f} s:\n{_log_tail(log)}")
            time.sleep(0.5)
        yield {"url": base, "log": log, "proc": proc, **registry}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _post(server: dict[str, Any], payload: Any) -> tuple[int, str]:
    return _http(f"{server['url']}/invocations", json.dumps(payload).encode())


def test_served_model_reconstructs_a_volume_from_two_xrays(server: dict[str, Any]) -> None:
    import mlflow

    params = server["params"]
    size = list(params.stages.values())[-1].size
    views = _render_xrays(params)
    p = params.drr.pixels
    assert views["frontal"].shape == (p, p) and views["lateral"].shape == (p, p)
    assert views["frontal"].max() > 0.5 and views["lateral"].max() > 0.5  # a body was in the beam

    status, text = _post(server, {"inputs": {"frontal": [views["frontal"].tolist()],
                                             "lateral": [views["lateral"].tolist()]}, "params": {"seed": SEED}})
    assert status == 200, f"{status}: {text[:2000]}\n{_log_tail(server['log'])}"
    vol = np.asarray(json.loads(text)["predictions"], dtype=np.float32)
    assert vol.shape == (size, size, size)
    assert np.isfinite(vol).all()
    w = params.hu.net_map()  # the networks' HU range (the map inverse of [-1, 1])
    assert vol.min() >= w.lo - 1e-3 and vol.max() <= w.hi + 1e-3
    assert vol.std() > 0  # not a constant

    # known answer: the same registered pyfunc in-process, same input and seed
    mlflow.set_tracking_uri(server["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    ref = np.asarray(model.predict({"frontal": views["frontal"][None], "lateral": views["lateral"][None]},
                                   params={"seed": SEED}))
    tol = 1e-4 * (w.hi - w.lo)  # HU; float32 reduction order differs with the server's thread count
    np.testing.assert_allclose(vol, ref, atol=tol)

    # the one-row DataFrame form (MLflow's tensor columns: each view flattened) gives the same volume
    status, text = _post(server, {"dataframe_records": [{"frontal": views["frontal"].ravel().tolist(),
                                                         "lateral": views["lateral"].ravel().tolist()}],
                                  "params": {"seed": SEED}})
    assert status == 200, f"{status}: {text[:2000]}"
    np.testing.assert_allclose(np.asarray(json.loads(text)["predictions"], dtype=np.float32), ref, atol=tol)


def test_malformed_requests_get_4xx_not_a_hang(server: dict[str, Any]) -> None:
    p = server["params"].drr.pixels
    img = [np.ones((p, p)).tolist()]
    url = f"{server['url']}/invocations"
    cases = {
        "not json": _http(url, b"{this is not json"),
        "unknown payload key": _post(server, {"pictures": {"frontal": img, "lateral": img}}),
        "missing lateral view": _post(server, {"inputs": {"frontal": img}}),
        "wrong detector size": _post(server, {"inputs": {"frontal": [np.ones((8, 8)).tolist()],
                                                         "lateral": [np.ones((8, 8)).tolist()]}}),
        "a 2D view without its batch axis": _post(server, {"inputs": {"frontal": img[0], "lateral": img[0]}}),
        "a view that is not numbers": _post(server, {"inputs": {"frontal": [[["x"] * p] * p], "lateral": img}}),
        "a non-integer param": _post(server, {"inputs": {"frontal": img, "lateral": img}, "params": {"seed": "x"}}),
        "wrong content type": _http(url, b"frontal,lateral\n1,2\n", content_type="image/png"),
    }
    for name, (status, text) in cases.items():
        assert 400 <= status < 500, f"{name}: HTTP {status}: {text[:500]}"
    # MLflow's schema enforcement (the registered signature) names what is wrong
    assert f"does not match expected shape (-1, {p}, {p})" in cases["wrong detector size"][1]
    assert f"does not match expected shape (-1, {p}, {p})" in cases["a 2D view without its batch axis"][1]
    assert "missing inputs" in cases["missing lateral view"][1] and "lateral" in cases["missing lateral view"][1]
    assert "seed" in cases["a non-integer param"][1]
    # the server survived all of that
    assert _http(f"{server['url']}/ping", timeout=10.0)[0] == 200
    assert server["proc"].poll() is None


def test_served_model_holds_no_pickled_python_model(registry: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tracking_uri(registry["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    files = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    # models from code: the loader executes the copied source file (MLflow resolves the
    # basename of ``model_code_path`` inside the model directory); a pickled PythonModel
    # would appear as ``python_model: python_model.pkl`` instead
    assert "python_model" not in pyfunc, pyfunc
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model", pyfunc
    assert Path(pyfunc["model_code_path"]).name == "xct_pyfunc.py", pyfunc
    assert (local / "xct_pyfunc.py").is_file()
    n = len(registry["params"].stages)
    arts = pyfunc.get("artifacts", {})
    assert sorted(k for k in arts if k.startswith("stage")) == [f"stage{k}" for k in range(1, n + 1)]
    for k in range(1, n + 1):
        assert arts[f"stage{k}"]["path"].endswith(".pt")
    assert any(f.startswith("code/xct_core/") for f in files), "xct_core must ship with the model (code_paths)"
