"""The composed model: frozen decoder LMs joined by trainable cross-attention blocks, its loss and decoding.

Importing this package imports nothing heavy: `layer_pairs` is pure Python (the planner uses it)."""
