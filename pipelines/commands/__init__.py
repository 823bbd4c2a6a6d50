"""Sub-command groups of the `xct` CLI, one module per group."""
