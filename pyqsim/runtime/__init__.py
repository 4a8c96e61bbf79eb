"""Runtime: integer-parameter files and the integer executors that run them (no PyTorch needed)."""
