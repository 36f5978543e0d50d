"""The budget: every trial gets the largest width whose parameters (or forward FLOPs) at the sweep's
largest depth are at most the baseline's."""

from __future__ import annotations

import math

from archbench.errors import ArchbenchError
from archbench.registry import BLOCKS
from archbench.search.failures import TrialFailed


def measure(block: str, config: dict, depth: int, task, width: int, budget: str) -> int:
    """Parameters, or forward FLOPs for one example, of ``block`` at ``depth`` and ``width``."""
    import torch

    from archbench.model import build_model
    from archbench.nn import flop_counter

    entry = BLOCKS.get(block)
    with torch.device("cpu"):
        model = build_model(entry.obj, config.block, depth, task.input, width, config.model["zero_head"],
                            entry.name)
    if budget == "params":
        return sum(p.numel() for p in model.parameters())
    x = task.batch(1, torch.Generator(device=task.device).manual_seed(0))[0].cpu()
    counter = flop_counter()
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def width_step(block_cfg: dict) -> int:
    """Widths move in steps of 4 that the head count divides (where the block attends)."""
    heads = block_cfg.get("heads") if block_cfg.get("attention", True) else 1
    return math.lcm(4, int(heads)) if isinstance(heads, int) and heads > 0 else 4


def fit_width(block: str, config: dict, depth: int, task, budget: str, limit: int, ceiling: int) -> tuple[int, int]:
    """The largest width (a multiple of ``width_step``) whose measure at ``depth`` is at most ``limit``."""
    step, best = width_step(config.block), None
    errors = []
    for width in range(step, ceiling + 1, step):
        c = config.with_model(width=width)
        try:
            m = measure(block, c, depth, task, width, budget)
        except ArchbenchError as e:  # this width is not allowed by the block (e.g. heads must divide it)
            errors.append(str(e))
            continue
        if m > limit:
            break
        best = (width, m)
    if best is None:
        why = f" ({errors[0]})" if errors else ""
        raise TrialFailed(f"over budget: no width fits {budget} <= {limit:,} at depth {depth}{why}")
    return best
