"""Content tags of the images xct builds: ``<version>-<digest of what goes into the image>``.

A KFP task's cache key is its component spec (the ``image:`` it names included) plus its
inputs. With one tag per release (``xct-light:0.1.0``) a code change would leave every key as
it was and a run could reuse a stale cached result, so the compiled pipeline names each image
by a content tag instead: ``xct-light:0.1.0-3f2a9c1d7e4b``, the first 12 hex digits of a
SHA-256 over the files that go into the image — ``content:`` of each built image in
infra/images.yaml (the code folders, the requirements, the Dockerfile), path and bytes of every
file, in path order, caches and bytecode left out. Any change to one of them (committed or
not) gives a new tag, and so a new cache key for every task on that image; a docs-only change
gives none. ``infra/images.py build`` tags each image with its release tag AND its content tag
(``make images`` too), and pushes both.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES_FILE = REPO / "infra" / "images.yaml"
#: hex digits of the digest in a tag
DIGEST_LEN = 12
#: never part of an image's content (build caches, bytecode, VCS metadata)
_SKIP_PARTS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def load_images(path: Path = IMAGES_FILE) -> dict:
    """The parsed infra/images.yaml."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def content_files(key: str, images: dict | None = None, root: Path = REPO) -> list[str]:
    """The repo-relative files that go into built image ``key`` (its ``content:`` entries,
    folders walked), sorted; a listed path that does not exist is an error."""
    spec = (images or load_images())["built"][key]
    files: set[str] = set()
    for entry in spec.get("content") or []:
        p = root / entry
        if p.is_file():
            files.add(entry)
        elif p.is_dir():
            files |= {f.relative_to(root).as_posix() for f in p.rglob("*")
                      if f.is_file() and not _SKIP_PARTS & set(f.relative_to(root).parts)
                      and f.suffix not in (".pyc", ".pyo") and not f.name.endswith(".egg-info")}
        else:
            raise FileNotFoundError(f"infra/images.yaml: content of {key} names {entry}, which does not exist")
    if not files:
        raise ValueError(f"infra/images.yaml: built image {key} lists no content")
    return sorted(files)


def content_digest(key: str, images: dict | None = None, root: Path = REPO) -> str:
    """SHA-256 (first :data:`DIGEST_LEN` hex digits) over path + bytes of :func:`content_files`."""
    h = hashlib.sha256()
    for rel in content_files(key, images, root):
        h.update(rel.encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()[:DIGEST_LEN]


def content_tag(key: str, images: dict | None = None, root: Path = REPO) -> str:
    """``<release tag>-<content digest>`` of built image ``key``."""
    images = images or load_images(root / "infra" / "images.yaml")
    return f"{images['built'][key]['tag']}-{content_digest(key, images, root)}"


def content_ref(base_ref: str, key: str, images: dict | None = None, root: Path = REPO) -> str:
    """``base_ref`` (``[registry/]name:tag``) with its tag replaced by image ``key``'s content tag."""
    name = base_ref.rsplit(":", 1)[0] if ":" in base_ref.rsplit("/", 1)[-1] else base_ref
    return f"{name}:{content_tag(key, images, root)}"
