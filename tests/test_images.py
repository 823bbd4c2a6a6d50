"""The container images of infra/images.yaml, built and run for real with podman.

``python infra/images.py build --local`` (``make images``; ``.ci/run`` runs it) builds every
image into podman's local store on a machine with no container registry (see that module's
doc: debootstrap base, this machine's pip configuration mounted into the RUN steps, xct-train
on a CPU stand-in of its CUDA base). These tests then run what was built:

* xct-light and xct-train: the image's own user is uid/gid 1000, ``pip check`` passes,
  ``xct --help`` runs, torch is the pinned version (and the CPU build in xct-light);
* xct-mlflow: ``mlflow server`` in the container answers ``/health``; an experiment, a run,
  a metric and an artifact go in through the host's MLflow client and come back, and the
  artifact is found on the container's own disk;
* one KFP component through ``kfp.local.DockerRunner`` in xct-light (podman's Docker-
  compatible API service): ``importer → ingest_component`` over three phantoms; the ingest
  output is read on the host and its files are owned by uid 1000, the container's user.

Skipped on a machine without podman or without the built images; FAILS under ``CI``
(``.ci/run`` installs podman and builds the images). Run: ``make images`` then
``.venv/bin/python -m pytest tests/test_images.py -q``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from moto_server import free_port
from postgres_server import ci_is_set

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("xct_infra_images", REPO / "infra" / "images.py")
images = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(images)

BASE_TORCH = images.torch_version()


def podman(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One podman call with the project's containers.conf; a failure shows podman's output."""
    proc = subprocess.run(["podman", *args], env=images.podman_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} → exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    """``key → localhost/name:tag`` of every built image, or skip (FAIL under CI)."""
    problems = []
    refs = {key: images.local_ref(key) for key in images.load_images()["built"]}
    if shutil.which("podman") is None:
        problems.append("podman is not installed")
    elif os.geteuid() != 0:
        problems.append("the local images are built and run by root's podman (rootful storage)")
    else:
        missing = [ref for ref in refs.values() if not images.podman_image_exists(ref)]
        if missing:
            problems.append(f"not built: {', '.join(missing)} (run `make images`)")
    if problems:
        msg = "; ".join(problems)
        if ci_is_set():
            pytest.fail(f"{msg}. CI is set: .ci/run should have installed podman (Debian) and run `make images`; "
                        "see outputs/images/*.log")
        pytest.skip(msg)
    return refs


@pytest.mark.parametrize("key", ["light", "train"])
def test_project_image_runs_as_uid_1000_with_a_consistent_install(built: dict[str, str], key: str) -> None:
    ref = built[key]
    cfg = json.loads(podman("image", "inspect", ref).stdout)[0]["Config"]
    assert cfg.get("User") == "1000:1000", cfg.get("User")
    # the image's own user (no --user): ids, the dependency set, the CLI, the torch build
    out = podman("run", "--rm", ref, "sh", "-c",
                 "id -u; id -g; python -m pip check; xct --help; "
                 "python -c 'import torch; print(\"torch\", torch.__version__, torch.version.cuda)'").stdout
    lines = out.splitlines()
    assert lines[:2] == ["1000", "1000"], out
    assert "No broken requirements found." in out, out
    for command in ("drr", "pipeline", "models"):
        assert command in out, f"`xct --help` in {ref} does not list {command!r}:\n{out}"
    torch_line = next(l for l in lines if l.startswith("torch "))
    _, version, cuda = torch_line.split()
    assert version.split("+")[0] == BASE_TORCH, torch_line
    if key == "light":
        assert cuda == "None", f"xct-light must carry the CPU torch: {torch_line}"
    # the source in the image is this checkout's (the build context), not something else
    there = podman("run", "--rm", ref, "cat", "/app/xct_core/drr.py").stdout
    assert there == (REPO / "xct_core" / "drr.py").read_text(), \
        f"{ref}: /app/xct_core/drr.py differs from the checkout (rebuild: make images)"


def _wait_http(url: str, container: str, deadline_s: float) -> str:
    """GET ``url`` until it answers 200 (bounded); fail early if the container has exited."""
    t_end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < t_end:
        state = podman("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip()
        if state != "true":
            logs = podman("logs", container, check=False)
            raise AssertionError(f"{container} stopped before {url} answered:\n{logs.stdout}\n{logs.stderr}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return r.read().decode()
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {deadline_s:.0f} s ({last})")


def test_mlflow_image_serves_health_and_one_experiment(built: dict[str, str], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    port = free_port()
    name = f"xct-test-mlflow-{os.getpid()}"
    podman("run", "-d", "--rm", "--name", name, built["mlflow"],
           "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", "sqlite:////home/mlflow/mlflow.db",
           "--serve-artifacts", "--artifacts-destination", "/home/mlflow/artifacts")
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        assert _wait_http(f"{url}/health", name, 120).strip() == "OK"
        print(f"xct-mlflow /health answered after {time.monotonic() - t0:.1f} s")
        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("xct-images-test")
        run = client.create_run(exp)
        client.log_param(run.info.run_id, "stage", "1")
        client.log_metric(run.info.run_id, "psnr_db", 28.25, step=3)
        client.log_text(run.info.run_id, "gate passed\n", "reports/gate.txt")
        client.set_terminated(run.info.run_id)
        back = client.get_run(run.info.run_id)
        assert back.data.metrics == {"psnr_db": 28.25} and back.data.params == {"stage": "1"}
        assert back.info.status == "FINISHED"
        assert client.get_experiment_by_name("xct-images-test").experiment_id == exp
        got = Path(client.download_artifacts(run.info.run_id, "reports/gate.txt", str(tmp_path)))
        assert got.read_text() == "gate passed\n"
        # the artifact lies on the container's disk (proxied artifacts), not on the host's
        found = podman("exec", name, "find", "/home/mlflow/artifacts", "-name", "gate.txt").stdout.split()
        assert len(found) == 1 and run.info.run_id in found[0], found
        assert podman("exec", name, "cat", found[0]).stdout == "gate passed\n"
    finally:
        podman("rm", "-f", "-t", "2", name, check=False, timeout=60)


@pytest.fixture()
def podman_api() -> Iterator[str]:
    """``podman system service`` on a unix socket: the Docker API that kfp.local talks to."""
    sock_dir = Path(tempfile.mkdtemp(prefix="xct-podman-api-"))
    sock = sock_dir / "podman.sock"
    log = open(sock_dir / "service.log", "wb")
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=images.podman_env(),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        t_end = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > t_end:
                raise AssertionError(f"podman system service did not start:\n{(sock_dir / 'service.log').read_text()}")
            time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


DOCKER_RUNNER_SCRIPT = r"""
import json, sys
from kfp import dsl, local
from kfp.dsl import Dataset
from components.kfp_components import ingest_component
from pipelines.kfp_dag import _params_and_text

root, raw = sys.argv[1], sys.argv[2]
_, params_text = _params_and_text("")  # the whole params text, as `xct pipeline run` hands it on
local.init(runner=local.DockerRunner(), pipeline_root=root, raise_on_error=True)

@dsl.pipeline(name="xct-docker-runner-check")
def check(data_uri: str) -> int:
    imported = dsl.importer(artifact_uri=data_uri, artifact_class=Dataset, reimport=False)
    return ingest_component(raw=imported.output, params_yaml=params_text).outputs["n_ok"]

task = check(data_uri=raw)
print("RESULT " + json.dumps({"n_ok": task.output}))
"""


def test_kfp_component_runs_in_xct_light_through_docker_runner(built: dict[str, str], podman_api: str) -> None:
    from xct_core.config import SynthParams
    from xct_core.phantoms.dataset import write_phantoms

    # /tmp itself, world-traversable: the step runs as uid 1000 and writes under the root
    root = Path(tempfile.mkdtemp(prefix="xct-kfp-docker-"))
    try:
        root.chmod(0o777)
        raw = root / "raw"
        write_phantoms(raw, SynthParams(n=3, size=16, spacing_mm=12.8), preview=False)
        env = {**os.environ, "DOCKER_HOST": podman_api, "XCT_IMAGE_LIGHT": built["light"]}
        proc = subprocess.run([sys.executable, "-c", DOCKER_RUNNER_SCRIPT, str(root), str(raw)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert f"Found image {built['light']!r}" in out, out[-4000:]  # kfp.local ran it in the image
        result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
        assert result == {"n_ok": 3}, out[-4000:]
        interim = [p for p in root.rglob("interim") if p.is_dir()]
        assert len(interim) == 1, interim
        written = [p for p in interim[0].rglob("*") if p.is_file()]
        assert written, f"ingest wrote nothing under {interim[0]}"
        owners = {p.stat().st_uid for p in written}
        assert owners == {1000}, f"files not written by the container's uid 1000: {owners}"
        stats = json.loads((interim[0] / "stats.json").read_text())
        assert len(stats["volumes"]) == 3, stats
        assert stats["raw_dir"] == str(raw), stats["raw_dir"]
        splits = json.loads((interim[0] / "splits.json").read_text())
        assert splits, splits
    finally:
        shutil.rmtree(root, ignore_errors=True)
