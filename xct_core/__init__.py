"""xct_core: the science of xct — pure PyTorch/NumPy/nibabel.

No orchestration engine (mlflow, ray, kfp, great_expectations, boto3, dvc) is imported
anywhere under this package, so it runs on a bare GPU box that has only torch.
"""

__version__ = "0.1.0"
