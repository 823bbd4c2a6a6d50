"""Build (and optionally push) the xct container images named in infra/images.yaml.

    python infra/images.py list                               name:tag  dockerfile
    python infra/images.py build [--registry R/] [--push] [--only light,train] [--dry-run]

Every image is built from the repository root as its context (``.dockerignore`` keeps
data/, outputs/, .venv/, mlruns/ out). ``--registry`` prefixes the tag, e.g.
``--registry registry.example.com/xct/`` → ``registry.example.com/xct/xct-train:0.1.0``;
then point the cluster at it (kustomize ``images:`` in infra/k8s/kustomization.yaml and
``XCT_IMAGE_LIGHT`` / ``XCT_IMAGE_TRAIN`` when compiling the KFP pipeline).
``--dry-run`` prints the docker commands without running them. Needs PyYAML only.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES_FILE = REPO / "infra" / "images.yaml"


def load_images(path: Path = IMAGES_FILE) -> dict:
    """The parsed infra/images.yaml (``built``, ``third_party``, ``bases``)."""
    return yaml.safe_load(path.read_text())


def image_ref(key: str, registry: str = "", images: dict | None = None) -> str:
    """``[registry]name:tag`` of a built image (``key``: light | train | mlflow)."""
    spec = (images or load_images())["built"][key]
    return f"{registry}{spec['name']}:{spec['tag']}"


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
        cmds.append(["docker", "build", "-f", images["built"][key]["dockerfile"], "-t", ref,
                     "--build-arg", f"GIT_COMMIT={commit}", "."])
        if push:
            cmds.append(["docker", "push", ref])
    return cmds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print name:tag and Dockerfile of every built image")
    b = sub.add_parser("build", help="docker build (and push) the images")
    b.add_argument("--registry", default="", help="prefix such as registry.example.com/xct/ (keep the trailing /)")
    b.add_argument("--push", action="store_true", help="docker push after building")
    b.add_argument("--only", default="", help="comma-separated subset: light,train,mlflow")
    b.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        images = load_images()
        for key, spec in images["built"].items():
            print(f"{key:7s} {spec['name']}:{spec['tag']:10s} {spec['dockerfile']}")
        return 0
    if args.registry and not args.registry.endswith("/"):
        ap.error("--registry must end with '/' (e.g. registry.example.com/xct/)")
    only = [k.strip() for k in args.only.split(",") if k.strip()] or None
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
