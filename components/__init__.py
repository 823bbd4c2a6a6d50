"""Floor 2: one module per pipeline step, each binding a step of xct_core to its engines."""
