"""Least privilege in infra/k8s (issue 23 item 3), walked over EVERY manifest and template.

* every pod: no service-account token unless a comment above it says why (the Ray head's
  autoscaler), non-root with seccomp RuntimeDefault; every container: CPU/memory requests and
  limits, a read-only root filesystem with an emptyDir at /tmp, no privilege escalation, ALL
  capabilities dropped, an image by digest or one the deploy-time pin step covers; no secret
  in an env var (every program here reads its secrets from files) and no ``$(…PASSWORD…)``
  expansion in a command line; every Job/RayJob has a deadline and a retry bound;
* the NetworkPolicies, evaluated like a CNI would, allow each flow the pipeline needs and
  refuse the ones it must not have (default deny);
* the object store's admin and the pipeline's bucket-scoped user are different Secrets and
  the pipeline's policy names only the xct buckets;
* ``infra/images.py check-pinned`` fails while an image lacks a digest and passes once
  ``infra/images.py pin`` wrote them.

Each checker is run on a broken copy too, so a test that cannot fail is caught here.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
NS = "xct"
#: env vars that may come from a Secret: the program reads them from the environment only
ENV_ONLY_SECRETS = {"MLFLOW_FLASK_SERVER_SECRET_KEY"}
#: `$(VAR)` — Kubernetes expands these into command/args from the container's env
K8S_EXPANSION = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL|PASSWD|PWD", re.I)
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") != "Kustomization"]
    return out


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _pods(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod template in an object, KubeRay's included."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        yield "template", spec["template"]["spec"]
    elif kind in ("RayCluster", "RayJob"):
        cluster = spec if kind == "RayCluster" else spec["rayClusterSpec"]
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for g in cluster.get("workerGroupSpecs", []):
            yield f"worker {g['groupName']}", g["template"]["spec"]
        if kind == "RayJob":
            yield "submitter", spec["submitterPodTemplate"]["spec"]


# --------------------------------------------------------------------------- the checker


def pod_problems(name: str, pod: dict, *, token_justified: bool, pinnable: set[str]) -> list[str]:
    """Every least-privilege rule one pod spec breaks (empty: none)."""
    bad = []
    token = pod.get("automountServiceAccountToken")
    if token is not False and not (token is True and token_justified):
        bad.append(f"{name}: automountServiceAccountToken must be false (or true with a comment saying why)")
    psc = pod.get("securityContext") or {}
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        bad.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        where = f"{name} container {c.get('name')}"
        sc = c.get("securityContext") or {}
        if {**psc, **sc}.get("runAsNonRoot") is not True:
            bad.append(f"{where}: runAsNonRoot")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: readOnlyRootFilesystem")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation: false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []) or (sc.get("capabilities") or {}).get("add"):
            bad.append(f"{where}: capabilities must drop ALL and add none")
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in vols.get(tmp[0]["name"], {}):
            bad.append(f"{where}: a read-only root needs an emptyDir at /tmp")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    bad.append(f"{where}: resources.{part}.{r}")
        image = c.get("image", "")
        if not DIGEST.search(image) and image.rsplit(":", 1)[0] not in pinnable:
            bad.append(f"{where}: image {image!r} neither by digest nor in kustomization.yaml images: (pin step)")
        for e in c.get("env", []):
            if "secretKeyRef" in (e.get("valueFrom") or {}) and e["name"] not in ENV_ONLY_SECRETS:
                bad.append(f"{where}: env {e['name']} from a Secret (mount it as a file)")
        for ef in c.get("envFrom", []):
            if "secretRef" in ef:
                bad.append(f"{where}: envFrom Secret {ef['secretRef'].get('name')} (mount it as files)")
        words = [str(w) for w in (c.get("command") or []) + (c.get("args") or [])]
        words += [str(e.get("value", "")) for e in c.get("env", [])]
        for w in words:
            for var in K8S_EXPANSION.findall(w):
                if SECRETISH.search(var):
                    bad.append(f"{where}: $({var}) expands a secret into a command line or env value")
    return bad


def _justified_tokens(path: Path) -> int:
    """How many ``automountServiceAccountToken: true`` lines of ``path`` have a comment line right above."""
    lines = path.read_text().splitlines()
    return sum(1 for i, line in enumerate(lines)
               if line.strip() == "automountServiceAccountToken: true" and i and lines[i - 1].strip().startswith("#"))


def _all_pods() -> list[tuple[Path, dict, str, dict]]:
    return [(f, d, where, pod) for f, d in _docs() for where, pod in _pods(d)]


def _pinnable() -> set[str]:
    return {e["name"] for e in _kustomization()["images"]}


def test_every_pod_and_container_of_every_manifest_is_locked_down() -> None:
    pods = _all_pods()
    assert len(pods) >= 10, [(f.name, w) for f, _, w, _ in pods]
    pinnable = _pinnable()
    problems = []
    for f, d, where, pod in pods:
        name = f"{f.name} {d['kind']}/{d['metadata']['name']} {where}"
        justified = where == "head" and _justified_tokens(f) >= 1  # the autoscaler sidecar scales through the API
        problems += pod_problems(name, pod, token_justified=justified, pinnable=pinnable)
    assert not problems, "\n".join(problems)
    # exactly the Ray heads keep a token, each with its reason above it
    with_token = [(f.name, w) for f, _, w, p in pods if p.get("automountServiceAccountToken") is True]
    assert sorted(with_token) == [("raycluster.yaml", "head"), ("rayjob-train.yaml", "head")], with_token
    assert _justified_tokens(K8S / "raycluster.yaml") == 1 and _justified_tokens(K8S / "rayjob-train.yaml") == 1


@pytest.mark.parametrize("breakage, expect", [
    (lambda p, c: c.pop("resources"), "resources.requests.cpu"),
    (lambda p, c: c["resources"]["limits"].pop("memory"), "resources.limits.memory"),
    (lambda p, c: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
    (lambda p, c: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda p, c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
    (lambda p, c: c["securityContext"].update(privileged=True), "privileged"),
    (lambda p, c: (p["securityContext"].pop("runAsNonRoot"), c["securityContext"].pop("runAsNonRoot", None)), "runAsNonRoot"),
    (lambda p, c: p.pop("automountServiceAccountToken"), "automountServiceAccountToken"),
    (lambda p, c: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda p, c: c.update(image="docker.io/library/postgres:17"), "neither by digest"),
    (lambda p, c: c.update(volumeMounts=[m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]), "emptyDir at /tmp"),
    (lambda p, c: c.setdefault("args", []).append("postgresql://u:$(POSTGRES_PASSWORD)@db/x"), "$(POSTGRES_PASSWORD)"),
    (lambda p, c: c.setdefault("env", []).append({"name": "DB_URL", "value": "x:$(DB_SECRET)"}), "$(DB_SECRET)"),
    (lambda p, c: c.setdefault("env", []).append(
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "xct-s3", "key": "K"}}}), "from a Secret"),
    (lambda p, c: c.setdefault("envFrom", []).append({"secretRef": {"name": "xct-s3"}}), "envFrom Secret"),
])
def test_the_checker_catches_each_breakage(breakage: Any, expect: str) -> None:
    """Each rule can fail: break one field of a compliant pod and the checker names it."""
    _, d, where, pod = next(x for x in _all_pods() if x[1]["metadata"]["name"] == "mlflow")
    pinnable = _pinnable()
    assert pod_problems("mlflow", pod, token_justified=False, pinnable=pinnable) == []
    broken = copy.deepcopy(pod)
    breakage(broken, broken["containers"][0])
    problems = pod_problems("mlflow", broken, token_justified=False, pinnable=pinnable)
    assert any(expect in p for p in problems), problems


def test_a_true_token_needs_a_justifying_comment(tmp_path: Path) -> None:
    text = (K8S / "raycluster.yaml").read_text()
    bare = tmp_path / "bare.yaml"
    bare.write_text(re.sub(r"(?m)^( *#[^\n]*\n)+(?=\s*automountServiceAccountToken: true)", "", text))
    assert _justified_tokens(K8S / "raycluster.yaml") == 1 and _justified_tokens(bare) == 0


def test_jobs_have_a_deadline_and_a_retry_bound() -> None:
    jobs = [(f.name, d) for f, d in _docs() if d["kind"] in ("Job", "RayJob")]
    assert {d["metadata"]["name"] for _, d in jobs} >= {"minio-setup", "xct-train-stage1"}
    for f, d in jobs:
        spec = d["spec"]
        assert int(spec.get("activeDeadlineSeconds", 0)) > 0, f"{f} {d['metadata']['name']}: activeDeadlineSeconds"
        assert 0 <= int(spec.get("backoffLimit", -1)) <= 6, f"{f} {d['metadata']['name']}: backoffLimit"


def test_secret_volumes_name_existing_secrets_and_keys() -> None:
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for _, d in _docs() if d["kind"] == "Secret"}
    n = 0
    for f, d, where, pod in _all_pods():
        for v in pod.get("volumes", []):
            if "secret" in v:
                s = v["secret"]
                assert s["secretName"] in secrets, f"{f.name} {where}: unknown Secret {s['secretName']}"
                for item in s.get("items", []):
                    assert item["key"] in secrets[s["secretName"]], f"{f.name} {where}: {s['secretName']} has no {item['key']}"
                assert s.get("defaultMode", 0o644) & 0o007 == 0, f"{f.name} {where}: secret files readable by others"
                n += 1
    assert n >= 8, n
    # who sees the object-store admin: the store and its setup Job, nobody else
    admins = sorted({d["metadata"]["name"] for f, d, _, pod in _all_pods()
                     for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == "xct-s3-admin"})
    assert admins == ["minio", "minio-setup"], admins


def test_env_file_settings_point_into_the_mounted_secret_files() -> None:
    """``*_FILE`` / PGSERVICEFILE / AWS_SHARED_CREDENTIALS_FILE name a file a secret volume provides."""
    checked = 0
    for f, d, where, pod in _all_pods():
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for e in c.get("env", []):
                if not (e["name"].endswith("_FILE") or e["name"] in ("PGSERVICEFILE", "AWS_SHARED_CREDENTIALS_FILE")):
                    continue
                path = e["value"]
                mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
                assert mounts, f"{f.name} {where}: {e['name']}={path} is on no mount"
                sec = vols[mounts[0]["name"]]["secret"]
                key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
                items = {i["path"]: i["key"] for i in sec.get("items", [])}
                assert key in items or (not items and key), f"{f.name} {where}: {path} not provided by {sec}"
                checked += 1
    assert checked >= 8, checked


# --------------------------------------------------------------------------- object-store credentials


def test_pipeline_policy_is_bucket_scoped() -> None:
    docs = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in _docs())
    policy = json.loads(docs[("ConfigMap", "xct-s3-policy")]["data"]["xct-pipeline.json"])
    script = docs[("Job", "minio-setup")]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    buckets = set(re.search(r"for b in ([\w\- ]+); do", script).group(1).split())
    assert buckets == {"mlflow-artifacts", "xct-data", "xct-dvc", "xct-kfp"}
    resources, actions = set(), set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        resources |= set(st["Resource"])
        actions |= set(st["Action"])
    assert resources == {f"arn:aws:s3:::{b}" for b in buckets} | {f"arn:aws:s3:::{b}/*" for b in buckets}
    assert not any("*" in a or a.startswith(("admin:", "s3:Create", "s3:Delete", "s3:PutBucket", "s3:PutLifecycle"))
                   for a in actions - {"s3:DeleteObject"}), sorted(actions)
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    # the Job creates the policy from that file and attaches it to the xct-s3 user's key
    assert "mc admin policy create xct xct-pipeline /etc/xct-s3-policy/xct-pipeline.json" in script
    assert re.search(r"mc admin user add xct \"\$\(cat \"\$user/AWS_ACCESS_KEY_ID\"\)\"", script)
    assert "MINIO_ROOT_PASSWORD" in script and "mc alias set" not in script  # admin pair via MC_HOST_, not argv


# --------------------------------------------------------------------------- network policy


def _ns_labels(ns: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": ns}


def _matches(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for ex in selector.get("matchExpressions") or []:
        val = labels.get(ex["key"])
        op = ex["operator"]
        if (op == "In" and val not in ex["values"]) or (op == "NotIn" and val in ex["values"]) \
                or (op == "Exists" and val is None) or (op == "DoesNotExist" and val is not None):
            return False
    return True


def _peer_ok(peer: dict, ns: str, labels: dict[str, str], policy_ns: str) -> bool:
    """A NetworkPolicyPeer: podSelector alone = the policy's namespace; namespaceSelector
    (with an optional podSelector) = pods of the selected namespaces."""
    if "ipBlock" in peer:
        return False  # no pod IPs in this model
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], _ns_labels(ns)):
            return False
        return "podSelector" not in peer or _matches(peer["podSelector"], labels)
    return ns == policy_ns and _matches(peer.get("podSelector"), labels)


def _rule_ok(rule: dict, peers_key: str, ns: str, labels: dict[str, str], port: int, policy_ns: str) -> bool:
    peers = rule.get(peers_key)
    if peers is not None and not any(_peer_ok(p, ns, labels, policy_ns) for p in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports)


def allowed(policies: list[dict], src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    """TCP ``src`` → ``dst``:``port`` under ``policies`` (all in namespace xct), the way the
    NetworkPolicy API defines it: a direction is open when no policy selects the pod for it,
    else when some selecting policy has a rule that admits the peer and port."""
    def direction(pod: tuple[str, dict], kind: str, peer: tuple[str, dict], key: str) -> bool:
        ns, labels = pod
        if ns != NS:
            return True  # other namespaces: not ours to police
        selecting = [p for p in policies if kind in p["spec"].get("policyTypes", ["Ingress"])
                     and _matches(p["spec"]["podSelector"], labels)]  # {} selects every pod
        if not selecting:
            return True
        rules = [r for p in selecting for r in p["spec"].get(kind.lower(), [])]
        return any(_rule_ok(r, key, peer[0], peer[1], port, NS) for r in rules)

    return direction(src, "Egress", dst, "to") and direction(dst, "Ingress", src, "from")


def _policies() -> list[dict]:
    return [d for _, d in _docs() if d["kind"] == "NetworkPolicy"]


RAY_HEAD = (NS, {"app.kubernetes.io/name": "xct-ray", "app.kubernetes.io/component": "ray-head"})
RAY_WORKER = (NS, {"app.kubernetes.io/name": "xct-ray", "app.kubernetes.io/component": "ray-worker-a100"})
MLFLOW = (NS, {"app.kubernetes.io/name": "mlflow"})
POSTGRES = (NS, {"app.kubernetes.io/name": "postgres"})
MINIO = (NS, {"app.kubernetes.io/name": "minio"})
SETUP = (NS, {"app.kubernetes.io/name": "minio-setup"})
USERS = (NS, {"app.kubernetes.io/name": "mlflow-users"})  # the MLflow users Job (basic-auth)
SUBMITTER = (NS, {"app.kubernetes.io/name": "xct-ray-submitter"})
KFP_TASK = ("kubeflow", {"pipelines.kubeflow.org/v2_component": "true"})
KUBERAY = ("ray-system", {"app.kubernetes.io/name": "kuberay-operator"})
DNS = ("kube-system", {"k8s-app": "kube-dns"})
STRANGER = ("default", {"app": "anything"})
ROGUE = (NS, {"app.kubernetes.io/name": "something-else"})  # a new pod in xct without an allow

NEEDED = [  # (source, destination, port): every flow the pipeline needs
    (KFP_TASK, MLFLOW, 5000), (KFP_TASK, MINIO, 9000), (KFP_TASK, RAY_HEAD, 8265),
    (RAY_HEAD, MLFLOW, 5000), (RAY_WORKER, MLFLOW, 5000), (RAY_HEAD, MINIO, 9000), (RAY_WORKER, MINIO, 9000),
    (RAY_WORKER, RAY_HEAD, 6379), (RAY_HEAD, RAY_WORKER, 12345), (RAY_WORKER, RAY_WORKER, 23456),
    (MLFLOW, POSTGRES, 5432), (MLFLOW, MINIO, 9000), (SETUP, MINIO, 9000), (SUBMITTER, RAY_HEAD, 8265),
    (KUBERAY, RAY_HEAD, 8265), (USERS, MLFLOW, 5000), (USERS, DNS, 53),
    (MLFLOW, DNS, 53), (RAY_WORKER, DNS, 53), (SETUP, DNS, 53), (POSTGRES, DNS, 53), (ROGUE, DNS, 53),
]
REFUSED = [  # flows nobody needs: each would widen what a compromised pod can reach
    (STRANGER, MLFLOW, 5000), (STRANGER, MINIO, 9000), (STRANGER, RAY_HEAD, 8265), (STRANGER, RAY_HEAD, 10001), (KFP_TASK, RAY_HEAD, 10001),
    (STRANGER, POSTGRES, 5432), (KFP_TASK, POSTGRES, 5432), (RAY_HEAD, POSTGRES, 5432), (RAY_WORKER, POSTGRES, 5432),
    (MINIO, POSTGRES, 5432), (KFP_TASK, MINIO, 9001), (MLFLOW, RAY_HEAD, 8265), (SUBMITTER, MINIO, 9000),
    (SUBMITTER, RAY_WORKER, 8265), (SETUP, MLFLOW, 5000), (ROGUE, MLFLOW, 5000), (ROGUE, MINIO, 9000),
    (ROGUE, RAY_HEAD, 8265), (MLFLOW, STRANGER, 443), (MINIO, STRANGER, 443), (POSTGRES, STRANGER, 443),
    (RAY_WORKER, STRANGER, 443), (KUBERAY, RAY_HEAD, 10001), (KUBERAY, MINIO, 9000),
    (USERS, POSTGRES, 5432), (USERS, MINIO, 9000), (USERS, RAY_HEAD, 8265), (USERS, STRANGER, 443),
]


@pytest.mark.parametrize("src, dst, port", NEEDED)
def test_network_policy_allows_each_needed_flow(src: tuple, dst: tuple, port: int) -> None:
    assert allowed(_policies(), src, dst, port)


@pytest.mark.parametrize("src, dst, port", REFUSED)
def test_network_policy_refuses_what_no_flow_needs(src: tuple, dst: tuple, port: int) -> None:
    assert not allowed(_policies(), src, dst, port)


def test_network_policy_is_default_deny_and_each_allow_says_its_flow() -> None:
    pols = _policies()
    deny = [p for p in pols if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    # without the allows, every needed flow is refused (the evaluator is not vacuous)
    assert not any(allowed(deny, s, d, p) for s, d, p in NEEDED if s[0] == NS or d[0] == NS)
    # every rule carries a comment naming its flow (an arrow) in the file
    text = (K8S / "networkpolicy.yaml").read_text()
    rules = sum(len(p["spec"].get("ingress", [])) + len(p["spec"].get("egress", [])) for p in pols)
    commented = len(re.findall(r"(?m)^\s*- (?:from|to|ports):\s+#.*(?:→|↔)", text))
    assert rules >= 12 and commented == rules, (rules, commented)
    assert "networkpolicy.yaml" in _kustomization()["resources"]


# --------------------------------------------------------------------------- digests


@pytest.mark.skipif(not (shutil.which("kubectl") or shutil.which("kustomize")), reason="needs kubectl or kustomize")
def test_check_pinned_fails_until_every_image_is_pinned_by_digest(tmp_path: Path) -> None:
    images = [sys.executable, str(REPO / "infra" / "images.py")]
    out = subprocess.run([*images, "check-pinned"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1 and "not pinned by digest" in out.stderr, out
    for name in ("xct-train:0.1.0", "xct-minio:RELEASE.2025-10-15T17-29-55Z", "postgres:16.6-bookworm"):
        assert name in out.stderr
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    digest = "sha256:" + "0123456789abcdef" * 4
    pins = [f"{e['name']}=registry.example.com/{e['name'].rsplit('/', 1)[-1]}@{digest}" for e in _kustomization()["images"]]
    # all but one: still refused, naming the one left
    p = subprocess.run([*images, "pin", "--kustomization", str(work / "kustomization.yaml"), *pins[1:]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = subprocess.run([*images, "check-pinned", "--kustomize-dir", str(work)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and _kustomization()["images"][0]["name"] in out.stderr, out
    p = subprocess.run([*images, "pin", "--kustomization", str(work / "kustomization.yaml"), pins[0]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = subprocess.run([*images, "check-pinned", "--kustomize-dir", str(work)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = subprocess.run(["kubectl", "kustomize", str(work)] if shutil.which("kubectl")
                              else ["kustomize", "build", str(work)], capture_output=True, text=True, timeout=120).stdout
    assert f"registry.example.com/xct-minio@{digest}" in rendered
    # a malformed digest is refused with one line, the file untouched
    before = (work / "kustomization.yaml").read_text()
    bad = subprocess.run([*images, "pin", "--kustomization", str(work / "kustomization.yaml"), "postgres=pg@sha256:abc"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "NAME=REF@sha256" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert (work / "kustomization.yaml").read_text() == before


# --------------------------------------------------------------------------- docs


def test_security_doc_creates_every_secret_with_the_keys_the_manifests_read() -> None:
    """docs/security.md's `kubectl create secret` lines make each Secret of the template with
    exactly its keys (a key the pods mount but the doc forgets would fail the pod at start)."""
    text = (REPO / "docs" / "security.md").read_text()
    assert "## Kubernetes" in text
    block = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    made = {}
    for line in block.splitlines():
        m = re.search(r"kubectl -n xct create secret generic ([\w-]+)(.*)", line)
        if m:
            made[m.group(1)] = set(re.findall(r"--from-(?:literal|file)=([\w.]+)=", m.group(2)))
    want = {d["metadata"]["name"]: set(d["stringData"]) for _, d in _docs() if d["kind"] == "Secret"}
    assert made == want, (made, want)
    for name in ("xct-s3", "xct-mlflow-pipeline"):  # the KFP namespace gets the pipeline's two, not the admin
        assert re.search(rf"for s in [^;]*\b{name}\b[^;]*; do", block)
    assert not re.search(r"for s in [^;]*xct-s3-admin", block)
