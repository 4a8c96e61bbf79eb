"""PyTorch model definitions and their bundled weights."""
