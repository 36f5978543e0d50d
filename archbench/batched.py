"""Batched training: the runs of a sweep trained together, step for step as the plain loop trains each.

``archbench.train.train`` is the readable reference, one model at a time. This engine takes many runs
that share a training budget (steps, batch size) and does in one step what that loop does in many:

- **groups**: runs whose models have the same shape (block config, width, depth, learning rate;
  differing in seed or task settings) have their parameters stacked
  (``torch.func.stack_module_state``), and one ``vmap``-ed ``functional_call`` runs the whole group,
  so the per-layer Python and kernel-launch cost is paid once per group, not once per run;
- **streams**: runs that draw the same batches (same seed, same task inputs; ``Task.stream_key``) share
  them, and whatever the task can share besides (``Task.draw``: the teacher's forward pass, whatever
  the temperature), drawn once per step for every depth and every group;
- the optimizer is timm's over the stacked tensors, which is the per-run optimizer exactly when it
  is elementwise (Adam, AdamW, SGD, Lion, ...); weight decay is grouped as timm groups a model's
  parameters, and gradient clipping uses each run's own norm;
- **compiled** (``compiled=True``): each group's forward and loss go through ``torch.compile``, which
  fuses the elementwise work around the small matmuls (and its backward), and a task that can draw
  several steps' batches in one call (``Task.draw_many``: the teacher's forward on 16 steps' inputs
  at once) is asked for them ahead, with its own per-step work compiled too (``Task.compile_draw``).

Each run starts from the model the plain loop would build (same seed, same init), and gets the
batches the plain loop would draw, so the two paths give the same losses up to floating-point
summation order (tests/test_batched.py states the tolerance). ``check`` says why a set of runs cannot
be batched (a block that cannot be vmapped: in-place state, randomness in training mode, data-dependent
Python control flow; an optimizer that is not elementwise); the sweep then uses the plain loop.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from archbench.records import atomic_write
from archbench.task import Task
from archbench.train import (Outcome, TrainConfig, autocast_for, evaluates_at, finish, held_out, make_scheduler,
                             param_groups, scaled_lr)

# timm optimizers whose update of each element reads only that element's state: stacking is exact
ELEMENTWISE = ("adam", "adamw", "adamax", "nadam", "radam", "sgd", "momentum", "nesterov", "lion", "rmsprop")
# compiled training asks a task that batches its draws (Task.draw_many) for this many steps' batches at once
DRAW_AHEAD = 16


@dataclasses.dataclass
class Job:
    """One run: its model built and initialised exactly as the plain loop would, its task and seed."""

    model: nn.Module
    task: Task
    cfg: TrainConfig
    seed: int
    depth: int
    shape: str  # runs with equal shape keys have identical module structure (block config, width, depth)
    checkpoint: Path | None = None  # this run's own checkpoint file, written every cfg.checkpoint_every steps
    resume: dict | None = None  # the run's checkpoint (``records.read_checkpoint``) to continue from


class NotBatchable(Exception):
    """Why these runs cannot be trained by this engine (the sweep falls back to the plain loop)."""


def check(jobs: list["Job"]) -> list["_Group"]:
    """The groups ``jobs`` train in, each probed; ``NotBatchable`` if they cannot be trained together exactly."""
    if len(jobs) < 2:
        raise NotBatchable("a single run")
    budgets = {(j.cfg.steps, j.cfg.batch_size, j.cfg.log_every, j.cfg.checkpoint_every) for j in jobs}
    if len(budgets) > 1:
        raise NotBatchable("the runs have different step counts or batch sizes")
    if jobs[0].cfg.optimizer.lower() not in ELEMENTWISE:
        raise NotBatchable(f"optimizer {jobs[0].cfg.optimizer!r} is not elementwise (batchable: {', '.join(ELEMENTWISE)})")
    return [_Group(group) for group in _group(jobs)]


def _group(jobs: list[Job]) -> list[list[Job]]:
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.shape, scaled_lr(j.cfg, j.depth), _loss_key(j.task)), []).append(j)
    return list(groups.values())


def _loss_key(task: Task):
    # one vmapped loss serves the group when the loss reads nothing but (logits, targets); a task
    # may pick its loss per instance (teacher-student's objective knob)
    fn = getattr(task.loss, "__func__", task.loss)
    return fn if getattr(fn, "pure", False) else id(task)


class _Stream:
    """One sequence of batches: a task's inputs for one seed, shared by every run that draws them.

    With ``ahead`` > 1 and a task that batches its draws, the next ``ahead`` steps' batches are drawn in one
    call; the engine never asks past a checkpoint, so the generator's state there is the step's own."""

    def __init__(self, task: Task, seed: int, device, ahead: int = 1):
        self.task = task
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.ahead = ahead if type(task).draw_many is not Task.draw_many else 1
        self.x = self.shared = None
        self.queue: collections.deque = collections.deque()

    def draw(self, batch_size: int, left: int) -> None:
        """The batch of the next step; ``left``: steps to the next checkpoint or the end."""
        if not self.queue:
            n = min(self.ahead, left)
            self.queue.extend(self.task.draw_many(batch_size, self.gen, n) if n > 1
                              else [self.task.draw(batch_size, self.gen)])
        self.x, self.shared = self.queue.popleft()


class _Group:
    """Runs of one shape with stacked parameters, one optimizer and one schedule."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        models = [j.model for j in jobs]
        self.names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        try:
            params, self.buffers = stack_module_state(models)
        except Exception as e:  # modules of different structure
            raise NotBatchable(f"the models cannot be stacked ({_first_line(e)})") from None
        self.params = {n: params[n] for n in self.names}
        self.frozen = {n: p for n, p in params.items() if n not in self.params}
        template = copy.deepcopy(models[0]).to("meta")

        def one(p, b, x):
            return functional_call(template, (p, b), (x,), tie_weights=False)

        task = jobs[0].task
        self.vmapped = vmap(one, in_dims=(0, 0, 0), randomness="error")
        key = _loss_key(task)
        self.loss = vmap(task.loss) if key != id(task) and all(_loss_key(j.task) == key for j in jobs) else None
        self._probe()
        self.forward = self.vmapped
        if len(jobs) == 1:  # nothing to batch: the run's own forward, on views of the stacked tensors
            self.forward = lambda p, b, x: one({n: v[0] for n, v in p.items()}, {n: v[0] for n, v in b.items()},
                                               x[0]).unsqueeze(0)
            self.loss = lambda logits, targets: task.loss(logits[0], targets[0]).unsqueeze(0)

    def state(self):
        return {**self.params, **self.frozen}, self.buffers

    def _probe(self) -> None:
        """The vmapped forward equals each model's own forward (train mode) on a small batch."""
        j0 = self.jobs[0]
        g = torch.Generator(device=j0.task.device).manual_seed(j0.seed + 7919)
        x, _ = j0.task.batch(2, g)
        try:
            with torch.no_grad():
                out = self.vmapped(*self.state(), x.expand(len(self.jobs), *x.shape))
                ref = [j.model.train()(x) for j in self.jobs[:2]]
        except Exception as e:
            raise NotBatchable(f"the model cannot be vmapped ({_first_line(e)})") from None
        for i, r in enumerate(ref):
            if not torch.allclose(out[i].float(), r.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
                raise NotBatchable("the vmapped model does not reproduce the model's own forward pass")

    def build_optimizer(self, cfg: TrainConfig):
        lr = scaled_lr(cfg, self.jobs[0].depth)
        # timm's weight-decay groups of one model, mapped onto the stacked tensors by name
        name_of = {id(p): n for n, p in self.jobs[0].model.named_parameters()}
        groups = [{**g, "params": [self.params[name_of[id(p)]] for p in g["params"]]}
                  for g in param_groups(self.jobs[0].model, cfg.weight_decay)]
        # torch's fused Adam: one kernel for all tensors (CPU and CUDA), the same update as the loop's
        extra = {"fused": True} if cfg.optimizer.lower() in ("adam", "adamw") else {}
        self.opt = create_optimizer_v2(groups, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay, **extra)
        self.sched = make_scheduler(self.opt, cfg, lr)

    def build_step(self, cfg: TrainConfig, compiled: bool) -> None:
        """``self.train_losses(params, buffers, x, y)``: every run's training loss, its forward at the run's
        precision; with ``compiled``, through ``torch.compile`` (its own cache: a group's graph serves no other)."""
        device, forward, losses = self.jobs[0].task.device, self.forward, self.losses

        def train_losses(params, buffers, x, y):
            with autocast_for(device, cfg.precision):
                logits = forward(params, buffers, x)
            return losses(logits, y)

        self.eager = train_losses
        self.train_losses = torch.compile(train_losses, dynamic=False, isolate_recompiles=True) \
            if compiled else train_losses
        self.compile_checked = not compiled

    def step_losses(self, x, y):
        if self.compile_checked:
            return self.train_losses(*self.state(), x, y)
        self.compile_checked = True  # the first compiled call compiles: a failure there falls back to eager
        try:
            return self.train_losses(*self.state(), x, y)
        except Exception as e:
            warnings.warn(f"torch.compile could not compile this model ({_first_line(e)}); training it uncompiled")
            self.train_losses = self.eager
            return self.eager(*self.state(), x, y)

    def losses(self, logits, targets):
        if self.loss is not None:
            return self.loss(logits, targets)
        return torch.stack([j.task.loss(logits[i], targets[i]) for i, j in enumerate(self.jobs)])

    def clip(self, max_norm: float) -> None:
        """Per-run gradient clipping, as ``clip_grad_norm_`` does for each model on its own."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))

    def unstack(self, i: int) -> nn.Module:
        model = self.jobs[i].model
        params, buffers = self.state()
        model.load_state_dict({**{n: p[i].detach() for n, p in params.items()},
                               **{n: b[i] for n, b in buffers.items()}}, strict=False)
        return model


def train_batched(jobs: list[Job], on_log: Callable[[int, list[float]], None] | None = None, *,
                  compiled: bool = False,
                  on_eval: Callable[[int, list[dict | None]], None] | None = None) -> list[Outcome]:
    """Train ``jobs`` together; one ``Outcome`` per job, as ``train`` would give for each alone.

    Each outcome's ``train_s`` is the batch's wall time shared equally among its runs. Every
    ``checkpoint_every`` steps each run's state goes to its own ``Job.checkpoint``; a job given a
    ``resume`` state continues from it (all jobs of one call from the same step), whichever of the
    runs once trained beside it have finished since. ``compiled``: through ``torch.compile`` (see the
    module's docstring); where compiling fails, the run goes on uncompiled, with one warning.
    ``on_eval(step, metrics)``: each job's held-out metrics (None for a failed one) at every eval step.
    """
    with warnings.catch_warnings():  # ops without a vmap rule are looped over the runs: slower, still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return _train(jobs, on_log, compiled, on_eval)


def compile_steps(setting: str, steps: int) -> bool:
    """Whether ``--compile`` ``setting`` (auto, on, off) compiles a batch of ``steps`` steps: ``auto`` does from
    ``COMPILE_MIN_STEPS`` on, where the compile time (seconds per model shape) is paid back."""
    return setting == "on" or (setting == "auto" and steps >= COMPILE_MIN_STEPS)


# a quick-preset sweep (4,000 steps) gains; a search trial of 1,000 steps would spend longer compiling than training
COMPILE_MIN_STEPS = 2000


def checkpoint_step(state: dict | None) -> int:
    """The step a checkpoint of this engine resumes at (0 for none, or for one the plain loop wrote)."""
    return state["step"] if state and state.get("engine") == "batched" else 0


def _train(jobs, on_log, compiled, on_eval=None):
    cfg, device = jobs[0].cfg, jobs[0].task.device
    resumed = [j.resume if checkpoint_step(j.resume) else None for j in jobs]
    if len({checkpoint_step(r) for r in resumed}) > 1:
        raise ValueError("runs resumed from different steps cannot be trained together")
    for j, state in zip(jobs, resumed):
        j.model.to(device).train()
        if state is not None:  # before stacking: the groups take parameters and buffers from the models
            j.model.load_state_dict(state["model"])
    groups = check(jobs)
    for g in groups:
        g.build_optimizer(g.jobs[0].cfg)
        g.build_step(g.jobs[0].cfg, compiled)
    streams, feeds, stream_of = _streams(jobs, groups, device, DRAW_AHEAD if compiled else 1)
    tasks = {id(j.task): j.task for j in jobs}.values()
    if compiled:
        for s in streams.values():
            s.task.compile_draw()
    histories = {id(j): [] for j in jobs}
    evals = {id(j): [] for j in jobs}  # [step, held-out loss] every eval_every steps
    failures: dict[int, tuple[float, str, int]] = {}  # id(job) -> (loss, why, step)
    start, elapsed = 0, 0.0
    if resumed[0] is not None:
        start, elapsed = _load(groups, streams, stream_of, histories, evals, failures)

    t0 = time.perf_counter() - elapsed
    for step in range(start, cfg.steps):
        done = step + 1
        for task in tasks:
            task.set_progress(step / cfg.steps)
        left = cfg.steps - step
        if cfg.checkpoint_every:
            left = min(left, cfg.checkpoint_every - step % cfg.checkpoint_every)
        for s in streams.values():
            s.draw(cfg.batch_size, left)
        logged = _step(groups, feeds, cfg, done)
        if logged:
            values = _record_losses(logged, histories, failures, done)
            if on_log:
                on_log(done, values)
        if evaluates_at(cfg, done):
            metrics = {}
            for g in groups:
                for i, j in enumerate(g.jobs):
                    if id(j) not in failures:
                        metrics[id(j)] = held_out(j.task, g.unstack(i), cfg)
                        evals[id(j)].append([done, metrics[id(j)]["loss"]])
            if on_eval:
                on_eval(done, [metrics.get(id(j)) for j in jobs])
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save(done, time.perf_counter() - t0, groups, streams, stream_of, histories, evals, failures)
    train_s = (time.perf_counter() - t0) / len(jobs)
    return _outcomes(jobs, groups, histories, evals, failures, train_s)


def _streams(jobs, groups, device, ahead):
    """One batch stream per (task inputs, seed), and per group each run's (stream, key of its targets, task),
    looked up once, not every step."""
    streams: dict[tuple, _Stream] = {}
    stream_of = {}  # id(job) -> stream key
    for j in jobs:
        key = (j.task.stream_key(), j.seed)
        streams.setdefault(key, _Stream(j.task, j.seed, device, ahead))
        stream_of[id(j)] = key
    feeds = [[(streams[stream_of[id(j)]], (stream_of[id(j)], id(j.task)), j.task) for j in g.jobs] for g in groups]
    return streams, feeds, stream_of


def _step(groups, feeds, cfg, done) -> list:
    """One optimizer step of every group on the batches drawn; the groups' losses at a log point."""
    targets: dict[tuple, torch.Tensor] = {}  # (stream, task) -> targets, shared across groups
    logged = []
    for g, feed in zip(groups, feeds):
        for s, key, task in feed:
            if key not in targets:
                targets[key] = task.targets(s.x, s.shared)
        x = torch.stack([s.x for s, _, _ in feed])
        y = torch.stack([targets[key] for _, key, _ in feed])
        losses = g.step_losses(x, y)
        g.opt.zero_grad(set_to_none=True)
        losses.nan_to_num(0.0, 0.0, 0.0).sum().backward()  # a diverged run must not stop the others
        if cfg.grad_clip > 0:
            g.clip(cfg.grad_clip)
        g.opt.step()
        if g.sched is not None:
            g.sched.step_update(done)
        if done % cfg.log_every == 0 or done == cfg.steps:
            logged.append((g, losses.detach()))
    return logged


def _record_losses(logged, histories, failures, done) -> list[float]:
    """Each run's loss into its history (a non-finite one fails the run); the values for the progress line."""
    values = []
    for g, losses in logged:
        for j, value in zip(g.jobs, losses.tolist()):  # one device sync per group per log point
            if id(j) in failures:
                continue
            histories[id(j)].append([done, value])
            values.append(value)
            if not math.isfinite(value):
                failures[id(j)] = (value, f"loss became {value} at step {done}", done)
    return values


def _outcomes(jobs, groups, histories, evals, failures, train_s) -> list[Outcome]:
    """Each run's held-out evaluation on its own (unstacked) model, as the plain loop ends."""
    outcomes = {}
    for g in groups:
        for i, j in enumerate(g.jobs):
            history = histories[id(j)]
            if id(j) in failures:
                value, why, at = failures[id(j)]
                outcomes[id(j)] = Outcome("failed", value, {}, at, history, train_s, failure=why,
                                          eval_history=evals[id(j)])
                continue
            outcomes[id(j)] = finish(j.task, g.unstack(i), j.cfg, history, evals[id(j)], train_s)
    return [outcomes[id(j)] for j in jobs]


def _save(step, train_s, groups, streams, stream_of, histories, evals, failures):
    """Each run's state into its own checkpoint: its model, its slice of the stacked optimizer state, the
    schedule, the generator of its batch stream, its histories."""
    for g in groups:
        params, buffers = g.state()
        optimizer = g.opt.state_dict()
        for i, j in enumerate(g.jobs):
            if j.checkpoint is None:
                continue
            state = {"engine": "batched", "step": step, "train_s": train_s,
                     "model": {n: t[i].detach().clone() for n, t in {**params, **buffers}.items()},
                     "optimizer": _slice(optimizer, i), "scheduler": g.sched.state_dict() if g.sched is not None else {},
                     "generator": streams[stream_of[id(j)]].gen.get_state(), "history": histories[id(j)],
                     "eval_history": evals[id(j)], "failure": list(failures[id(j)]) if id(j) in failures else None}
            atomic_write(j.checkpoint, lambda f, state=state: torch.save(state, f))


def _slice(optimizer: dict, i: int) -> dict:
    """Run ``i``'s part of a stacked optimizer's state (a step count shared by the group stays whole)."""
    state = {k: {n: v[i].clone() if torch.is_tensor(v) and v.dim() > 0 else v for n, v in per_param.items()}
             for k, per_param in optimizer["state"].items()}
    return {"state": state, "param_groups": optimizer["param_groups"]}


def _load(groups, streams, stream_of, histories, evals, failures) -> tuple[int, float]:
    """The optimizer, schedule, streams and histories from the jobs' ``resume`` states (the models already
    hold theirs); returns (step, elapsed seconds)."""
    for g in groups:
        states = [j.resume for j in g.jobs]
        first = states[0]["optimizer"]
        stacked = {k: {n: torch.stack([s["optimizer"]["state"][k][n] for s in states])
                       if torch.is_tensor(v) and v.dim() > 0 else v for n, v in per_param.items()}
                   for k, per_param in first["state"].items()}
        g.opt.load_state_dict({"state": stacked, "param_groups": first["param_groups"]})
        if g.sched is not None:
            g.sched.load_state_dict(states[0]["scheduler"])
    jobs = [j for g in groups for j in g.jobs]
    for key, s in streams.items():
        s.gen.set_state(next(j.resume["generator"] for j in jobs if stream_of[id(j)] == key).cpu())
    for j in jobs:
        histories[id(j)], evals[id(j)] = j.resume["history"], j.resume["eval_history"]
        if j.resume["failure"] is not None:
            failures[id(j)] = tuple(j.resume["failure"])
    return jobs[0].resume["step"], max(j.resume["train_s"] for j in jobs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]
