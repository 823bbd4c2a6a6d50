"""Build (and optionally push) the xct container images named in infra/images.yaml.

    python infra/images.py list                               name:tag  dockerfile
    python infra/images.py build [--registry R/] [--push] [--only light,train] [--dry-run]
    python infra/images.py build --local [--only ...] [--dry-run]     (podman, no registry)

Each image is tagged twice: ``name:<tag>`` (the release tag of infra/images.yaml, what
infra/k8s and compose name) and ``name:<tag>-<digest>`` (its content tag: a SHA-256 over the
files its ``content:`` lists, components/image_tag.py; what the compiled KFP pipeline names,
so a code change changes every task's cache key). ``--push`` pushes both.

Every image is built from the repository root as its context (``.dockerignore`` keeps
data/, outputs/, .venv/, mlruns/ out). ``--registry`` prefixes the tag, e.g.
``--registry registry.example.com/xct/`` → ``registry.example.com/xct/xct-train:0.1.0``;
then point the cluster at it (kustomize ``images:`` in infra/k8s/kustomization.yaml and
``XCT_IMAGE_LIGHT`` / ``XCT_IMAGE_TRAIN`` when compiling the KFP pipeline).
``--dry-run`` prints the docker commands without running them. Needs PyYAML only.

Digests (a production deploy; tags are mutable, digests are not)::

    python infra/images.py pin NAME=REF@sha256:<64 hex> [...]   write newName + digest into
                                                          infra/k8s/kustomization.yaml ``images:``
    python infra/images.py check-pinned [--kustomize-dir D]  exit 1 listing every image of the
                                                          rendered manifests without a digest

``NAME`` is the image name the manifests use (``xct-train``, ``xct-mlflow``, ``postgres``,
``xct-minio``, ``quay.io/minio/mc``); ``REF@sha256:…`` what you pushed or mirrored (``crane
digest REF`` or ``docker buildx imagetools inspect REF`` prints the digest). Nothing in this
repository can know those digests: they are a deploy-time step (docs/security.md).

``--local`` builds every image on a machine that reaches the package registries but no
container registry (this project's CI): podman as root with ``infra/podman/containers.conf``;
a Debian bookworm base made with ``debootstrap`` and ``podman import``, with a Python 3.11
venv on top (``infra/podman/Containerfile.python``) standing in for python:3.11-slim; this
machine's pip configuration (indexes, find-links, constraints, CA file) mounted read-only
into the RUN steps only, and torch from a one-file local index over the CPU wheel on disk.
xct-train is built on xct-light's ``deps`` stage (same torch, CPU) with ``REQUIRE_CUDA=0``:
every step of its Dockerfile runs, but its CUDA base is not what is tested. Images are
tagged ``localhost/<name>:<tag>``; timings and sizes go to ``outputs/images/build.json``,
podman's full output to ``outputs/images/<key>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repo's components/ (the content tag)
    sys.path.insert(0, str(REPO))
from components.image_tag import content_tag  # noqa: E402

IMAGES_FILE = REPO / "infra" / "images.yaml"
PODMAN_DIR = REPO / "infra" / "podman"
CONTAINERS_CONF = PODMAN_DIR / "containers.conf"
LOCAL_OUT = REPO / "outputs" / "images"
LOCAL_REGISTRY = "localhost/"
DEBIAN_BASE = "localhost/xct-base-debian:bookworm"
PYTHON_BASE = "localhost/xct-base-python:3.11-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# bookworm's python3 is 3.11 (the version every image is built for); python3-venv brings pip.
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,ca-certificates"
#: where the one-file torch index is mounted in the RUN steps (fixed, so the deps layer caches)
TORCH_INDEX_MOUNT = "/opt/xct-torch-index"
#: the lines of podman/debootstrap output shown as progress (the rest goes to the log only)
PROGRESS = re.compile(r"^(\[\d+/\d+\] )?(STEP \d|COMMIT |Successfully tagged|I: Base system)")


def load_images(path: Path = IMAGES_FILE) -> dict:
    """The parsed infra/images.yaml (``built``, ``third_party``, ``bases``)."""
    return yaml.safe_load(path.read_text())


def image_ref(key: str, registry: str = "", images: dict | None = None) -> str:
    """``[registry]name:tag`` of a built image (``key``: light | train | mlflow)."""
    spec = (images or load_images())["built"][key]
    return f"{registry}{spec['name']}:{spec['tag']}"


def content_image_ref(key: str, registry: str = "", images: dict | None = None) -> str:
    """``[registry]name:<tag>-<content digest>``: the same build under its content tag (what the
    compiled KFP pipeline names; components/image_tag.py)."""
    images = images or load_images()
    return f"{registry}{images['built'][key]['name']}:{content_tag(key, images, REPO)}"


def git_commit() -> str:
    """HEAD of the checkout (image label + XCT_GIT_COMMIT), or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def build_commands(registry: str = "", push: bool = False, only: list[str] | None = None,
                   commit: str | None = None) -> list[list[str]]:
    """The ``docker build`` (and ``docker push``) argument lists, in order."""
    images = load_images()
    keys = only or list(images["built"])
    unknown = sorted(set(keys) - set(images["built"]))
    if unknown:
        raise SystemExit(f"images.py: unknown image(s) {', '.join(unknown)}; known: {', '.join(images['built'])}")
    commit = commit or git_commit()
    cmds: list[list[str]] = []
    for key in keys:
        ref = image_ref(key, registry, images)
        cref = content_image_ref(key, registry, images)
        cmds.append(["docker", "build", "-f", images["built"][key]["dockerfile"], "-t", ref, "-t", cref,
                     "--build-arg", f"GIT_COMMIT={commit}", "."])
        if push:
            cmds += [["docker", "push", ref], ["docker", "push", cref]]
    return cmds


# --------------------------------------------------------------------------- --local (podman)


def podman_env() -> dict[str, str]:
    """The environment for every podman call of the project (build, tests, the API service)."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman_image_exists(ref: str) -> bool:
    """True when podman's local store holds ``ref``."""
    if shutil.which("podman") is None:
        return False
    return subprocess.run(["podman", "image", "exists", ref], env=podman_env()).returncode == 0


def local_ref(key: str, images: dict | None = None) -> str:
    """``localhost/<name>:<tag>``: where ``build --local`` puts built image ``key``."""
    return image_ref(key, LOCAL_REGISTRY, images)


def deps_ref(images: dict | None = None) -> str:
    """The ``deps`` stage of Dockerfile.light, tagged: the CPU stand-in base of xct-train."""
    spec = (images or load_images())["built"]["light"]
    return f"{LOCAL_REGISTRY}{spec['name']}-deps:{spec['tag']}"


def pip_config() -> dict[str, str]:
    """This machine's effective pip settings (``pip config list``: files, then PIP_* env)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^([^.=]*)\.([\w-]+)='(.*)'$", line.strip())
        if not m:
            continue
        scope, key, value = m.groups()
        if key in ("disable-pip-version-check", "no-cache-dir"):
            continue
        (env if scope == ":env:" else files)[key] = value
    return {**files, **env}


def _local_path(token: str) -> Path:
    """``file:///x`` or ``/x`` → ``Path('/x')`` (anything else comes back relative)."""
    return Path(token.removeprefix("file://"))


def pip_config_paths(cfg: dict[str, str]) -> list[Path]:
    """Every existing local file or folder a pip setting names (``/x`` or ``file:///x``); for
    a local index ``…/simple`` its parent, where the files its pages link to lie."""
    paths: list[Path] = []
    for value in cfg.values():
        for token in value.split():
            p = _local_path(token)
            if p.name == "simple":  # a local PEP 503 index: its pages link into sibling folders
                p = p.parent
            if p.is_absolute() and p.exists() and p not in paths:
                paths.append(p)
    return paths


def find_cpu_torch_wheel(cfg: dict[str, str], version: str) -> Path | None:
    """The CPU torch wheel of ``version`` for CPython 3.11 in a find-links folder, if any."""
    for token in cfg.get("find-links", "").split():
        folder = _local_path(token)
        hits = sorted(folder.glob(f"torch-{version}+cpu-cp311-cp311-*.whl")) if folder.is_dir() else []
        if hits:
            return hits[0]
    return None


def torch_version() -> str:
    """The torch version requirements/base.txt pins."""
    for line in (REPO / "requirements" / "base.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit("images.py: requirements/base.txt pins no torch==")


class LocalBuild:
    """State of one ``build --local``: the mounts and build arguments every build shares."""

    def __init__(self, workdir: Path, dry_run: bool = False, log=print):
        self.workdir = workdir
        self.dry_run = dry_run
        self.log = log
        cfg = pip_config()
        conf = workdir / "pip.conf"
        conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(cfg.items())))
        self.volumes = [f"{conf}:/etc/pip.conf:ro"] + [f"{p}:{p}:ro" for p in pip_config_paths(cfg)]
        self.build_args: dict[str, str] = {}
        wheel = find_cpu_torch_wheel(cfg, torch_version())
        if wheel is not None:  # a one-file PEP 503 index: pip can take nothing else for torch
            index = workdir / "torch-index"
            (index / "torch").mkdir(parents=True)
            (index / "torch" / "index.html").write_text(
                f'<!DOCTYPE html><html><body><a href="file://{wheel}">{wheel.name}</a></body></html>\n')
            # a fixed path inside the build: the argument is part of the layer cache key
            self.volumes.append(f"{index}:{TORCH_INDEX_MOUNT}:ro")
            if f"{wheel.parent}:{wheel.parent}:ro" not in self.volumes:
                self.volumes.append(f"{wheel.parent}:{wheel.parent}:ro")
            self.build_args["TORCH_INDEX_URL"] = f"file://{TORCH_INDEX_MOUNT}"
        self.timings: dict[str, dict] = {}

    def run(self, cmd: list[str], key: str) -> None:
        """Run one podman/debootstrap command; progress = its STEP lines, the rest to a log."""
        self.log("+ " + shlex.join(cmd))
        if self.dry_run:
            return
        LOCAL_OUT.mkdir(parents=True, exist_ok=True)
        log_path = LOCAL_OUT / f"{key}.log"
        t0 = time.monotonic()
        with open(log_path, "ab") as logf:
            logf.write(("+ " + shlex.join(cmd) + "\n").encode())
            proc = subprocess.Popen(cmd, cwd=REPO, env=podman_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            for raw in proc.stdout:
                logf.write(raw)
                line = raw.decode(errors="replace").rstrip()
                if PROGRESS.match(line):
                    self.log(f"  [{key} {time.monotonic() - t0:5.0f}s] {line[:150]}")
            rc = proc.wait()
        if rc != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise SystemExit(f"images.py: {cmd[0]} {cmd[1]} for {key} failed (exit {rc}); last lines of "
                             f"{log_path}:\n" + "\n".join(tail))
        rec = self.timings.setdefault(key, {"seconds": 0.0})
        rec["seconds"] = round(rec["seconds"] + time.monotonic() - t0, 1)

    def build(self, key: str, dockerfile: str, tag: str, context: str = ".", target: str | None = None,
              args: dict[str, str] | None = None, also: tuple[str, ...] = ()) -> None:
        cmd = ["podman", "build", "--network", "host", "-f", dockerfile, "-t", tag]
        for extra in also:  # more tags of the same build (the content tag)
            cmd += ["-t", extra]
        if target:
            cmd += ["--target", target]
        for v in self.volumes:
            cmd += ["--volume", v]
        for k, v in {**self.build_args, **(args or {})}.items():
            cmd += ["--build-arg", f"{k}={v}"]
        self.run(cmd + [context], key)
        if not self.dry_run:
            self.timings[key]["image"] = tag
            size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", tag], env=podman_env(),
                                  capture_output=True, text=True)
            if size.returncode == 0 and size.stdout.strip().isdigit():
                self.timings[key]["size_mb"] = round(int(size.stdout.strip()) / 1e6)

    def bases(self, mirror: str) -> None:
        """The debootstrap Debian image and the Python 3.11 image on it (each built once)."""
        if self.dry_run or not podman_image_exists(DEBIAN_BASE):
            if os.geteuid() != 0 and not self.dry_run:
                raise SystemExit("images.py: --local makes its base with debootstrap, which needs root")
            if shutil.which("debootstrap") is None and not self.dry_run:
                raise SystemExit("images.py: debootstrap not found (Debian: apt-get install debootstrap podman runc)")
            rootfs = self.workdir / "rootfs"
            self.run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}", "bookworm",
                      str(rootfs), mirror], "base")
            tar = self.workdir / "rootfs.tar"
            self.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], "base")
            self.run(["podman", "import", "--change", 'CMD ["/bin/bash"]', str(tar), DEBIAN_BASE], "base")
            if not self.dry_run:
                shutil.rmtree(rootfs, ignore_errors=True)
                tar.unlink(missing_ok=True)
        self.build("base", str(PODMAN_DIR / "Containerfile.python"), PYTHON_BASE, context=str(PODMAN_DIR),
                   args={"DEBIAN_BASE": DEBIAN_BASE})


def build_local(only: list[str] | None = None, dry_run: bool = False, mirror: str = DEBIAN_MIRROR,
                log=print) -> dict:
    """``build --local``: every image (or ``only``) into podman's store; returns the timings."""
    images = load_images()
    keys = only or list(images["built"])
    unknown = sorted(set(keys) - set(images["built"]))
    if unknown:
        raise SystemExit(f"images.py: unknown image(s) {', '.join(unknown)}; known: {', '.join(images['built'])}")
    if shutil.which("podman") is None and not dry_run:
        raise SystemExit("images.py: podman not found (Debian: apt-get install podman runc debootstrap)")
    commit = git_commit()
    t0 = time.monotonic()
    if not dry_run:
        for old_log in LOCAL_OUT.glob("*.log"):
            old_log.unlink()
    with tempfile.TemporaryDirectory(prefix="xct-images-") as tmp:
        b = LocalBuild(Path(tmp), dry_run=dry_run, log=log)
        b.bases(mirror)
        light = images["built"]["light"]["dockerfile"]
        py = {"BASE_IMAGE": PYTHON_BASE}
        if "light" in keys or "train" in keys:
            b.build("light-deps", light, deps_ref(images), target="deps", args=py)
        for key in keys:
            spec = images["built"][key]
            args = {"GIT_COMMIT": commit}
            if key == "train":
                args |= {"BASE_IMAGE": deps_ref(images), "REQUIRE_CUDA": "0"}
            else:
                args |= py
            b.build(key, spec["dockerfile"], local_ref(key, images), args=args,
                    also=(content_image_ref(key, LOCAL_REGISTRY, images),))
    report = {"commit": commit, "total_seconds": round(time.monotonic() - t0, 1), "steps": b.timings,
              "machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().machine}"}
    if not dry_run:
        LOCAL_OUT.mkdir(parents=True, exist_ok=True)
        tmp_json = LOCAL_OUT / "build.json.tmp"
        tmp_json.write_text(json.dumps(report, indent=2) + "\n")
        tmp_json.replace(LOCAL_OUT / "build.json")
    return report


# --------------------------------------------------------------------------- digests (deploy time)

KUSTOMIZATION = REPO / "infra" / "k8s" / "kustomization.yaml"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _split_pin(arg: str) -> tuple[str, str, str]:
    """``NAME=REF@sha256:HEX`` → (NAME, REF, sha256:HEX); SystemExit naming the argument otherwise."""
    name, sep, ref = arg.partition("=")
    repo, at, digest = ref.partition("@")
    if not sep or not name or not repo or not at or not DIGEST.match(digest):
        raise SystemExit(f"images.py pin: {arg!r} is not NAME=REF@sha256:<64 hex digits>")
    return name, repo, digest


def pin_digests(pins: list[str], path: Path = KUSTOMIZATION) -> list[str]:
    """Write ``newName`` + ``digest`` of each ``NAME=REF@sha256:…`` into the ``images:`` entry of
    NAME in ``path`` (comments and the other entries kept); returns the names pinned."""
    parsed = [_split_pin(a) for a in pins]
    lines = path.read_text().splitlines()
    done = []
    for name, repo, digest in parsed:
        start = next((i for i, line in enumerate(lines) if line.strip() == f"- name: {name}"), None)
        if start is None:
            raise SystemExit(f"images.py pin: {path} has no images: entry named {name}")
        indent = " " * (len(lines[start]) - len(lines[start].lstrip()) + 2)
        end = start + 1
        while end < len(lines) and lines[end].startswith(indent) and not lines[end].strip().startswith("- "):
            end += 1
        body = [line for line in lines[start + 1:end]
                if not line.strip().startswith(("newName:", "digest:", "newTag:"))]
        lines[start + 1:end] = body + [f"{indent}newName: {repo}", f"{indent}digest: {digest}"]
        done.append(name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return done


def _rendered_images(kustomize_dir: Path) -> list[str]:
    """Every containers[].image of ``kubectl kustomize DIR`` (or ``kustomize build``), CRDs included."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(kustomize_dir)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(kustomize_dir)]
    else:
        raise SystemExit("images.py check-pinned: needs kubectl or kustomize")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"images.py check-pinned: {' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("containers", "initContainers") and isinstance(v, list):
                    found.extend(c["image"] for c in v if isinstance(c, dict) and "image" in c)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for doc in yaml.safe_load_all(out.stdout):
        walk(doc)
    return sorted(set(found))


def unpinned_images(kustomize_dir: Path = KUSTOMIZATION.parent) -> list[str]:
    """The rendered images that are not ``REF@sha256:<64 hex>``."""
    return [i for i in _rendered_images(kustomize_dir)
            if not DIGEST.match(i.rpartition("@")[2]) or "@" not in i]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print name:tag, the content tag and the Dockerfile of every built image")
    b = sub.add_parser("build", help="docker build (and push) the images")
    b.add_argument("--registry", default="", help="prefix such as registry.example.com/xct/ (keep the trailing /)")
    b.add_argument("--push", action="store_true", help="docker push after building")
    b.add_argument("--only", default="", help="comma-separated subset: light,train,mlflow")
    b.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    b.add_argument("--local", action="store_true",
                   help="podman, offline: debootstrap base, this machine's pip config (see the module doc)")
    b.add_argument("--mirror", default=DEBIAN_MIRROR, help="Debian mirror for the --local base (debootstrap)")
    pn = sub.add_parser("pin", help="pin images of infra/k8s by digest: NAME=REF@sha256:<digest> ...")
    pn.add_argument("pins", nargs="+", metavar="NAME=REF@sha256:DIGEST")
    pn.add_argument("--kustomization", type=Path, default=KUSTOMIZATION, help=argparse.SUPPRESS)
    ck = sub.add_parser("check-pinned", help="exit 1 when an image of the rendered infra/k8s has no digest")
    ck.add_argument("--kustomize-dir", type=Path, default=KUSTOMIZATION.parent)
    args = ap.parse_args(argv)
    if args.cmd == "pin":
        for name in pin_digests(args.pins, args.kustomization):
            print(f"pinned {name}")
        return 0
    if args.cmd == "check-pinned":
        missing = unpinned_images(args.kustomize_dir)
        if missing:
            print(f"images.py: {len(missing)} image(s) of {args.kustomize_dir} not pinned by digest "
                  f"(python infra/images.py pin NAME=REF@sha256:...): {', '.join(missing)}", file=sys.stderr)
            return 1
        print(f"every image of {args.kustomize_dir} is pinned by digest")
        return 0
    if args.cmd == "list":
        images = load_images()
        for key, spec in images["built"].items():
            print(f"{key:7s} {spec['name']}:{spec['tag']:10s} {content_image_ref(key, '', images):32s} {spec['dockerfile']}")
        return 0
    if args.registry and not args.registry.endswith("/"):
        ap.error("--registry must end with '/' (e.g. registry.example.com/xct/)")
    only = [k.strip() for k in args.only.split(",") if k.strip()] or None
    if args.local:
        if args.registry or args.push:
            ap.error("--local builds into podman's local store: no --registry/--push")
        report = build_local(only, dry_run=args.dry_run, mirror=args.mirror)
        if not args.dry_run:
            print(f"built {', '.join(only or load_images()['built'])} in {report['total_seconds']:.0f} s "
                  f"(details: {LOCAL_OUT / 'build.json'})")
        return 0
    for cmd in build_commands(args.registry, args.push, only):
        print("+", shlex.join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.run(cmd, cwd=REPO).returncode
            if rc != 0:
                print(f"images.py: {shlex.join(cmd[:2])} failed with exit code {rc}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
