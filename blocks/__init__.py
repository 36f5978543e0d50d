"""Built-in blocks, one file per family or design. Importing this package registers them."""

from archbench.blocks import (attention_residuals, denseformer, depth_scaled, gated, hourglass, hrm,  # noqa: F401
                              hyper_connections, laurel, mixture_of_depths, muddformer, recurrent, residual,
                              unet_skips, value_residual)
