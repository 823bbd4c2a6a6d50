"""A real multi-node Ray cluster on one machine for tests: ``ray start`` processes on loopback
addresses, one CPU each, in a private temp dir.

Usage::

    from ray_cluster import RayCluster

    with RayCluster() as cluster:            # head on 127.0.0.2 (1 CPU)
        worker = cluster.add_worker("127.0.0.3")
        cluster.wait_alive(2)                # {node_id: ip} of the ALIVE nodes
        env = {**os.environ, **cluster.client_env()}   # RAY_ADDRESS=127.0.0.2:<port>, the token, …
        cluster.kill_raylet(worker)          # SIGKILL of that node's raylet

How it is built, and why (Ray 2.60 on a shared 2-core box):

* Each node is its own ``ray start … --block`` process in its own session (process group),
  so the head and the worker are separate Ray nodes exactly as on two machines: separate
  raylets, object stores and worker pools, joined through the head's GCS over TCP.
* Loopback addresses ``127.0.0.2`` (head) and ``127.0.0.3`` (worker), passed with
  ``--node-ip-address``: Ray rewrites ``127.0.0.1`` to the machine's address, and two nodes
  with one IP would make "which node did the work" ambiguous. Every address a node
  advertises and every connection is on 127.0.0.x. (Ray 2.60 still *binds* its GCS,
  raylet and agent servers on all interfaces, whatever ``--node-ip-address`` says; there
  is no option to narrow that.)
* Every port is named (GCS, node manager, object manager, agents, metrics, client server)
  and taken from the kernel's ephemeral range (a free port of the node's own address), so
  none falls into Ray's worker-port range (10002-19999) and two test sessions on one box
  do not collide. The head runs the dashboard (on its own address): it serves the state
  API, which Ray Train's placement-group cleaner polls, as on a KubeRay head.
* ``--temp-dir`` (and ``RAY_TMPDIR``) is a short ``mkdtemp`` dir under /tmp (unix socket
  paths are limited to ~107 bytes), one sub-dir per node; the GCS health check runs every
  0.5 s with a threshold of 3 misses, so a killed node is declared dead in seconds, not ~30 s.
* Token authentication is on (``RAY_AUTH_MODE=token``), as on the KubeRay cluster
  (``authOptions: {mode: token}``): each cluster draws its own random token
  (:func:`secrets.token_hex`, never written to the repo nor to ``~/.ray``) and hands it to its
  nodes and to its clients through ``RAY_AUTH_TOKEN`` (:meth:`client_env`). A GCS, raylet or
  dashboard call without it is refused. The dashboard (Jobs API, state API) listens on the
  head's address only (``--dashboard-host``), the one address the Jobs-API route needs.
* Every wait is bounded (``timeout_s``) and raises ``RuntimeError`` with the tail of the
  node's log. :meth:`stop` sends SIGTERM to each ``ray start --block`` (it then stops its
  node's processes), SIGKILLs each process group that is still there after a grace period,
  and finally SIGKILLs any process left whose command line names this cluster's temp dir
  (workers orphaned by a killed raylet). It never runs ``ray stop`` (that would stop every
  Ray cluster of this user on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
#: Ray's default worker-port range: explicit ports must stay outside it
WORKER_PORTS = range(10002, 20000)
#: object store per node (Ray's default is 30 % of RAM per node; the tests move kilobytes)
OBJECT_STORE_BYTES = 256 * 1024**2
#: the variables that configure Ray's token authentication (mode, token, token file)
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
#: GCS health check of the nodes (Ray system config via the environment of the head)
HEALTH_ENV = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


#: the checkout's folders an isolated node must not see (its data and outputs)
REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("data", "outputs")


def isolated_command(cmd: list[str], temp_dir: Path) -> list[str]:
    """``cmd`` in its own user + mount namespace (``unshare --user --map-root-user
    --mount``): a private, empty /tmp (tmpfs), and an empty tmpfs over the checkout's
    :data:`HIDDEN` folders, so the node shares no scratch file system with the driver or
    the other nodes — only the code and the venv (read), and the network. Its temp dir is
    created inside the private /tmp; its log (the inherited stdout) still reaches the test."""
    import shlex

    mounts = ["/tmp", *(str(REPO / d) for d in HIDDEN if (REPO / d).is_dir())]
    script = "set -e; " + "".join(f"mount -t tmpfs tmpfs {shlex.quote(m)}; " for m in mounts)
    script += f"mkdir -p {shlex.quote(str(temp_dir))}; exec {shlex.join(cmd)}"
    return ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", script]


def free_port(ip: str) -> int:
    """A free TCP port of ``ip`` from the kernel's ephemeral range (never 10002-19999)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = int(s.getsockname()[1])
        if port not in WORKER_PORTS:
            return port
    raise RuntimeError(f"no free port on {ip} outside {WORKER_PORTS}")


@dataclass
class RayNode:
    """One ``ray start --block`` process (a Ray node)."""

    ip: str
    head: bool
    log: Path
    proc: subprocess.Popen[bytes]
    ports: dict[str, int] = field(default_factory=dict)
    killed: bool = False  #: its raylet was killed on purpose (its ``ray start`` then exits)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class RayCluster:
    """A head node (and worker nodes added later) on loopback addresses; a context manager."""

    def __init__(self, head_ip: str = HEAD_IP, num_cpus: int = 1, timeout_s: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        self.head_ip = head_ip
        #: extra environment of every node (e.g. PYTHONPATH: what the image's installed code is)
        self.env = dict(env or {})
        self.num_cpus = num_cpus
        self.timeout_s = timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="xrc-", dir="/tmp"))
        self.temp_dir = self.root / "ray"
        self.nodes: list[RayNode] = []
        self.gcs_port = 0
        #: this cluster's Ray auth token (RAY_AUTH_MODE=token): random per cluster, never on disk
        self.token = secrets.token_hex(32)

    # ------------------------------------------------------------------ environment

    @property
    def address(self) -> str:
        """The GCS address a driver joins: ``RAY_ADDRESS``."""
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard (Jobs API): what ``pipeline.ray.address`` names."""
        return f"http://{self.head_ip}:{self.nodes[0].ports['dashboard-port']}"

    def auth_env(self) -> dict[str, str]:
        """Token authentication as the nodes run it: the mode and this cluster's token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def client_env(self) -> dict[str, str]:
        """What a driver (``xct train`` …) needs to join this cluster: ``RAY_ADDRESS`` and the
        cluster's token (:meth:`auth_env`)."""
        return {"RAY_ADDRESS": self.address, **self.auth_env()}

    def _node_env(self, temp_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(HEALTH_ENV)
        env.update(self.env)
        env.update(self.auth_env())
        env.update(RAY_TMPDIR=str(temp_dir), RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return env

    # ------------------------------------------------------------------ nodes

    def _start(self, ip: str, head: bool, isolated: bool = False) -> RayNode:
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
        if head:
            names += ["port", "ray-client-server-port", "dashboard-port"]
        ports = {n: free_port(ip) for n in names}
        # each node its own temp dir, as on separate machines (one shared session dir would
        # have every node's log monitor forward every node's worker logs)
        temp_dir = self.temp_dir if head else self.root / f"node{len(self.nodes)}"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
               f"--node-ip-address={ip}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE_BYTES}",
               *(f"--{n}={p}" for n, p in ports.items())]
        if head:
            self.gcs_port = ports["port"]
            # the dashboard serves the state API, which Ray Train's placement-group cleaner
            # polls (without it every run logs "State API may be temporarily unavailable")
            cmd += ["--head", "--include-dashboard=true", f"--dashboard-host={ip}"]
        else:
            cmd += [f"--address={self.address}"]
        if isolated:
            cmd = isolated_command(cmd, temp_dir)
        log = self.root / f"node-{ip}-{len(self.nodes)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self._node_env(temp_dir),
                                    start_new_session=True)
        node = RayNode(ip, head, log, proc, ports)
        self.nodes.append(node)
        return node

    def start(self, wait: bool = True) -> RayCluster:
        """Start the head; ``wait``: until the GCS lists it ALIVE (else call :meth:`wait_alive`)."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(self.head_ip, head=True)
            if wait:
                self.wait_alive(1)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, ip: str = WORKER_IP, wait: bool = True, isolated: bool = False) -> RayNode:
        """Start a worker node on ``ip`` joined to the head; waits until it is ALIVE.
        ``isolated``: in its own mount namespace (:func:`isolated_command`), sharing no
        scratch file system with the driver or the head."""
        before = set(self.alive())
        node = self._start(ip, head=False, isolated=isolated)
        if wait:
            self.wait_for(lambda nodes: len(set(nodes) - before) >= 1 and ip in nodes.values(),
                          f"worker node {ip} ALIVE", node)
        return node

    # ------------------------------------------------------------------ the GCS view

    def _adopt_token(self) -> None:
        """This process's own Ray calls (the GcsClient of :meth:`alive`) carry this cluster's
        token: Ray reads the mode and token once per process (RayConfig, the token loader's
        cache), so both are refreshed; :meth:`stop` puts the previous ones back."""
        from ray._raylet import AuthenticationTokenLoader, Config

        if not hasattr(self, "_saved_auth"):
            self._saved_auth = {k: os.environ.get(k) for k in AUTH_ENV}
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update(self.auth_env())
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    def _restore_token(self) -> None:
        saved = self.__dict__.pop("_saved_auth", None)
        if saved is None:
            return
        from ray._raylet import AuthenticationTokenLoader, Config

        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    def _gcs(self) -> Any:
        from ray._raylet import GcsClient  # the client `ray status` uses; no driver needed

        if not hasattr(self, "_gcs_client"):
            self._adopt_token()
            self._gcs_client = GcsClient(address=self.address)
        return self._gcs_client

    def alive(self) -> dict[str, str]:
        """``{node_id (hex): node ip}`` of the ALIVE nodes, as the GCS sees them."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = self._gcs().get_all_node_info(timeout=5).values()
        return {i.node_id.hex(): i.node_manager_address for i in infos if i.state == GcsNodeInfo.GcsNodeState.ALIVE}

    def wait_for(self, pred: Any, what: str, node: RayNode | None = None) -> dict[str, str]:
        """Poll :meth:`alive` until ``pred(nodes)``; RuntimeError after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        last: dict[str, str] = {}
        err = ""
        while time.monotonic() < deadline:
            for n in [node] if node else self.nodes:
                if not n.killed and n.proc.poll() is not None:
                    raise RuntimeError(f"ray start on {n.ip} exited ({n.proc.returncode}) while waiting for "
                                       f"{what}:\n{n.tail()}")
            try:
                last = self.alive()
                if pred(last):
                    return last
            except Exception as e:  # noqa: BLE001 - the GCS is not up yet: keep polling
                err = f"{type(e).__name__}: {e}"
            time.sleep(0.25)
        tails = "\n".join(f"--- {n.ip}\n{n.tail()}" for n in ([node] if node else self.nodes))
        raise RuntimeError(f"timed out after {self.timeout_s:.0f} s waiting for {what} (alive: {last}; {err})\n{tails}")

    def wait_alive(self, n: int) -> dict[str, str]:
        return self.wait_for(lambda nodes: len(nodes) == n, f"{n} ALIVE node(s)")

    def node_id(self, node: RayNode) -> str:
        """The node id of ``node`` (its IP is unique in this cluster while it is alive)."""
        ids = [nid for nid, ip in self.alive().items() if ip == node.ip]
        if len(ids) != 1:
            raise RuntimeError(f"expected one ALIVE node at {node.ip}, found {ids}")
        return ids[0]

    # ------------------------------------------------------------------ faults and shutdown

    def raylet(self, node: RayNode) -> psutil.Process:
        """The raylet process of ``node`` (a child of its ``ray start``)."""
        kids = [p for p in psutil.Process(node.proc.pid).children(recursive=True) if p.name() == "raylet"]
        if len(kids) != 1:
            raise RuntimeError(f"expected one raylet under ray start pid {node.proc.pid}, found {kids}")
        return kids[0]

    def kill_raylet(self, node: RayNode) -> int:
        """SIGKILL the raylet of ``node`` (the node dies as a machine would); returns its pid."""
        proc = self.raylet(node)
        node.killed = True
        proc.send_signal(signal.SIGKILL)
        return proc.pid

    def _ours(self) -> list[psutil.Process]:
        """Processes whose command line names this cluster's temp dir (any node, orphans too)."""
        needle = str(self.root)
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(needle in a for a in (p.info["cmdline"] or [])):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every node (module docstring) and remove the temp dir; idempotent."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)  # whatever is left of its session
            except (ProcessLookupError, PermissionError):
                pass
            if node.proc.poll() is None:
                node.proc.wait(timeout=10)
        left = self._ours()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        self.__dict__.pop("_gcs_client", None)
        self._restore_token()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------- one cluster, several modules

#: the pytest fixture (tests/conftest.py) through which test modules share :func:`shared_cluster`
SHARED_FIXTURE = "shared_ray_cluster"
_shared: RayCluster | None = None


def shared_cluster() -> RayCluster:
    """THE two-node cluster that tests/test_ray_cluster.py and tests/test_ray_jobs.py share
    (through the session fixture :data:`SHARED_FIXTURE`): a head on 127.0.0.2 and a worker
    node on 127.0.0.3, one CPU each, its own random token, every node importing this
    checkout first (``PYTHONPATH``, as the image's installed code), the dashboard answering.
    Started on first use; :func:`stop_shared` stops it (tests/conftest.py does, as soon as the
    next test does not use it, so it never idles under the rest of the suite).

    Both modules need a worker that shares the driver's disk (Ray Train and Ray Data write
    their outputs to local folders there); the isolated-worker cluster of
    tests/test_jobs_route.py stays its own. A test may change the cluster's nodes (the
    node-kill test replaces the worker with a new node): users read the ALIVE nodes from
    :meth:`RayCluster.alive`, not from the addresses above."""
    global _shared
    if _shared is None:
        pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        cluster = RayCluster(num_cpus=1, env={"PYTHONPATH": pythonpath})
        cluster.start()
        try:
            cluster.add_worker()
            cluster.wait_alive(2)
            wait_dashboard(cluster)
        except BaseException:
            cluster.stop()
            raise
        _shared = cluster
    else:
        # a test that killed a node without replacing it (it failed half-way) must not fail the
        # next module's tests too: a fresh worker node on an address no node has used
        alive = _shared.alive()
        if len(alive) < 2:
            used = {n.ip for n in _shared.nodes}
            ip = next(f"127.0.0.{i}" for i in range(3, 250) if f"127.0.0.{i}" not in used)
            _shared.add_worker(ip)
        _shared.wait_alive(2)
    return _shared


def shared_running() -> bool:
    """Whether :func:`shared_cluster` has a cluster running."""
    return _shared is not None


def stop_shared() -> None:
    """Stop :func:`shared_cluster`'s cluster if it runs; RuntimeError if any of its processes
    outlived the stop."""
    global _shared
    cluster, _shared = _shared, None
    if cluster is not None:
        cluster.stop()
        left = cluster._ours()
        if left:
            raise RuntimeError(f"processes of the shared test cluster are still running: {left}")


def wait_dashboard(cluster: RayCluster, timeout_s: float = 60.0) -> None:
    """Until the head's dashboard (Jobs API) answers HTTP; RuntimeError after ``timeout_s``."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (a refusal is an answer)
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the dashboard at {cluster.dashboard_url} did not answer in {timeout_s:.0f} s")
