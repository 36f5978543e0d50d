"""Built-in blocks, one file per family or design. Importing this package registers them."""

from archbench.blocks import (attention_residuals, denseformer, depth_scaled, gated, hourglass, hrm, hyper_connections, laurel,  # noqa: F401
                              recurrent, residual, unet_skips, value_residual)
