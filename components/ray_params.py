"""Typed ``train.ray`` section: Ray Train scaling and fault tolerance of one stage.

Operational (how the training is scheduled), so not in xct_core/config.py: the science's
:class:`~xct_core.config.TrainParams` knows the key ``ray`` only by name and drops it; the
models here validate it. :class:`RayParams` is what ``xct train`` and components/train.py
load (the science + ``train.ray``); ``components.ops_params.OpsParams`` (the whole file)
derives from it. This module is light (pydantic only) and is the one operational module
the training steps of dvc.yaml import. Defaults = params.yaml's ``train.ray``
(tests/test_one_source.py).
"""

from __future__ import annotations

from pydantic import Field

from xct_core.config import Params, Section, TrainParams


class RayTrainParams(Section):
    """Ray Train scaling and fault tolerance of one stage (components/train.py).

    ``RAY_ADDRESS`` set: join that cluster; otherwise a local Ray runtime is started.
    """

    #: data-parallel workers (DDP: gloo on CPU, NCCL on GPU); each gets its data shard
    num_workers: int = Field(1, ge=1)
    #: one GPU per worker (bf16 autocast, NCCL)
    use_gpu: bool = False
    #: CPUs reserved per worker (also its torch intra-op threads)
    cpus_per_worker: float = Field(2.0, gt=0)
    #: extra resources per worker (e.g. {"memory": 3.0e10}, custom pool labels); "CPU"/"GPU" here override the above
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    #: schedule only on nodes with this accelerator, e.g. "A100" or "H100" (null: any)
    accelerator_type: str | None = None
    #: worker crashes retried from the last checkpoint (FailureConfig.max_failures)
    max_failures: int = Field(2, ge=0)


class RayTrainSection(TrainParams):
    """``train`` with its ``ray`` subsection validated."""

    ray: RayTrainParams = RayTrainParams()


class RayParams(Params):
    """The science's params + ``train.ray``: what a training run reads (``xct train``)."""

    train: RayTrainSection = RayTrainSection()
