"""Register / promote / load through a REAL ``mlflow server`` whose artifacts live in S3 (moto, then ``rclone serve s3``).

Same scenarios as tests/test_register.py (sqlite), but the client only knows
``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``: the server (sqlite backend,
``--serve-artifacts --artifacts-destination s3://<bucket>/mlflow``) stores the artifacts in
moto's S3 server. The test process has NO ``MLFLOW_S3_ENDPOINT_URL`` nor bucket knowledge:
an artifact that reached the bucket was uploaded through the server (PUT
``/api/2.0/mlflow-artifacts/artifacts/…``).

Downloads, note: MLflow 3.17 clients ask an S3-backed proxy server for *presigned URLs*
(``/server-info`` advertises ``multipart_downloads_enabled``) and then read S3 directly, at
the endpoint the SERVER uses; a client that can reach the server but not that endpoint
needs ``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false`` (stream through the server). Both
download paths are exercised here.

Known answers: the bucket's stage objects are byte-identical to the exported stage files;
the model loaded by alias reproduces the project sampler run on the same stage files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mlflow_server import MlflowServer
from moto_server import S3_SERVERS, isolate_aws_env, make_s3_server
from test_evaluate import build_tiny_processed, export_tiny_stages, make_tiny_params
from test_register import NAME, _write_reports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BUCKET = "xct-mlflow-test"
PREFIX = "mlflow"


@pytest.fixture(scope="module", params=S3_SERVERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An S3 server (moto, then rclone serve s3) + bucket, an mlflow server proxying artifacts
    to it, tiny processed data; the client env points at the server only (no S3 endpoint)."""
    root = tmp_path_factory.mktemp(f"mlflow-server-{request.param}")
    mp = pytest.MonkeyPatch()
    isolate_aws_env(mp, root, ("MLFLOW_S3_ENDPOINT_URL",))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    moto = make_s3_server(request.param, root).start()
    srv = MlflowServer(root / "server", f"s3://{BUCKET}/{PREFIX}", s3_endpoint=moto.url)
    try:
        s3 = moto.client()
        s3.create_bucket(Bucket=BUCKET)
        srv.start(timeout_s=60)
        mp.setenv("MLFLOW_TRACKING_URI", srv.url)
        params = make_tiny_params()
        processed = build_tiny_processed(root, params, n_train=1, n_test=1)
        pfile = root / "params.yaml"
        pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
        yield {"root": root, "uri": srv.url, "srv": srv, "s3": s3, "params": params,
               "processed": processed, "params_file": pfile}
    finally:
        mp.undo()
        srv.stop()
        moto.stop()


def _run(env: dict[str, Any], name: str, seed: int, psnr2: float) -> dict[str, Any]:
    """The project's register step; tracking resolved from $MLFLOW_TRACKING_URI (no uri passed)."""
    from components.register import run_register

    run = env["root"] / name
    export_tiny_stages(run / "train", env["params"], seed=seed)
    gates, ev = _write_reports(run, env["params"], {1: 20.0, 2: psnr2}, {1: True, 2: True})
    return run_register(gates, ev, run / "train", run / "summary.json", env["params"], processed_dir=env["processed"])


def _objects(env: dict[str, Any], prefix: str = PREFIX + "/") -> dict[str, int]:
    """key → size of every object under ``prefix`` in the bucket (paginated)."""
    out: dict[str, int] = {}
    for page in env["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: int(o["Size"]) for o in page.get("Contents", [])})
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fail_msg(env: dict[str, Any]) -> str:
    return f"\n--- mlflow server log tail ---\n{env['srv'].log_tail()}"


def test_register_through_server_lands_in_s3_idempotent_candidate_and_cli(server: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ  # the client cannot reach S3 by itself
    c = MlflowClient(server["uri"])

    # 1. first cascade, every gate passes → v1 @champion, tracked at the server URL
    s1 = _run(server, "run1", seed=0, psnr2=25.0)
    assert s1["status"] == "promoted" and s1["alias"] == "champion", _fail_msg(server)
    assert s1["model_uri"] == f"models:/{NAME}/1" and s1["mlflow_tracking_uri"] == server["uri"]
    mv = c.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "1" and "champion" in (c.get_model_version(NAME, "1").aliases or [])

    # 2. the model's artifacts physically live in the bucket, byte-identical to the stage files
    # over REST the version may not carry model_id; its source is models:/<model_id>
    model_id = mv.model_id or mv.source.removeprefix("models:/")
    assert model_id.startswith("m-"), (mv.model_id, mv.source)
    lm = c.get_logged_model(model_id)
    assert lm.artifact_location.startswith("mlflow-artifacts:/"), lm.artifact_location  # proxied
    mprefix = server["srv"].s3_key(lm.artifact_location).rstrip("/") + "/"
    assert mprefix.startswith(PREFIX + "/")
    keys = _objects(server, mprefix)
    names = {k.removeprefix(mprefix) for k in keys}
    for want in ("MLmodel", "artifacts/stage1.pt", "artifacts/stage2.pt", "artifacts/params.json"):
        assert want in names, f"{want} not in s3://{BUCKET}/{mprefix}: {sorted(names)}"
    assert any(n.endswith("xct_pyfunc.py") for n in names), sorted(names)
    for k in (1, 2):
        local = (server["root"] / "run1" / "train" / "models" / f"stage{k}" / "best.pt").read_bytes()
        body = server["s3"].get_object(Bucket=BUCKET, Key=f"{mprefix}artifacts/stage{k}.pt")["Body"].read()
        assert _sha(body) == _sha(local), f"stage{k}.pt in S3 differs from the exported file"
    # the registration run's gate reports went to the bucket too
    run_keys = _objects(server, f"{PREFIX}/{lm.experiment_id}/{mv.run_id}/artifacts/gates/")
    assert {k.rsplit("/", 1)[1] for k in run_keys} == {"stage1.json", "stage2.json"}, sorted(run_keys)
    n_objects = len(_objects(server))

    # 3. the same cascade again → the same version, nothing new in the registry or the bucket
    s1b = _run(server, "run1", seed=0, psnr2=25.0)
    assert s1b["model_uri"] == f"models:/{NAME}/1" and s1b["status"] == "promoted"
    assert sorted(str(v.version) for v in c.search_model_versions(f"name='{NAME}'")) == ["1"]
    assert len(_objects(server)) == n_objects

    # 4. different weights, worse on the same split → v2 @candidate, champion stays v1
    s2 = _run(server, "run2", seed=1, psnr2=22.0)
    assert s2["status"] == "registered" and s2["alias"] == "candidate" and s2["model_uri"] == f"models:/{NAME}/2"
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(NAME, "candidate").version) == "2"
    assert "does not beat champion v1" in c.get_model_version(NAME, "2").tags["xct.alias_reason"]
    assert len(_objects(server)) > n_objects

    # 5. `xct models list` in a fresh process with only the env → both versions with aliases
    xct = Path(sys.executable).with_name("xct")
    cmd = [str(xct)] if xct.exists() else [sys.executable, "-m", "pipelines.cli"]
    r = subprocess.run([*cmd, "models", "list", "--params", str(server["params_file"])], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ), cwd=server["root"])
    assert r.returncode == 0, r.stderr[-3000:] + _fail_msg(server)
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()}
    assert set(lines) == {"1", "2"}, r.stdout
    assert "champion" in lines["1"] and "25.000" in lines["1"]
    assert "candidate" in lines["2"] and "22.000" in lines["2"]
    assert server["uri"] in r.stdout


def test_load_by_alias_through_server_and_predict(server: dict[str, Any]) -> None:
    import mlflow
    from mlflow import MlflowClient

    from components.model_uri import resolve_model
    from xct_core.cascade import sample_cascade
    from xct_core.checkpoint import load_stage_model
    from xct_core.diffusion import Sampler

    c = MlflowClient(server["uri"])
    if not c.search_model_versions(f"name='{NAME}'"):
        _run(server, "run1", seed=0, psnr2=25.0)
    champion = str(c.get_model_version_by_alias(NAME, "champion").version)
    assert champion == "1"  # run1's cascade (test 1 leaves it champion; standalone this test registers it)

    # the project's resolver, both download paths: MLflow's default (presigned S3 URLs handed
    # out by the server) and streaming through the server (clients that cannot reach S3)
    for mode, flag in (("presigned", None), ("streamed", "false")):
        with pytest.MonkeyPatch.context() as mp:
            if flag is None:
                mp.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", raising=False)
            else:
                mp.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", flag)
            rm = resolve_model(f"models:/{NAME}@champion", dst_dir=server["root"] / f"resolved-{mode}")
        assert rm.layout == "registered" and rm.n_stages == 2, mode
        for k, f in enumerate(rm.stage_files, start=1):
            local = server["root"] / "run1" / "train" / "models" / f"stage{k}" / "best.pt"
            assert _sha(f.read_bytes()) == _sha(local.read_bytes()), (mode, k)

    # the pyfunc by alias: a tiny X-ray pair → a finite [32]^3 HU volume in the window
    mlflow.set_tracking_uri(server["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    p = server["params"]
    rng = np.random.default_rng(0)
    frontal = rng.uniform(0, 8, (16, 16)).astype(np.float32)
    lateral = rng.uniform(0, 8, (16, 16)).astype(np.float32)
    vol = np.asarray(model.predict({"frontal": frontal[None], "lateral": lateral[None]}, params={"seed": 3}))
    assert vol.shape == (32, 32, 32) and vol.dtype == np.float32 and np.isfinite(vol).all()
    w = p.hu.net_map()  # the networks' HU range (the map inverse of [-1, 1])
    assert vol.min() >= w.lo - 1e-3 and vol.max() <= w.hi + 1e-3

    # known answer: the project sampler on the resolved stage files, same seed and steps
    stages = [load_stage_model(f) for f in rm.stage_files]
    outs = sample_cascade(stages, torch.from_numpy(frontal)[None, None], torch.from_numpy(lateral)[None, None],
                          sampler=Sampler.from_params(p, p.eval.sample_steps), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(vol, w.inverse(outs[-1][0, 0].numpy()), atol=1e-3)
