"""Structural checks of infra/ (container images, Kubernetes manifests, compose) and of
docs/cluster.md — no Docker engine, no cluster, no network.

What a real deployment would trip over first is checked against the real thing where it
is cheap: the MLflow server's own CLI parses the server command lines and its own host
check accepts the tracking URIs; ``ray start``'s options accept the rayStartParams; the
``xct`` CLI parses the RayJob entrypoint and every ``xct`` command in the docs; the
cluster params overlay validates against xct_core.config. Everything else is consistency:
one image list (infra/images.yaml) used by the KFP components, the manifests, the compose
file and the Dockerfiles; one MLflow/S3 service naming across manifests, compose and docs.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose" / "docker-compose.yaml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
DOCKER = INFRA / "docker"
DOCS = REPO / "docs" / "cluster.md"
NAMESPACE = "xct"
PLACEHOLDER = "CHANGE_ME"

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
#: env vars a user sets for a cluster run, and the code that reads each (docs must name them all)
ENV_READ_BY = {
    "MLFLOW_TRACKING_URI": "components/tracking.py",
    "RAY_ADDRESS": "components/train.py",
    "XCT_S3_ENDPOINT_URL": "components/s3sync.py",
    "AWS_ENDPOINT_URL": "components/s3sync.py",
    "XCT_IMAGE_LIGHT": "components/kfp_components.py",
    "XCT_IMAGE_TRAIN": "components/kfp_components.py",
}
#: env vars read by libraries (boto3, the MLflow server), not by xct code
ENV_LIBRARY = ["MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]


# --------------------------------------------------------------------------- loading


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml"))


def _objects() -> list[tuple[Path, dict]]:
    out = []
    for f in _k8s_files():
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                out.append((f, doc))
    return out


@pytest.fixture(scope="module")
def objects() -> list[tuple[Path, dict]]:
    objs = [(f, d) for f, d in _objects() if d.get("kind") != "Kustomization"]
    assert objs, "no Kubernetes objects under infra/k8s"
    return objs


def _by_kind(objects: list[tuple[Path, dict]], kind: str) -> list[dict]:
    return [d for _, d in objects if d.get("kind") == kind]


def _one(objects: list[tuple[Path, dict]], kind: str, name: str) -> dict:
    found = [d for d in _by_kind(objects, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def images() -> dict:
    return yaml.safe_load((INFRA / "images.yaml").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names normalised (PEP 503)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = ver.strip()
    return out


LOCK = _pins(REPO / "requirements" / "lock.txt")
BASE = _pins(REPO / "requirements" / "base.txt")


def _pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod template in an object (CRDs included)."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind in WORKLOAD_KINDS:
        yield "template", spec["template"]["spec"]
    elif kind in ("RayCluster", "RayJob"):
        cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec")
        if cluster:
            yield "head", cluster["headGroupSpec"]["template"]["spec"]
            for g in cluster.get("workerGroupSpecs", []):
                yield f"worker {g.get('groupName')}", g["template"]["spec"]
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]["spec"]


def _containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    for where, pod in _pod_specs(doc):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            yield where, pod, c


def _find_images(node: Any) -> Iterator[str]:
    """Every ``image:`` value under a containers/initContainers list, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for c in v:
                    if isinstance(c, dict) and "image" in c:
                        yield c["image"]
            yield from _find_images(v)
    elif isinstance(node, list):
        for v in node:
            yield from _find_images(v)


def _qty(v: Any) -> float:
    """A Kubernetes quantity as a float (cpu cores or bytes)."""
    s = str(v)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return float(s[: -len(u)]) * units[u]
    return float(s)


def _built_refs(images: dict) -> dict[str, str]:
    return {k: f"{v['name']}:{v['tag']}" for k, v in images["built"].items()}


def _pinned(ref: str) -> bool:
    """name:tag with a real tag (not latest), or a digest."""
    if "@sha256:" in ref:
        return True
    last = ref.rsplit("/", 1)[-1]
    return ":" in last and last.split(":", 1)[1] not in ("", "latest")


# --------------------------------------------------------------------------- parsing + per-kind fields


def test_every_infra_yaml_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 8, files
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{f}: empty or not mappings"


def test_objects_have_identity_and_namespace(objects: list[tuple[Path, dict]]) -> None:
    for f, d in objects:
        where = f"{f.name}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), where
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
        elif f.name == "kfp-launcher.yaml":
            assert d["metadata"]["namespace"] == "kubeflow", where
        else:
            assert d["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace must be {NAMESPACE}"


def test_kustomization_lists_existing_files_and_no_templates() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    res = kust["resources"]
    for r in res:
        assert (K8S / r).is_file(), f"kustomization resource {r} missing"
    for excluded in ("secrets.template.yaml", "rayjob-train.yaml", "kfp-launcher.yaml"):
        assert excluded not in res, f"{excluded} must not be applied by `kubectl apply -k`"
    listed = set(res) | {"kustomization.yaml", "secrets.template.yaml", "rayjob-train.yaml", "kfp-launcher.yaml"}
    assert {p.name for p in _k8s_files()} <= listed, "a manifest is neither in kustomization.yaml nor a known template"


def test_workloads_selectors_containers_and_resources(objects: list[tuple[Path, dict]]) -> None:
    workloads = [d for _, d in objects if d["kind"] in WORKLOAD_KINDS]
    assert {d["kind"] for d in workloads} >= {"Deployment", "StatefulSet", "Job"}
    for d in workloads:
        name = f"{d['kind']}/{d['metadata']['name']}"
        tmpl = d["spec"]["template"]
        if d["kind"] != "Job":
            sel = d["spec"]["selector"]["matchLabels"]
            labels = tmpl["metadata"]["labels"]
            assert sel and all(labels.get(k) == v for k, v in sel.items()), f"{name}: selector ≠ template labels"
        else:
            assert tmpl["spec"]["restartPolicy"] in ("OnFailure", "Never"), name
        assert tmpl["spec"]["containers"], name


def test_every_container_has_image_and_bounded_resources(objects: list[tuple[Path, dict]]) -> None:
    n = 0
    for _, d in objects:
        for where, _pod, c in _containers(d):
            name = f"{d['kind']}/{d['metadata']['name']} {where} {c.get('name')}"
            assert c.get("image"), name
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            for r in ("cpu", "memory"):
                assert r in req and r in lim, f"{name}: resources.requests/limits.{r} missing"
                assert _qty(req[r]) <= _qty(lim[r]), f"{name}: {r} request > limit"
            if "nvidia.com/gpu" in lim or "nvidia.com/gpu" in req:
                assert req.get("nvidia.com/gpu") == lim.get("nvidia.com/gpu"), f"{name}: GPU request ≠ limit"
            n += 1
    assert n >= 9, f"only {n} containers found"
    ray = _one(objects, "RayCluster", "xct-ray")
    auto = ray["spec"]["autoscalerOptions"]["resources"]
    assert auto["requests"] and auto["limits"], "autoscaler sidecar needs resources"


#: images whose own default user is root: the manifests/compose must name a non-root uid
ROOT_BY_DEFAULT = ("postgres:", "quay.io/minio/minio:", "quay.io/minio/mc:")


def _hardened(where: str, pod_sc: dict, c_sc: dict, image: str) -> None:
    """One container's effective security context: non-root (a uid other than 0, named when
    the image's default user is root), no privilege escalation, every capability dropped."""
    eff = {**(pod_sc or {}), **(c_sc or {})}
    assert eff.get("runAsNonRoot") is True, f"{where}: runAsNonRoot must be true"
    uid = eff.get("runAsUser")
    assert uid is None or int(uid) != 0, f"{where}: runAsUser 0"
    if image.startswith(ROOT_BY_DEFAULT):
        assert uid is not None, f"{where}: {image} runs as root by default: set runAsUser"
    assert (c_sc or {}).get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation: false"
    caps = (c_sc or {}).get("capabilities") or {}
    assert "ALL" in (caps.get("drop") or []), f"{where}: capabilities.drop must hold ALL"
    assert not caps.get("add"), f"{where}: adds capabilities {caps.get('add')}"
    assert not (c_sc or {}).get("privileged"), f"{where}: privileged"


def test_every_container_runs_non_root_without_privileges(objects: list[tuple[Path, dict]], compose: dict) -> None:
    n = 0
    for _, d in objects:
        for where, pod, c in _containers(d):
            name = f"{d['kind']}/{d['metadata']['name']} {where} {c.get('name')}"
            _hardened(name, pod.get("securityContext"), c.get("securityContext"), c.get("image", ""))
            n += 1
        if d["kind"] in ("RayCluster", "RayJob"):  # the autoscaler sidecar KubeRay adds to the head pod
            cluster = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
            head = cluster["headGroupSpec"]["template"]["spec"]
            _hardened(f"{d['kind']}/{d['metadata']['name']} autoscaler", head.get("securityContext"),
                      cluster["autoscalerOptions"].get("securityContext"), head["containers"][0]["image"])
            n += 1
    assert n >= 11, f"only {n} containers checked"
    for name, svc in compose["services"].items():
        where = f"compose service {name}"
        user = str(svc.get("user", ""))
        assert user, f"{where}: set user: (a non-root uid)"
        uid = user.split(":")[0]
        assert uid not in ("0", "root"), f"{where}: runs as root"
        if uid.startswith("${"):  # ${XCT_UID:-1000}: the default must be non-root too
            assert _interpolate(uid, {}) not in ("0", "root"), f"{where}: default uid is root"
        assert "ALL" in (svc.get("cap_drop") or []), f"{where}: cap_drop: [ALL]"
        assert not svc.get("cap_add"), f"{where}: cap_add"
        assert "no-new-privileges:true" in (svc.get("security_opt") or []), f"{where}: no-new-privileges"
        assert not svc.get("privileged"), f"{where}: privileged"
    # postgres runs as the image's own postgres user (999), the owner of its data folder
    assert compose["services"]["postgres"]["user"] == "999:999"
    pg = _one(objects, "StatefulSet", "postgres")["spec"]["template"]["spec"]["securityContext"]
    assert (pg["runAsUser"], pg["fsGroup"]) == (999, 999)


def test_statefulset_and_services_match_workloads(objects: list[tuple[Path, dict]]) -> None:
    pods = []  # (labels, container ports by name and number)
    for _, d in objects:
        if d["kind"] in WORKLOAD_KINDS:
            tmpl = d["spec"]["template"]
            ports = [p for c in tmpl["spec"]["containers"] for p in c.get("ports", [])]
            pods.append((tmpl["metadata"]["labels"], ports))
    services = _by_kind(objects, "Service")
    assert {s["metadata"]["name"] for s in services} >= {"mlflow", "postgres", "minio"}
    for s in services:
        sel, ports = s["spec"].get("selector"), s["spec"].get("ports")
        name = f"Service/{s['metadata']['name']}"
        assert sel and ports, f"{name}: selector and ports required"
        matching = [p for labels, p in pods if all(labels.get(k) == v for k, v in sel.items())]
        assert matching, f"{name}: selector {sel} matches no workload's pod labels"
        for p in ports:
            tp = p.get("targetPort", p["port"])
            names = {cp.get("name") for cp in matching[0]}
            numbers = {cp["containerPort"] for cp in matching[0]}
            assert tp in names or tp in numbers, f"{name}: targetPort {tp} not a container port"
    sts = _one(objects, "StatefulSet", "postgres")
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_references_to_pvcs_configmaps_and_secrets_resolve(objects: list[tuple[Path, dict]]) -> None:
    pvcs = {d["metadata"]["name"] for d in _by_kind(objects, "PersistentVolumeClaim")}
    cms = {d["metadata"]["name"]: set(d["data"]) for d in _by_kind(objects, "ConfigMap")}
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in _by_kind(objects, "Secret")}
    for pvc in _by_kind(objects, "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] and pvc["spec"]["resources"]["requests"]["storage"]
    for _, d in objects:
        for where, pod in _pod_specs(d):
            name = f"{d['kind']}/{d['metadata']['name']} {where}"
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            for v in vols.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: unknown PVC"
                if "configMap" in v:
                    assert v["configMap"]["name"] in cms, f"{name}: unknown ConfigMap"
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in vols or m["name"] in {
                        t["metadata"]["name"] for t in d.get("spec", {}).get("volumeClaimTemplates", [])
                    }, f"{name}: mount {m['name']} has no volume"
                for ef in c.get("envFrom", []):
                    if "secretRef" in ef:
                        assert ef["secretRef"]["name"] in secrets, f"{name}: unknown Secret"
                    if "configMapRef" in ef:
                        assert ef["configMapRef"]["name"] in cms, f"{name}: unknown ConfigMap"
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        r = ref["secretKeyRef"]
                        assert r["key"] in secrets.get(r["name"], set()), f"{name}: {r} not in the Secret template"
                    if "configMapKeyRef" in ref:
                        r = ref["configMapKeyRef"]
                        assert r["key"] in cms.get(r["name"], set()), f"{name}: {r} not in the ConfigMap"


def test_secret_template_holds_only_placeholders(objects: list[tuple[Path, dict]]) -> None:
    secrets = _by_kind(objects, "Secret")
    assert {s["metadata"]["name"] for s in secrets} == {"xct-s3-admin", "xct-s3", "xct-postgres", "xct-mlflow-db",
                                                        "xct-mlflow-pipeline", "xct-mlflow-auth", "xct-mlflow-reader",
                                                        "xct-ray-auth"}
    secret_line = re.compile(r"^\s*(\w*(?:key|password|user)\w*)\s*=\s*(.*)$", re.I)
    for s in secrets:
        assert "data" not in s, "use stringData placeholders, never base64 data"
        for k, v in s["stringData"].items():
            if re.search(r"KEY|SECRET|PASSWORD|TOKEN|USER", k):
                assert str(v).startswith(PLACEHOLDER), f"Secret {s['metadata']['name']}.{k} is not a placeholder"
            for line in str(v).splitlines():  # file-shaped values (boto3/MLflow credentials, pg_service.conf)
                m = secret_line.match(line)
                if m:
                    assert m.group(2).startswith(PLACEHOLDER), f"Secret {s['metadata']['name']}.{k}: {m.group(1)}"
    # the object-store admin and the pipeline's user are different Secrets with different keys
    admin = _one(objects, "Secret", "xct-s3-admin")["stringData"]
    user = _one(objects, "Secret", "xct-s3")["stringData"]
    assert set(admin.values()).isdisjoint(user.values())
    for f, d in objects:
        if d["kind"] == "Secret":
            assert f.name == "secrets.template.yaml", f"a Secret outside the template: {f.name}"
    env_example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    for k, v in env_example.items():
        if re.search(r"KEY|SECRET|PASSWORD|TOKEN", k):
            assert v.startswith(PLACEHOLDER), f".env.example {k} is not a placeholder"
    aws_key = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    for f in list(INFRA.rglob("*")) + [DOCS, REPO / ".dockerignore"]:
        if f.is_file():
            assert not aws_key.search(f.read_text(errors="replace")), f"{f}: looks like a real AWS key"
    assert "/infra/compose/.env" in (REPO / ".gitignore").read_text().splitlines()


# --------------------------------------------------------------------------- Ray


def _ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {p.name for p in start.params}


def test_raycluster_gpu_groups_shm_and_autoscaling(objects: list[tuple[Path, dict]]) -> None:
    rc = _one(objects, "RayCluster", "xct-ray")["spec"]
    assert rc["rayVersion"] == LOCK["ray"], "rayVersion must be the Ray of requirements/lock.txt"
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["template"]["spec"]["containers"]
    groups = rc["workerGroupSpecs"]
    assert groups, "no worker groups"
    options = _ray_start_options()
    all_params = [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in groups]
    for params in all_params:
        for k, v in params.items():
            assert isinstance(v, str), f"rayStartParams.{k} must be a string"
            assert k.replace("-", "_") in options, f"rayStartParams.{k} is not a `ray start` option"
    products = set()
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        pod = g["template"]["spec"]
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in pod["containers"]]
        assert sum(gpus) >= 1, f"{g['groupName']}: no nvidia.com/gpu limit"
        product = pod["nodeSelector"]["nvidia.com/gpu.product"]
        products.add(product)
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        # the custom resource the autoscaler sees names the same accelerator as the node selector
        res = json.loads(shlex.split(g["rayStartParams"]["resources"])[0])
        acc = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        assert len(acc) == 1 and acc[0] in product, (g["groupName"], acc, product)
    assert any("A100" in p for p in products) and any("H100" in p for p in products)
    # /dev/shm: a memory-backed emptyDir in every Ray pod, larger than the object store
    for where, pod in _pod_specs({"kind": "RayCluster", "spec": rc}):
        vols = {v["name"]: v for v in pod["volumes"]}
        c = pod["containers"][0]
        shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, f"{where}: /dev/shm not mounted"
        ed = vols[shm[0]["name"]]["emptyDir"]
        assert ed["medium"] == "Memory", where
        assert _qty(ed["sizeLimit"]) <= _qty(c["resources"]["limits"]["memory"]), where
    for params, (where, pod) in zip(all_params, _pod_specs({"kind": "RayCluster", "spec": rc})):
        shm_vol = next(v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
        assert int(params["object-store-memory"]) < _qty(shm_vol["emptyDir"]["sizeLimit"]), where


def test_rayjob_runs_one_stage_on_the_raycluster_spec(objects: list[tuple[Path, dict]]) -> None:
    job = _one(objects, "RayJob", "xct-train-stage1")["spec"]
    assert job["entrypoint"].strip()
    assert "rayClusterSpec" in job or "clusterSelector" in job
    rc = _one(objects, "RayCluster", "xct-ray")["spec"]
    assert job["rayClusterSpec"] == rc, "rayjob-train.yaml rayClusterSpec drifted from raycluster.yaml"
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    assert "--stage 1" in job["entrypoint"]


def _xct_command(argv: list[str]) -> tuple[Any, list[str]]:
    """(click command, its remaining args) for ``xct <group> <cmd> ...`` via the real CLI."""
    import typer

    from pipelines.cli import app

    cmd: Any = typer.main.get_command(app)
    args = list(argv)
    # duck-typed: typer may ship its own click, so no isinstance(click.Group)
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        assert args[0] in cmd.commands, f"`xct ... {args[0]}`: no such command (have {sorted(cmd.commands)})"
        cmd = cmd.commands[args.pop(0)]
    return cmd, args


def _parse_xct(line: str) -> Any:
    argv = shlex.split(line)
    assert argv[0] == "xct", line
    cmd, args = _xct_command(argv[1:])
    assert not hasattr(cmd, "commands"), f"{line}: names a command group, not a command"
    return cmd.make_context(cmd.name, args)  # raises a usage error on unknown options / bad values


def _entrypoint_commands(entrypoint: str) -> list[str]:
    return [part.strip() for part in entrypoint.split("&&") if part.strip()]


def test_rayjob_entrypoint_parses_with_the_xct_cli_and_paths_exist(objects: list[tuple[Path, dict]]) -> None:
    job = _one(objects, "RayJob", "xct-train-stage1")["spec"]
    cmds = _entrypoint_commands(job["entrypoint"])
    assert [shlex.split(c)[1] for c in cmds] == ["data", "train"]
    pull = _parse_xct(cmds[0])
    train = _parse_xct(cmds[1])
    assert train.params["stage"] == 1
    # the pull destination is what training reads; both on the shared volume
    assert Path(pull.params["directory"]) == train.params["processed"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in head["volumes"]}
    for p in (train.params["processed"], train.params["out"]):
        shared = [mp for mp in mounts if str(p).startswith(mp + "/")]
        assert shared and "persistentVolumeClaim" in vols[mounts[shared[0]]], f"{p} not on the shared volume"
    # params: the image's copies of the repo files + the ConfigMap overlay mounted on the head
    assert train.params["params"] == Path("/app/params.yaml")
    overlays = train.params["overlay"]
    cm_mount = [mp for mp in mounts if "configMap" in vols[mounts[mp]]]
    assert cm_mount and any(str(o).startswith(cm_mount[0] + "/") for o in overlays)
    for o in overlays:
        if str(o).startswith("/app/"):
            assert (REPO / str(o)[len("/app/"):]).is_file(), f"{o} is not a repo file"
    bucket = urlparse(pull.params["url"]).netloc
    assert bucket in _bucket_job_buckets(objects)


def test_cluster_overlay_validates_and_fits_a_worker_group(objects: list[tuple[Path, dict]], tmp_path: Path) -> None:
    from components.ops_params import load_params

    cm = _one(objects, "ConfigMap", "xct-cluster-params")
    overlay = tmp_path / "cluster.yaml"
    overlay.write_text(cm["data"]["cluster.yaml"])
    p = load_params(REPO / "params.yaml", [REPO / "params.production.yaml", overlay])
    ray = p.train.ray
    assert ray.use_gpu and ray.accelerator_type
    rc = _one(objects, "RayCluster", "xct-ray")["spec"]
    fitting = []
    for g in rc["workerGroupSpecs"]:
        res = json.loads(shlex.split(g["rayStartParams"]["resources"])[0])
        if f"accelerator_type:{ray.accelerator_type}" in res:
            lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            fitting.append(g)
            assert g["maxReplicas"] * int(lim["nvidia.com/gpu"]) >= ray.num_workers, "not enough GPUs in the group"
            assert _qty(lim["cpu"]) >= ray.cpus_per_worker, "cpus_per_worker exceeds a worker pod"
    assert fitting, f"no worker group offers accelerator_type:{ray.accelerator_type}"


# --------------------------------------------------------------------------- images


def _kfp_default(var: str) -> str:
    """The default of ``os.environ.get(var, DEFAULT)`` in components/kfp_components.py (no import, no env)."""
    tree = ast.parse((REPO / "components" / "kfp_components.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get" and len(node.args) == 2
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == var):
            return node.args[1].value
    raise AssertionError(f"components/kfp_components.py reads no {var}")


def test_kfp_component_images_are_the_built_images(images: dict) -> None:
    refs = _built_refs(images)
    assert _kfp_default("XCT_IMAGE_LIGHT") == refs["light"]
    assert _kfp_default("XCT_IMAGE_TRAIN") == refs["train"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert {v["tag"] for v in images["built"].values()} == {version}, "image tags follow the project version"
    for v in images["built"].values():
        assert (REPO / v["dockerfile"]).is_file(), v["dockerfile"]


def test_every_image_is_pinned_and_listed(objects: list[tuple[Path, dict]], compose: dict, images: dict) -> None:
    known = set(_built_refs(images).values()) | set(images["third_party"].values())
    used = {img for _, d in objects for img in _find_images(d)}
    used |= {s["image"] for s in compose["services"].values()}
    assert used, "no images found"
    for ref in sorted(used):
        assert _pinned(ref), f"{ref}: pin a tag (no :latest, no untagged)"
        assert ref in known, f"{ref}: not in infra/images.yaml"
    for ref in known | set(images["bases"].values()):
        assert _pinned(ref), f"infra/images.yaml: {ref} is not pinned"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    by_name = {v["name"]: v["tag"] for v in images["built"].values()}
    by_name |= {ref.rsplit(":", 1)[0]: ref.rsplit(":", 1)[1] for ref in images["third_party"].values()
                if ref.rsplit(":", 1)[0] != "quay.io/minio/minio"}  # that one: the compose stack only
    for entry in kust["images"]:
        assert by_name.get(entry["name"]) == entry["newTag"], f"kustomization image {entry} ≠ images.yaml"
    # every image the kustomized manifests run has an entry (so `images.py pin` can pin it)
    kust_files = [K8S / r for r in kust["resources"]]
    names = {img.rsplit(":", 1)[0] for f in kust_files for d in yaml.safe_load_all(f.read_text()) if d
             for img in _find_images(d)}
    assert names == {e["name"] for e in kust["images"]}, (names, kust["images"])
    mlflow = compose["services"]["mlflow"]
    assert mlflow["image"] == _built_refs(images)["mlflow"]
    assert mlflow["build"]["dockerfile"] == images["built"]["mlflow"]["dockerfile"]
    assert (COMPOSE.parent / mlflow["build"]["context"]).resolve() == REPO


def test_images_script_builds_every_image_with_its_tag(images: dict) -> None:
    from components.image_tag import content_tag

    out = subprocess.run(
        [sys.executable, str(INFRA / "images.py"), "build", "--dry-run", "--registry", "reg.example/xct/", "--push"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    builds = {cmd[cmd.index("-t") + 1]: cmd[cmd.index("-f") + 1] for cmd in lines if cmd[1] == "build"}
    want = {f"reg.example/xct/{v['name']}:{v['tag']}": v["dockerfile"] for v in images["built"].values()}
    assert builds == want
    assert all(cmd[-1] == "." for cmd in lines if cmd[1] == "build"), "context must be the repo root"
    # each build is also tagged (and pushed) with its content tag (components/image_tag.py)
    content = {f"reg.example/xct/{v['name']}:{content_tag(k, images, REPO)}" for k, v in images["built"].items()}
    assert {cmd[cmd.index("-t", cmd.index("-t") + 1) + 1] for cmd in lines if cmd[1] == "build"} == content
    assert {cmd[2] for cmd in lines if cmd[1] == "push"} == set(want) | content


def test_local_image_build_plan(images: dict) -> None:
    """``build --local --dry-run``: the plan tests/test_images.py relies on, without podman.
    Every image from the repo root on the local Python base, xct-train on xct-light's
    ``deps`` stage with REQUIRE_CUDA=0, this machine's pip configuration mounted read-only
    (a local ``…/simple`` index mounted with the folder its pages link into)."""
    out = subprocess.run([sys.executable, str(INFRA / "images.py"), "build", "--local", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    cmds = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    builds = [c for c in cmds if c[:2] == ["podman", "build"]]

    def opt(cmd: list[str], name: str) -> list[str]:
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == name]

    by_tag = {opt(c, "-t")[0]: c for c in builds}
    for key, spec in images["built"].items():
        cmd = by_tag[f"localhost/{spec['name']}:{spec['tag']}"]
        assert opt(cmd, "-f") == [spec["dockerfile"]] and cmd[-1] == "."
        assert "--network" in cmd and opt(cmd, "--network") == ["host"]
        args = dict(a.split("=", 1) for a in opt(cmd, "--build-arg"))
        if key == "train":
            assert args["BASE_IMAGE"] == f"localhost/{images['built']['light']['name']}-deps:{spec['tag']}"
            assert args["REQUIRE_CUDA"] == "0"
        else:
            assert args["BASE_IMAGE"] == "localhost/xct-base-python:3.11-bookworm"
        vols = opt(cmd, "--volume")
        assert vols and all(v.endswith(":ro") for v in vols), vols
        assert any(v.split(":")[1] == "/etc/pip.conf" for v in vols)
        for v in vols:
            assert not v.split(":")[0].endswith("/simple"), f"{v}: mount the index's parent (its files)"
    deps = [c for c in builds if opt(c, "--target") == ["deps"]]
    assert len(deps) == 1 and opt(deps[0], "-f") == [images["built"]["light"]["dockerfile"]]
    order = [opt(c, "-t")[0] for c in builds]
    assert order.index(opt(deps[0], "-t")[0]) < order.index(f"localhost/{images['built']['train']['name']}:"
                                                             f"{images['built']['train']['tag']}")


# --------------------------------------------------------------------------- Dockerfiles


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _from_image(instrs: list[tuple[str, str]]) -> str:
    args = {}
    for instr, rest in instrs:
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        if instr == "FROM":
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("no FROM")


@pytest.mark.parametrize("key", ["light", "train", "mlflow"])
def test_dockerfile_base_user_workdir_and_no_secrets(key: str, images: dict) -> None:
    path = REPO / images["built"][key]["dockerfile"]
    instrs = _dockerfile(path)
    base = _from_image(instrs)
    assert base == images["bases"][key], f"{path.name}: FROM {base} ≠ images.yaml bases.{key}"
    assert _pinned(base)
    # one base: any later FROM names an earlier stage of the same file (multi-stage cache)
    froms = [rest.split() for i, rest in instrs if i == "FROM"]
    stages = [f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"]
    for later in froms[1:]:
        assert later[0] in stages, f"{path.name}: FROM {later[0]} is neither the base nor an earlier stage"
    users = [rest for i, rest in instrs if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: must end as a non-root USER"
    assert any(i == "WORKDIR" for i, _ in instrs)
    for i, rest in instrs:
        if i in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*\s*=", rest), f"{path.name}: secret in {i}"
    # every COPY source exists and survives .dockerignore
    for i, rest in instrs:
        if i == "COPY":
            srcs = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for s in srcs:
                if s != ".":
                    assert (REPO / s).exists(), f"{path.name}: COPY {s} missing"
                    assert not _dockerignored(s), f"{path.name}: COPY {s} is excluded by .dockerignore"


@pytest.mark.parametrize("key", ["light", "train"])
def test_project_images_install_like_the_makefile(key: str, images: dict) -> None:
    path = REPO / images["built"][key]["dockerfile"]
    instrs = _dockerfile(path)
    runs = " ".join(rest for i, rest in instrs if i == "RUN")
    copies = " ".join(rest for i, rest in instrs if i == "COPY")
    assert "requirements/base.txt" in copies and "requirements/lock.txt" in copies
    assert re.search(r"pip install -r requirements/base\.txt -c requirements/lock\.txt", runs)
    assert re.search(r"pip install --no-deps --no-build-isolation -e \.", runs)
    make = (REPO / "Makefile").read_text()
    assert "-c requirements/lock.txt" in make and "--no-deps --no-build-isolation -e ." in make
    assert "xct_core" in runs, "the build must import the installed project"
    if key == "light":
        assert "download.pytorch.org/whl/cpu" in path.read_text(), "CPU torch from PyTorch's CPU index"
        assert "^torch==" in runs, "torch version taken from requirements/base.txt"
    else:
        torch = re.search(r"pytorch/pytorch:([\d.]+)-cuda", _from_image(instrs))
        assert torch and torch.group(1) == BASE["torch"], "train base image torch ≠ requirements/base.txt"
        assert "torch.version.cuda" in runs, "the build must check the CUDA torch survived"
        assert "wget" in runs, "KubeRay probes exec wget"
    assert "/gcs /minio /s3" in runs, "KFP launcher artifact paths for a non-root user"


def test_mlflow_server_image_matches_client_versions() -> None:
    pins = _pins(DOCKER / "requirements-mlflow.txt")
    assert pins["mlflow"] == LOCK["mlflow"] and pins["boto3"] == LOCK["boto3"]
    assert "psycopg2-binary" in pins, "PostgreSQL backend store needs psycopg2"


BUILD = _pins(REPO / "requirements" / "build.txt")


def _image_pins(text: str) -> dict[str, tuple[str, str]]:
    """Versions a Dockerfile pins by itself: ``pkg==ver`` inside RUN lines and ``ARG
    <PKG>_VERSION=ver`` defaults (name normalised) → (version, where)."""
    out: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"^ARG\s+([A-Za-z0-9_]+)_VERSION=(\S+)", text, flags=re.M):
        out[m.group(1).lower().replace("_", "-")] = (m.group(2), m.group(0))
    for m in re.finditer(r"[\"' ]([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"']*)", text):
        out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(2), m.group(0).strip("\"' "))
    return out


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("Dockerfile.*")))
def test_image_pins_agree_with_the_lock(dockerfile: str) -> None:
    """An image may not pin a package to another version than requirements/lock.txt (a
    setuptools 75.8.0 pin beside torch 2.13.0, which needs >= 77.0.3, broke the images'
    `pip check`): build-time pins come from requirements/build.txt, installed with the lock."""
    text = (DOCKER / dockerfile).read_text()
    for name, (ver, where) in _image_pins(text).items():
        if name in LOCK:
            assert ver == LOCK[name], f"{dockerfile}: {where!r} contradicts requirements/lock.txt ({name}=={LOCK[name]})"
    if "--no-build-isolation" in text:
        assert "pip install -r requirements/build.txt -c requirements/lock.txt" in text, (
            f"{dockerfile}: builds the project without build isolation but does not install requirements/build.txt")


def test_build_pins_are_locked_and_satisfy_the_locked_distributions() -> None:
    """requirements/build.txt: every pin is the lock's, and satisfies what each locked
    distribution installed here requires of it (torch 2.13.0: setuptools>=77.0.3)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    assert BUILD, "requirements/build.txt pins nothing"
    for name, ver in BUILD.items():
        assert LOCK.get(name) == ver, f"requirements/build.txt {name}=={ver} ≠ lock.txt {LOCK.get(name)}"
    checked = 0
    for dist, locked in LOCK.items():
        try:
            d = metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            continue
        if d.version.split("+")[0] != locked.split("+")[0]:
            continue  # not the locked version here: its requirements say nothing about the lock
        for spec in d.requires or []:
            req = Requirement(spec)
            rname = re.sub(r"[-_.]+", "-", req.name).lower()
            if rname in BUILD and (req.marker is None or req.marker.evaluate({"extra": ""})):
                assert Version(BUILD[rname]) in req.specifier, (
                    f"requirements/build.txt {rname}=={BUILD[rname]} violates {dist} {locked}: {spec}")
                checked += 1
    assert checked >= 1, "no locked distribution states a requirement on a build pin (torch needs setuptools)"
    make = (REPO / "Makefile").read_text()
    assert "-r requirements/build.txt" in make and "requirements/build.txt" in make.split("REQS :=", 1)[1].splitlines()[0]


def test_mlflow_image_pins_are_locked() -> None:
    for name, ver in _pins(DOCKER / "requirements-mlflow.txt").items():
        assert LOCK.get(name) == ver, f"requirements-mlflow.txt {name}=={ver} ≠ lock.txt {LOCK.get(name)}"


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            out.append((neg, line.lstrip("!").strip("/")))
    return out


def _dockerignored(rel: str) -> bool:
    """Docker's rule: a path is excluded when it or a parent matches; the last match wins."""
    parts = Path(rel).parts
    excluded = False
    for neg, pat in _dockerignore_patterns():
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
            if re.fullmatch(rx, sub) or fnmatch.fnmatch(sub, pat):
                excluded = not neg
                break
    return excluded


def test_dockerignore_keeps_data_and_environments_out() -> None:
    for p in ("data/raw/ct.nii.gz", "outputs/train/x.pt", ".venv/bin/python", "mlruns/0/meta.yaml",
              "mlflow.db", ".git/HEAD", "infra/compose/.env", "components/__pycache__/x.pyc"):
        assert _dockerignored(p), f"{p} would enter the build context"
    for p in ("pyproject.toml", "requirements/base.txt", "requirements/build.txt", "requirements/lock.txt", "xct_core/config.py",
              "components/train.py", "pipelines/cli.py", "params.yaml", "params.production.yaml",
              "infra/docker/requirements-mlflow.txt", "infra/compose/.env.example"):
        assert not _dockerignored(p), f"{p} is needed in the build context"


# --------------------------------------------------------------------------- MLflow + S3 consistency


def _mlflow_server(argv: list[str]) -> Any:
    """Parse ``mlflow server`` arguments with MLflow's own CLI (validates every option)."""
    from mlflow.cli import server

    return server.make_context("server", list(argv))


def _compose_env() -> dict[str, str]:
    return dict(l.split("=", 1) for l in ENV_EXAMPLE.read_text().splitlines() if l and not l.startswith("#"))


def _interpolate(value: str, env: dict[str, str]) -> str:
    """docker compose interpolation (${VAR}, ${VAR:?msg}, ${VAR:-default}, $$)."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert op == ":-", f"compose variable {name} is not defined in .env.example"
        return arg
    value = re.sub(r"(?<!\$)\$\{(\w+)(?:(:[?-])([^}]*))?\}", sub, value)
    return value.replace("$$", "$")


def _bucket_job_buckets(objects: list[tuple[Path, dict]]) -> set[str]:
    job = _one(objects, "Job", "minio-setup")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    return set(re.search(r"for b in ([\w\- ]+); do", script).group(1).split())


def test_k8s_mlflow_server_postgres_s3_and_tracking_uri_agree(objects: list[tuple[Path, dict]]) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    dep = _one(objects, "Deployment", "mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow", "server"]
    ctx = _mlflow_server(c["args"])
    port = ctx.params["port"]
    assert {p["containerPort"] for p in c["ports"]} == {port}
    svc = _one(objects, "Service", "mlflow")
    assert svc["spec"]["ports"][0]["port"] == port
    env_cm = _one(objects, "ConfigMap", "xct-env")["data"]
    uri = urlparse(env_cm["MLFLOW_TRACKING_URI"])
    assert uri.hostname == f"mlflow.{NAMESPACE}.svc.cluster.local" and uri.port == port
    # the server's own host check accepts the in-cluster URI and a port-forward
    allowed = next(e["value"] for e in c["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    for host in (uri.netloc, f"localhost:{port}", f"mlflow:{port}", f"mlflow.{NAMESPACE}:{port}"):
        assert is_allowed_host_header(allowed, host), f"MLflow would reject Host: {host}"
    assert not is_allowed_host_header(allowed, "evil.example.com"), "allowed hosts must not be '*'"
    # backend store: the postgres Service; credentials from its Secret
    backend = urlparse(ctx.params["backend_store_uri"])
    pg = _one(objects, "Service", "postgres")
    # psycopg2 named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the image lacks
    assert backend.scheme == "postgresql+psycopg2"
    assert backend.hostname == f"postgres.{NAMESPACE}.svc.cluster.local" and backend.port == pg["spec"]["ports"][0]["port"]
    # no credential in the URI (so none on a command line): libpq takes user + password from the
    # service file of Secret xct-mlflow-db, mounted where PGSERVICEFILE points
    assert backend.username is None and backend.password is None and "$(" not in ctx.params["backend_store_uri"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    pod = dep["spec"]["template"]["spec"]
    service_file = _mounted_secret_file(pod, c, env["PGSERVICEFILE"])
    assert service_file == ("xct-mlflow-db", "pg_service.conf")
    template = _one(objects, "Secret", "xct-mlflow-db")["stringData"]["pg_service.conf"]
    assert f"[{env['PGSERVICE']}]" in template and "password=" in template
    # artifacts: proxied, destination bucket created by the minio-setup Job
    assert ctx.params["serve_artifacts"] is True
    dest = urlparse(ctx.params["artifacts_destination"])
    assert dest.scheme == "s3" and dest.netloc in _bucket_job_buckets(objects)
    env_names = {e["name"] for e in c["env"]}
    assert "MLFLOW_S3_ENDPOINT_URL" in env_names
    # the artifact store's keys: the pipeline user's boto3 credentials file, never the admin's
    assert _mounted_secret_file(pod, c, env["AWS_SHARED_CREDENTIALS_FILE"]) == ("xct-s3", "credentials")
    assert not c.get("envFrom")
    # authentication: the basic-auth app, its config a file of the Secret xct-mlflow-auth
    assert ctx.params["app_name"] == "basic-auth"
    assert _mounted_secret_file(pod, c, env["MLFLOW_AUTH_CONFIG_PATH"]) == ("xct-mlflow-auth", "basic_auth.ini")
    flask_key = next(e for e in c["env"] if e["name"] == "MLFLOW_FLASK_SERVER_SECRET_KEY")
    assert flask_key["valueFrom"]["secretKeyRef"] == {"name": "xct-mlflow-auth", "key": "MLFLOW_FLASK_SERVER_SECRET_KEY"}


def _mounted_secret_file(pod: dict, container: dict, path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file ``path`` inside ``container`` (a secret volume, whole or
    via items / subPath), or None when no secret volume provides it."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        sec = vols.get(m["name"], {}).get("secret")
        if sec is None:
            continue
        mp = m["mountPath"]
        if m.get("subPath") and path == mp:
            rel = m["subPath"]
        elif path.startswith(mp.rstrip("/") + "/"):
            rel = path[len(mp.rstrip("/")) + 1:]
        else:
            continue
        items = {i["path"]: i["key"] for i in sec.get("items", [])} or None
        return sec["secretName"], (items.get(rel) if items is not None else rel)
    return None


def test_mlflow_auth_template_and_users_job(objects: list[tuple[Path, dict]], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The template's basic_auth.ini is read by MLflow's own config reader: a placeholder admin
    password, no access by default, the auth store in the MLflow PostgreSQL. The users Job runs
    the ConfigMap's script with the auth file and both users' Secrets mounted."""
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.permissions import get_permission

    ini = _one(objects, "Secret", "xct-mlflow-auth")["stringData"]["basic_auth.ini"]
    (tmp_path / "basic_auth.ini").write_text(ini)
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "basic_auth.ini"))
    cfg = read_auth_config()
    assert str(cfg.admin_username).startswith(PLACEHOLDER) and str(cfg.admin_password).startswith(PLACEHOLDER)
    assert cfg.default_permission == "NO_PERMISSIONS" and not get_permission(cfg.default_permission).can_read
    db = urlparse(cfg.database_uri)
    assert db.scheme == "postgresql+psycopg2" and db.hostname == f"postgres.{NAMESPACE}.svc.cluster.local"
    assert db.username is None and db.password is None  # the login: the server's libpq service file
    assert cfg.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"

    job = _one(objects, "Job", "mlflow-users")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    script = _one(objects, "ConfigMap", "mlflow-users")["data"]["mlflow_users.py"]
    ast.parse(script)
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert c["command"] == ["python", f"{_mount_of(mounts, vols, 'configMap', 'mlflow-users')}/mlflow_users.py"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{_mount_of(mounts, vols, 'secret', 'xct-mlflow-auth')}/basic_auth.ini"
    users = env["XCT_MLFLOW_USERS_DIR"]["value"]
    for kind in ("pipeline", "reader"):
        assert _mount_of(mounts, vols, "secret", f"xct-mlflow-{kind}") == f"{users}/{kind}"
        keys = set(_one(objects, "Secret", f"xct-mlflow-{kind}")["stringData"])
        assert keys >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert f'"{kind}"' in script
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"] == {"name": "xct-env", "key": "MLFLOW_TRACKING_URI"}
    assert job["spec"]["activeDeadlineSeconds"] > 0 and pod.get("automountServiceAccountToken") is False


def _mount_of(mounts: dict[str, str], vols: dict[str, dict], kind: str, name: str) -> str:
    """The mount path of the volume of ``kind`` (secret / configMap) named ``name``."""
    key = "secretName" if kind == "secret" else "name"
    paths = [p for p, v in mounts.items() if vols[v].get(kind, {}).get(key) == name]
    assert len(paths) == 1, (kind, name, mounts)
    return paths[0]


def test_s3_endpoints_point_at_the_minio_service(objects: list[tuple[Path, dict]]) -> None:
    env_cm = _one(objects, "ConfigMap", "xct-env")["data"]
    minio = _one(objects, "Service", "minio")
    s3_port = next(p["port"] for p in minio["spec"]["ports"] if p["name"] == "s3")
    want = f"http://minio.{NAMESPACE}.svc.cluster.local:{s3_port}"
    for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "XCT_S3_ENDPOINT_URL"):
        assert env_cm[k] == want, k
    dep = _one(objects, "Deployment", "minio")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--address") + 1] == f":{s3_port}"
    secret = _one(objects, "Secret", "xct-s3")["stringData"]
    assert set(secret) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "credentials"}
    launcher = _one(objects, "ConfigMap", "kfp-launcher")["data"]
    providers = yaml.safe_load(launcher["providers"])
    d = providers["minio"]["default"]
    assert d["endpoint"] == urlparse(want).netloc
    ref = d["credentials"]["secretRef"]
    assert ref["secretName"] == "xct-s3" and {ref["accessKeyKey"], ref["secretKeyKey"]} == set(secret) - {"credentials"}
    root = urlparse(launcher["defaultPipelineRoot"])
    assert root.scheme == "minio" and root.netloc in _bucket_job_buckets(objects)


def test_compose_stack_is_consistent(compose: dict) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    env = _compose_env()
    svcs = compose["services"]
    assert set(svcs) == {"postgres", "minio", "createbuckets", "mlflow"}
    for s in svcs.values():
        for v in (s.get("environment") or {}).values():
            _interpolate(str(v), env)  # every variable is defined in .env.example
    ml = svcs["mlflow"]
    argv = [_interpolate(a, env) for a in ml["command"]]
    assert argv[:2] == ["mlflow", "server"]
    ctx = _mlflow_server(argv[2:])
    port = ctx.params["port"]
    assert f"127.0.0.1:{port}:{port}" in ml["ports"]
    backend = urlparse(ctx.params["backend_store_uri"])
    assert backend.scheme == "postgresql" and backend.hostname == "postgres" and backend.port == 5432
    assert backend.username == env["POSTGRES_USER"] and backend.password == env["POSTGRES_PASSWORD"]
    assert ctx.params["serve_artifacts"] is True
    bucket_script = _interpolate(svcs["createbuckets"]["command"][0], env)
    buckets = set(re.search(r"for b in ([\w\- ]+); do", bucket_script).group(1).split())
    assert urlparse(ctx.params["artifacts_destination"]).netloc in buckets
    s3 = urlparse(ml["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert s3.hostname == "minio" and f"127.0.0.1:{s3.port}:{s3.port}" in svcs["minio"]["ports"]
    assert svcs["createbuckets"]["environment"]["S3_ENDPOINT"] == ml["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    allowed = ml["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"mlflow:{port}"):
        assert is_allowed_host_header(allowed, host), f"MLflow would reject Host: {host}"
    minio_env = svcs["minio"]["environment"]
    assert "AWS_ACCESS_KEY_ID" in minio_env["MINIO_ROOT_USER"] and "AWS_SECRET_ACCESS_KEY" in minio_env["MINIO_ROOT_PASSWORD"]
    assert ml["env_file"] == ".env" and "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env
    dep = ml["depends_on"]
    assert dep["postgres"]["condition"] == "service_healthy"
    assert dep["createbuckets"]["condition"] == "service_completed_successfully"


# --------------------------------------------------------------------------- docs


def _doc_commands(prefix: str) -> list[str]:
    """Command lines starting with ``prefix`` inside ```bash blocks (continuations joined)."""
    text = DOCS.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(prefix):
                out.append(line)
    return out


def test_docs_xct_commands_parse_with_the_cli(objects: list[tuple[Path, dict]]) -> None:
    lines = _doc_commands("xct ")
    assert len(lines) >= 5, lines
    seen = set()
    for line in lines:
        _parse_xct(line)
        seen.add(" ".join(shlex.split(line)[1:3]))
    assert {"pipeline compile", "pipeline submit", "train --stage", "data push"} <= seen, seen
    submit = next(_parse_xct(l) for l in lines if l.startswith("xct pipeline submit"))
    env_cm = _one(objects, "ConfigMap", "xct-env")["data"]
    assert submit.params["mlflow_uri"] == env_cm["MLFLOW_TRACKING_URI"]
    assert urlparse(submit.params["data_uri"]).netloc in _bucket_job_buckets(objects)
    # the documented `xct train` line is the RayJob's
    job = _one(objects, "RayJob", "xct-train-stage1")["spec"]
    doc_train = next(l for l in lines if l.startswith("xct train"))
    assert shlex.split(doc_train) == shlex.split(_entrypoint_commands(job["entrypoint"])[1])


def test_docs_name_every_setting_and_pin_versions(objects: list[tuple[Path, dict]]) -> None:
    text = DOCS.read_text()
    for var, reader in ENV_READ_BY.items():
        assert var in (REPO / reader).read_text(), f"{reader} no longer reads {var}: update docs and this test"
        assert var in text, f"docs/cluster.md does not mention {var}"
    for var in ENV_LIBRARY:
        assert var in text, f"docs/cluster.md does not mention {var}"
    env_cm = _one(objects, "ConfigMap", "xct-env")["data"]
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        assert env_cm[k] in text, f"docs/cluster.md should show the in-cluster {k}"
    ray_svc = f"xct-ray-head-svc.{NAMESPACE}.svc.cluster.local"
    assert _one(objects, "RayCluster", "xct-ray") and ray_svc in text
    kfp = re.search(r"PIPELINE_VERSION=([\d.]+)", text)
    assert kfp and kfp.group(1) == LOCK["kfp-server-api"], "KFP backend pin ≠ kfp-server-api in lock.txt"
    assert re.search(r"kuberay-operator --version \d+\.\d+\.\d+", text), "pin the KubeRay operator version"
    assert "cluster-scoped-resources?ref=$PIPELINE_VERSION" in text
    for f in ("secrets.template.yaml", "rayjob-train.yaml", "kfp-launcher.yaml", "docker-compose.yaml", "images.yaml"):
        assert f in text, f"docs/cluster.md does not mention {f}"


# --------------------------------------------------------------------------- as a cluster would check them

#: the Kubernetes version the manifests are validated against (kubernetes-validate's bundled,
#: pinned OpenAPI schemas); raise it with the clusters the project supports
K8S_SCHEMA_VERSION = "1.32.0"
#: custom resources: no schema in kubernetes-validate (KubeRay's CRD schemas are not vendored here)
CUSTOM_KINDS = {"RayCluster", "RayJob"}


def _kustomize_build() -> list[dict] | None:
    """``kubectl kustomize infra/k8s`` (or ``kustomize build``) as objects; ``None`` when
    neither binary is installed."""
    import shutil

    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(K8S)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(K8S)]
    else:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr[-2000:]}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _schema_errors(doc: dict) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {where}: {e.message}"]
    except SchemaNotFoundError:
        return [f"{doc['kind']} {doc.get('apiVersion')}: no schema in Kubernetes {K8S_SCHEMA_VERSION}"]
    return []


def test_kustomize_render_validates_against_the_pinned_kubernetes_schema() -> None:
    """What `kubectl apply -k infra/k8s` would send, each core object validated strictly
    (unknown fields are errors) against the OpenAPI schema of Kubernetes K8S_SCHEMA_VERSION."""
    rendered = _kustomize_build()
    if rendered is None:
        pytest.skip("neither kubectl nor kustomize is installed: the raw manifests are validated by the next test")
    listed = {(d["kind"], d["metadata"]["name"]) for f, d in _objects()
              if d.get("kind") != "Kustomization" and f.name in yaml.safe_load((K8S / "kustomization.yaml").read_text())[
                  "resources"]}
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == listed, "kustomize renders other objects"
    assert all(d["metadata"].get("namespace", "xct") == NAMESPACE or d["kind"] == "Namespace" for d in rendered)
    errors = [e for d in rendered if d["kind"] not in CUSTOM_KINDS for e in _schema_errors(d)]
    assert not errors, "\n".join(errors)
    # kustomize's image rewrite reached every container, the KubeRay pods included
    images = [c["image"] for d in rendered for _, _, c in _containers(d)]
    assert images and all(":" in i and not i.endswith(":latest") for i in images), images


def test_every_manifest_and_template_validates_against_the_pinned_schema() -> None:
    """The templates too (Secret placeholders, the KFP launcher ConfigMap), without kustomize."""
    docs = [d for _, d in _objects() if d.get("kind") not in ("Kustomization", *CUSTOM_KINDS)]
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service",
                                         "PersistentVolumeClaim", "Job"}
    errors = [e for d in docs for e in _schema_errors(d)]
    assert not errors, "\n".join(errors)


def test_schema_validation_catches_a_broken_manifest() -> None:
    """The validator is strict: a misspelt field and a wrong type are both errors."""
    dep = copy.deepcopy(next(d for _, d in _objects() if d.get("kind") == "Deployment"))
    assert _schema_errors(dep) == []
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert _schema_errors(bad)
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "two"
    assert _schema_errors(bad)


def test_ray_custom_resources_have_the_fields_kuberay_requires() -> None:
    """KubeRay's CRD schemas are not vendored (see docs/testing.md): the Ray objects are checked for the
    fields the operator rejects without, and their pod templates as core PodTemplateSpecs."""
    for _, d in _objects():
        if d.get("kind") not in CUSTOM_KINDS:
            continue
        assert d["apiVersion"] == "ray.io/v1", d["apiVersion"]
        for where, pod in _pod_specs(d):
            tmpl = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{d['metadata']['name']}-{where}"},
                    "template": {"spec": pod}}
            assert _schema_errors(tmpl) == [], (d["kind"], where, _schema_errors(tmpl))
