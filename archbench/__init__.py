"""archbench: a testbed for how neural networks use their depth.

Public API::

    import archbench

    @archbench.register_block("my-block")
    class MyBlock(torch.nn.Module):
        def __init__(self, dim, layer_idx, depth, **kwargs): ...
        def forward(self, x): ...  # (batch, seq, dim) -> (batch, seq, dim)
"""

from archbench.errors import ArchbenchError, UsageError
from archbench.knobs import FRACTION, NON_NEGATIVE, NOT_SEARCHED, POSITIVE, Bounds, Range
from archbench.model import InputSpec, Stack, StreamModel, Tap, Trace, step, trace
from archbench.registry import (BLOCKS, EVALUATORS, TASKS, register_block, register_evaluator,
                                register_task)

__version__ = "0.1.0"

__all__ = [
    "ArchbenchError", "UsageError", "Range", "Bounds", "POSITIVE", "NON_NEGATIVE", "FRACTION", "NOT_SEARCHED",
    "InputSpec", "Stack", "StreamModel", "Tap", "Trace", "step", "trace",
    "BLOCKS", "TASKS", "EVALUATORS", "register_block", "register_task", "register_evaluator", "__version__",
]
