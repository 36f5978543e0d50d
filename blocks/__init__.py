"""Built-in blocks, one file per family. Importing this package registers them."""

from archbench.blocks import gated, residual  # noqa: F401
