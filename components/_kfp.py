"""Shared Kubeflow Pipelines v2 helpers for the step components (components/*.py).

Every step module defines its KFP component next to its plain-Python entry point; both
call the same function. The component bodies are self-contained (KFP ships the function's
source into the container), so they import xct inside the function.

Images: ``xct-light`` (CPU: ingest, validate, preprocess, evaluate, register) and
``xct-train`` (CUDA: training). Both ship xct and the pinned kfp, so components do not
pip-install kfp at start-up (``install_kfp_package=False``); that also keeps ``kfp.local``
runs from touching the current environment. Override the tags with ``XCT_IMAGE_LIGHT`` /
``XCT_IMAGE_TRAIN`` (read when this module is imported, i.e. at pipeline compile time).

No ``from __future__ import annotations`` here or in modules defining components: KFP reads
the real annotation objects (``Input[Dataset]``), not strings.
"""

import os
from collections.abc import Callable
from typing import Any

from kfp import dsl

from xct_core.config import Params, params_from_dict
from xct_core.errors import ConfigError

#: CPU image for data steps
IMAGE_LIGHT: str = os.environ.get("XCT_IMAGE_LIGHT", "xct-light:0.1.0")
#: GPU image for training steps
IMAGE_TRAIN: str = os.environ.get("XCT_IMAGE_TRAIN", "xct-train:0.1.0")


def _in_kfp_task() -> bool:
    """True inside a running KFP task: the executor sets ``_KFP_RUNTIME=true`` and its
    ``kfp.dsl`` then has no ``component`` decorator. A component body that imports its own
    step module (``from components.ingest import run_ingest``) must still import cleanly."""
    return os.environ.get("_KFP_RUNTIME", "false") == "true"


def light_component(func: Callable[..., Any]) -> Any:
    """``@dsl.component`` on the light (CPU) image, without a kfp pip install at start-up."""
    if _in_kfp_task():
        return func
    return dsl.component(func, base_image=IMAGE_LIGHT, install_kfp_package=False)


def train_component(func: Callable[..., Any]) -> Any:
    """``@dsl.component`` on the training (GPU) image, without a kfp pip install at start-up."""
    if _in_kfp_task():
        return func
    return dsl.component(func, base_image=IMAGE_TRAIN, install_kfp_package=False)


def params_from_text(params_yaml: str, schema: type[Params] | None = None) -> Params:
    """Typed params from the text of a params.yaml (how pipelines hand params to components),
    validated by ``schema`` (default: the science's :class:`Params`; the train task reads
    ``pipeline`` and ``train.ray`` too: ``components.ops_params.OpsParams``).

    The pipelines always hand the whole effective params (``xct pipeline compile|run|submit``);
    an empty text is a :class:`ConfigError`, never a silent fall-back to built-in defaults.
    Invalid YAML or values raise :class:`ConfigError`.
    """
    from xct_core.errors import InputError
    from xct_core.yamlsafe import load_yaml_text

    try:  # the one bounded YAML reader (aliases, depth, duplicate keys)
        data = load_yaml_text(params_yaml, "params_yaml") if params_yaml.strip() else {}
    except InputError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"params_yaml: top level must be a mapping, got {type(data).__name__}")
    if not data:
        raise ConfigError("params_yaml is empty: a task needs the whole params text "
                          "(`xct pipeline compile|run|submit` hand it on; the compiled default is the compile-time params)")
    return params_from_dict(data, "params_yaml", schema)
