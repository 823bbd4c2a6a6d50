"""Floor 3: DAGs and entry points (the `xct` CLI, the KFP pipeline, the HPO driver)."""
