"""The training engine: one model, one task, one seed.

Optimizers and schedules come from timm. Runs are repeatable on a CPU for a given seed, save
a checkpoint every ``checkpoint_every`` steps (a killed run resumes from it and continues as if
never stopped: model, optimizer, schedule and data-generator state are all restored), and stop
as ``failed`` when the loss becomes NaN or infinite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler

from archbench.errors import unknown
from archbench.knobs import FRACTION, NON_NEGATIVE, POSITIVE, Range
from archbench.records import atomic_write, read_checkpoint
from archbench.task import Task


@dataclasses.dataclass
class TrainConfig:
    steps: Annotated[int, POSITIVE] = 2000
    batch_size: Annotated[int, POSITIVE] = 1024
    lr: Annotated[float, Range(1e-4, 1e-2, log=True), POSITIVE] = 6e-4
    optimizer: str = "adam"  # any name timm.optim.create_optimizer_v2 knows: adam, adamw, sgd, lion, ...
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    # constant; cosine (warmup, then cosine to final_lr_frac·lr); hold-decay (the paper's long
    # schedule: hold for hold_frac of training, then linearly down to final_lr_frac·lr)
    schedule: Literal["constant", "cosine", "hold-decay"] = "constant"
    warmup_frac: Annotated[float, FRACTION] = 0.0
    hold_frac: Annotated[float, FRACTION] = 0.8
    final_lr_frac: Annotated[float, FRACTION] = 0.1
    # if set, lr·sqrt(ref/depth): the paper's 6e-4·4/√ℓ is ref=16
    lr_depth_ref: Annotated[int | None, POSITIVE] = None
    grad_clip: Annotated[float, NON_NEGATIVE] = 0.0  # max gradient norm; 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    eval_batch_size: Annotated[int, NON_NEGATIVE] = 0  # 0 = batch_size
    log_every: Annotated[int, POSITIVE] = 50  # steps between loss readings (and NaN checks)
    # steps between held-out evaluations kept in the record (the paper: 500); 0 = at the end only
    eval_every: Annotated[int, NON_NEGATIVE] = 0
    checkpoint_every: Annotated[int, NON_NEGATIVE] = 1000  # steps between resumable checkpoints; 0 = never

    def __post_init__(self):
        if self.optimizer.lower() not in optimizer_names():
            raise unknown("value for train.optimizer", self.optimizer, optimizer_names())


def optimizer_names() -> list[str]:
    from timm.optim import list_optimizers

    return list_optimizers()


@dataclasses.dataclass
class Outcome:
    status: str  # "ok" or "failed"
    final_loss: float
    metrics: dict
    steps_done: int
    history: list  # [step, training loss] at every log point
    train_s: float
    failure: str | None = None
    eval_history: list = dataclasses.field(default_factory=list)  # [step, held-out loss] every eval_every steps


def evaluates_at(cfg: TrainConfig, done: int) -> bool:
    """Whether the held-out loss is measured after step ``done`` (the final step has its own evaluation)."""
    return bool(cfg.eval_every) and done % cfg.eval_every == 0 and done < cfg.steps


def finish(task: Task, model: torch.nn.Module, cfg: TrainConfig, history: list, eval_history: list,
           train_s: float) -> Outcome:
    """The held-out evaluation that ends a run, shared by both engines."""
    metrics = held_out(task, model, cfg)
    if cfg.eval_every:
        eval_history = [*eval_history, [cfg.steps, metrics["loss"]]]
    if not math.isfinite(metrics["loss"]):
        return Outcome("failed", metrics["loss"], metrics, cfg.steps, history, train_s,
                       failure=f"held-out loss is {metrics['loss']} after step {cfg.steps}", eval_history=eval_history)
    if collapsed(task, model):
        return Outcome("failed", metrics["loss"], metrics, cfg.steps, history, train_s, eval_history=eval_history,
                       failure=f"collapsed: its output no longer depends on its input (held-out loss {metrics['loss']:.4g})")
    return Outcome("ok", metrics["loss"], metrics, cfg.steps, history, train_s, eval_history=eval_history)


@torch.no_grad()
def collapsed(task: Task, model: torch.nn.Module) -> bool:
    """Whether the model gives every input the same output (a diverged run that settled on a constant, such
    as the uniform prediction): a loss that measures nothing the depth did."""
    x, _ = task.batch(8, torch.Generator(device=task.device).manual_seed(12345))
    out = model(x).float()
    spread = (out - out[:1]).abs().max()
    return bool(spread <= 1e-6 * out.abs().max().clamp_min(1e-30))


def held_out(task: Task, model: torch.nn.Module, cfg: TrainConfig) -> dict:
    """The task's held-out loss and metrics at the run's eval batch size and precision."""
    return task.evaluate(model, cfg.eval_batch_size or cfg.batch_size, autocast_for(task.device, cfg.precision))


def scaled_lr(cfg: TrainConfig, depth: int) -> float:
    if cfg.lr_depth_ref:
        return cfg.lr * math.sqrt(cfg.lr_depth_ref / max(depth, 1))
    return cfg.lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's weight-decay groups, each split by its parameters' ``lr_scale`` attribute (a block sets it
    where its paper scales a tensor's learning rate, as depth-µP and CompleteP do): the group's rate is
    ``lr · lr_scale``, and timm's schedulers keep applying the scale at every step."""
    groups = []
    for group in param_groups_weight_decay(model, weight_decay):
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
        groups += [{**group, "params": ps, **({"lr_scale": s} if s != 1.0 else {})} for s, ps in by_scale.items()]
    return groups


def has_lr_scales(model: torch.nn.Module) -> bool:
    return any(getattr(p, "lr_scale", 1.0) != 1.0 for p in model.parameters())


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, lr: float):
    """A timm scheduler stepped per update (``step_update``; it applies each group's ``lr_scale``), or None
    for a constant rate (the scales applied here, once)."""
    lr_min = lr * cfg.final_lr_frac
    if cfg.schedule == "hold-decay":
        hold = int(cfg.hold_frac * cfg.steps)
        # A "warmup" from lr to lr is timm's way to hold; poly of power 1 is the linear decay.
        return PolyLRScheduler(opt, t_initial=max(cfg.steps - hold, 1), power=1.0, lr_min=lr_min, warmup_t=hold,
                               warmup_lr_init=lr, warmup_prefix=True, t_in_epochs=False)
    warmup = int(cfg.warmup_frac * cfg.steps)
    if cfg.schedule == "cosine":
        return CosineLRScheduler(opt, t_initial=max(cfg.steps - warmup, 1), lr_min=lr_min, warmup_t=warmup,
                                 warmup_lr_init=lr * 0.01, warmup_prefix=True, t_in_epochs=False)
    if warmup:  # constant after a linear warmup: poly of power 0
        return PolyLRScheduler(opt, t_initial=max(cfg.steps - warmup, 1), power=0.0, lr_min=lr, warmup_t=warmup,
                               warmup_lr_init=lr * 0.01, warmup_prefix=True, t_in_epochs=False)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return None


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, *, seed: int, depth: int,
          checkpoint: Path | None = None, on_log: Callable[[int, float], None] | None = None,
          on_eval: Callable[[int, dict], None] | None = None) -> Outcome:
    device = task.device
    model.to(device).train()
    lr = scaled_lr(cfg, depth)
    # the model itself where no tensor has its own rate: the optimizer state of older checkpoints keeps fitting
    params = param_groups(model, cfg.weight_decay) if has_lr_scales(model) else model
    opt = create_optimizer_v2(params, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg, lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    start, history, evals, elapsed = 0, [], [], 0.0
    state = read_checkpoint(checkpoint, device) if checkpoint is not None else None
    if state is not None and state.get("engine", "plain") != "plain":
        warnings.warn(f"{checkpoint} was written by the {state['engine']} engine; this run starts again from step 0")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"].cpu())  # generator states are CPU byte tensors
        start, history, elapsed = state["step"], state["history"], state["train_s"]
        evals = state.get("eval_history", [])

    t0 = time.perf_counter() - elapsed
    for step in range(start, cfg.steps):
        task.set_progress(step / cfg.steps)
        x, y = task.batch(cfg.batch_size, gen)
        with autocast_for(device, cfg.precision):
            logits = model(x)
        loss = task.loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step_update(step + 1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            value = loss.item()  # one device sync per log point, not per step
            history.append([done, value])
            if not math.isfinite(value):
                return Outcome("failed", value, {}, done, history, time.perf_counter() - t0,
                               failure=f"loss became {value} at step {done}")
            if on_log:
                on_log(done, value)
        if evaluates_at(cfg, done):
            metrics = held_out(task, model, cfg)
            evals.append([done, metrics["loss"]])
            if on_eval:  # a search's pruner reads the held-out metrics along the way (and may stop the run)
                on_eval(done, metrics)
        if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_checkpoint(checkpoint, model, opt, sched, gen, done, history, evals, time.perf_counter() - t0)

    return finish(task, model, cfg, history, evals, time.perf_counter() - t0)


def _save_checkpoint(path: Path, model, opt, sched, gen, step, history, evals, train_s):
    state = {"engine": "plain", "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict() if sched is not None else {},
             "generator": gen.get_state(), "step": step, "history": history, "eval_history": evals,
             "train_s": train_s}
    atomic_write(path, lambda f: torch.save(state, f))
