"""``archbench bench``: how fast this machine trains archbench's models, measured in one run.

- **sweep**: a teacher-student depth sweep (depths × temperatures × teachers × teacher kinds) trained
  by the batched engine, against the plain loop training one student after another. The plain loop is
  timed on one (temperature, teacher) slice, one student per depth: every slice has the same depths,
  so its samples per second is the whole sweep's. The batched engine is timed on the whole sweep and,
  for a like-for-like figure, on that one slice (what ``archbench eval`` at a preset trains).
- **sequence**: the ``residual`` block on ``lm-char``: tokens per second and achieved FLOP/s
  (``torch.utils.flop_counter`` counts one training step: forward and backward) as a fraction of the
  dense matmul rate measured in the same run, at the precision training uses.
- **memory**: the peak of each part (CUDA: allocated tensor memory; CPU: the process's peak resident size
  so far, which only grows).

Throughputs are steady-state: from the first log point to the last, so model building, the first
steps and the held-out evaluation are left out of both engines alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import resource
import sys
import time

import torch

from archbench.env import environment, resolve_device
from archbench.progress import Progress

# (depths, temperatures, teacher seeds, teacher kinds, preset) per device type; "paper" is the paper's toy sweep
SWEEPS = {
    "cpu": ((4, 8, 16), (1.0, 0.5, 0.25, 0.1), (0,), ("independent",), "quick"),
    "cuda": ((6, 12, 16, 24, 32, 48), tuple(round(10 ** (-2 + 2 * i / 15), 4) for i in range(16)), (0, 1, 2),
             ("independent", "tied"), "paper"),
}
# lm-char with the residual block: (width, depth, heads, seq_len, batch)
SEQUENCE = {"cpu": (128, 4, 4, 128, 16), "cuda": (1024, 8, 16, 1024, 16)}


@dataclasses.dataclass
class BenchSpec:
    device: str = "auto"
    steps: int | None = None  # timed training steps per measurement (default: 100)
    parts: tuple[str, ...] = ("sweep", "sequence")
    sweep: str | None = None  # "quick" or "paper" (default: quick on a CPU, paper on a GPU)


class _Clock:
    """Steady-state throughput from log-point timestamps: (steps between first and last) / seconds; also
    the progress line of what it times."""

    def __init__(self, device, progress=None, label: str = "", total: int | None = None):
        self.device, self.marks = device, []
        self.progress, self.bar = progress, progress.add(label, total) if progress is not None else None

    def __call__(self, step, loss=None):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((step, time.perf_counter()))
        if self.bar is not None:
            losses = [v for v in (loss if isinstance(loss, list) else [loss]) if v is not None]
            self.progress.update(self.bar, completed=step, info=f"loss {min(losses):.3g}" if losses else "")

    def steps_and_seconds(self):
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return s1 - s0, t1 - t0


def _progress(console):
    """Progress bars (or, in a log file, timed lines) when there is a console to show them."""
    return Progress(console) if console is not None else contextlib.nullcontext()


def _peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"peak_cuda_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)}
    return {"peak_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)}


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sweep_part(device, steps: int, which: str, console=None) -> dict:
    from archbench.batched import Job, train_batched
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import EvalSpec, resolve_config
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig, train

    depths, temps, teachers, kinds, preset = SWEEPS["cuda" if which == "paper" else "cpu"]
    c = resolve_config(EvalSpec(block="residual-mlp", task="teacher-student", preset=preset))
    log_every = max(steps // 5, 1)
    cfg = TrainConfig(**{**c.train, "steps": steps + log_every, "log_every": log_every, "checkpoint_every": 0})
    block, task_entry = BLOCKS.get("residual-mlp"), TASKS.get("teacher-student")
    tasks = {(k, s, t): make_task(task_entry, {**c.task, "teacher": k, "teacher_seed": s, "temperature": t,
                                                "eval_batches": 1}, device)
             for k in kinds for s in teachers for t in temps}

    def jobs(keys):
        return [Job(new_model(block, c, d, 0, tasks[key]), tasks[key], cfg, 0, d, str(d)) for key in keys for d in depths]

    def throughput(clock, n_students):
        n, sec = clock.steps_and_seconds()
        return n * n_students * cfg.batch_size / sec

    say = console.print if console else (lambda *a: None)
    one_slice = [next(iter(tasks))]
    say(f"sweep: plain loop, {len(depths)} students one after another")
    _reset_memory(device)
    plain_n, plain_s = 0, 0.0
    with _progress(console) as progress:
        for job in jobs(one_slice):
            clock = _Clock(device, progress, f"plain loop, depth {job.depth}", cfg.steps)
            train(job.model, job.task, cfg, seed=0, depth=job.depth, on_log=clock)
            n, sec = clock.steps_and_seconds()
            plain_n, plain_s = plain_n + n * cfg.batch_size, plain_s + sec
    plain = {"students": len(depths), "samples_per_s": plain_n / plain_s, **_peak_memory(device)}

    results = {}
    for label, keys in (("slice", one_slice), ("sweep", list(tasks))):
        say(f"sweep: batched engine, {len(keys) * len(depths)} students together")
        _reset_memory(device)
        batch = jobs(keys)
        with _progress(console) as progress:
            clock = _Clock(device, progress, f"batched, {len(batch)} students", cfg.steps)
            train_batched(batch, on_log=clock)
        results[label] = {"students": len(batch), "samples_per_s": throughput(clock, len(batch)),
                          **_peak_memory(device)}
    full = results["sweep"]
    return {
        "what": f"teacher-student, residual-mlp, {preset} preset training (batch {cfg.batch_size}), depths "
                f"{list(depths)}, {len(temps)} temperatures, teacher seeds {list(teachers)}, kinds {list(kinds)}",
        "timed_steps": steps, "plain": plain, "batched_slice": results["slice"], "batched_sweep": full,
        "speedup": full["samples_per_s"] / plain["samples_per_s"],
        "speedup_slice": results["slice"]["samples_per_s"] / plain["samples_per_s"],
        # the whole sweep at the preset's step count, from the rates above
        "projected": {"steps": c.train["steps"],
                      "batched_h": full["students"] * c.train["steps"] * cfg.batch_size / full["samples_per_s"] / 3600,
                      "plain_h": full["students"] * c.train["steps"] * cfg.batch_size / plain["samples_per_s"] / 3600},
    }


def matmul_rate(device, dtype, seconds: float = 4.0) -> dict:
    """The best dense square matmul FLOP/s over a few sizes (each warmed up, then timed for a share of
    ``seconds``): the machine's own attainable rate at this precision, not a datasheet figure."""
    best = {"flops_per_s": 0.0}
    sizes = (256, 512, 1024, 2048) if device.type == "cpu" else (4096, 8192, 16384)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for timed in (False, True):  # the first pass warms up
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / len(sizes) / (1 if timed else 4):
                c = a @ b
                reps += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
        if rate > best["flops_per_s"]:
            best = {"flops_per_s": rate, "n": n, "dtype": str(dtype).removeprefix("torch.")}
        del a, b, c
    return best


def sequence_part(device, steps: int, console=None) -> dict:
    from archbench.nn import flop_counter
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import EvalSpec, resolve_config
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig, autocast_for, train

    width, depth, heads, seq_len, batch = SEQUENCE[device.type]
    c = resolve_config(EvalSpec(block="residual", task="lm-char", preset="quick",
                                sets={"model": {"width": str(width)}, "block": {"heads": str(heads)},
                                      "task": {"seq_len": str(seq_len), "eval_batches": "1"}}))
    log_every = max(steps // 5, 1)
    cfg = TrainConfig(**{**c.train, "steps": steps + log_every, "batch_size": batch, "log_every": log_every,
                         "checkpoint_every": 0})
    task = make_task(TASKS.get("lm-char"), c.task, device)
    model = new_model(BLOCKS.get("residual"), c, depth, 0, task)
    precision = "bf16" if cfg.precision == "bf16" or (device.type == "cuda" and cfg.precision == "auto") else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    say = console.print if console else (lambda *a: None)
    say(f"sequence: matmul rate ({str(dtype).removeprefix('torch.')})")
    peak = matmul_rate(device, dtype)

    x, y = task.batch(batch, torch.Generator(device=device).manual_seed(1))
    counter = flop_counter()
    with counter:
        with autocast_for(device, cfg.precision):
            logits = model(x)
        task.loss(logits, y).backward()
    model.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    say(f"sequence: residual, width {width}, depth {depth}, {seq_len} tokens × {batch}")
    _reset_memory(device)
    with _progress(console) as progress:
        clock = _Clock(device, progress, f"residual on lm-char, depth {depth}", cfg.steps)
        train(model, task, cfg, seed=0, depth=depth, on_log=clock)
    n, sec = clock.steps_and_seconds()
    achieved = flops_per_step * n / sec
    return {"what": f"lm-char, residual block, width {width}, depth {depth}, heads {heads}, seq_len {seq_len}, "
                    f"batch {batch}, {precision}",
            "params": sum(p.numel() for p in model.parameters()), "timed_steps": n,
            "tokens_per_s": n * batch * seq_len / sec, "flops_per_step": flops_per_step,
            "achieved_flops_per_s": achieved, "matmul_peak": peak, "fraction_of_matmul_peak": achieved / peak["flops_per_s"],
            **_peak_memory(device)}


def machine(device) -> dict:
    out = {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        out["ram_gib"] = round(pages * size / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": prop.name, "memory_gib": round(prop.total_memory / 2 ** 30, 1),
                      "capability": f"{prop.major}.{prop.minor}"}
    return out


def run_bench(spec: BenchSpec, console=None) -> dict:
    device = resolve_device(spec.device)
    steps = spec.steps or 100
    record = {"bench_version": 1, "command": sys.argv, "env": environment(device), "machine": machine(device),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if "sweep" in spec.parts:
        record["sweep"] = sweep_part(device, steps, spec.sweep or ("paper" if device.type == "cuda" else "quick"),
                                     console)
    if "sequence" in spec.parts:
        record["sequence"] = sequence_part(device, steps, console)
    return record
