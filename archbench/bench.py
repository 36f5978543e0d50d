"""``archbench bench``: how fast this machine trains archbench's models, measured in one run.

- **sweep**: a teacher-student depth sweep (depths × temperatures × teachers × teacher kinds) trained
  by the batched engine, eager and compiled, against the plain loop training one student after
  another. The plain loop is timed on one (temperature, teacher) slice, one student per depth: every
  slice has the same depths, so its samples per second is the whole sweep's. The batched engine is
  timed on the whole sweep and, for a like-for-like figure, on that one slice (what ``archbench eval``
  at a preset trains).
- **sequence**: the ``residual`` block on ``lm-char``, one model, the plain loop.
- **sequence-sweep**: ``residual`` on ``cfg-language`` (compositional), 3 seeds × the preset's depths,
  through the batched engine, against the plain loop on one seed's depths.
- **projection**: the paper's exp-9-3 sweep at one temperature (both teacher kinds, three teachers,
  six depths, batch 1,024, fp32), timed for a few steps with the fastest engine and projected to its
  80,000 steps.

Every row gives achieved FLOP/s, counted by ``archbench.nn.flop_counter`` on one training step (a
shared teacher forward once, every model's forward and backward), as a fraction of the dense matmul
rate measured in the same run at the precision training uses, and the peak memory (CUDA: allocated
tensor memory; CPU: the process's peak resident size so far, which only grows). Throughputs are
steady-state: from the first log point to the last, so model building, compiling, the first steps
and the held-out evaluation are left out of every engine alike.
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
# a multi-seed sequence sweep through the batched engine: (block, task, preset, seeds)
SEQUENCE_SWEEP = ("residual", "cfg-language", "quick", 3)
# the projection: the exp-9-3 sweep at one temperature, (preset, teacher kinds, teachers)
PROJECTION = ("paper-long", ("independent", "tied"), 3)
PARTS = ("sweep", "sequence", "sequence-sweep", "projection")


@dataclasses.dataclass
class BenchSpec:
    device: str = "auto"
    steps: int | None = None  # timed training steps per measurement (default: 100)
    parts: tuple[str, ...] = PARTS
    sweep: str | None = None  # "quick" or "paper" (default: quick on a CPU, paper on a GPU)
    compile: bool = True  # also time the compiled batched engine (and project with it)


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


def training_flops(jobs) -> int:
    """FLOPs of one training step of ``jobs`` together, counted by ``archbench.nn.flop_counter``: the shared
    draw of each distinct stream once (a teacher's forward pass) and every run's forward and backward."""
    from archbench.nn import flop_counter

    total, streams = 0, set()
    for j in jobs:
        batch = j.cfg.batch_size
        if (j.task.stream_key(), j.seed) not in streams:
            streams.add((j.task.stream_key(), j.seed))
            with flop_counter() as counter:
                j.task.draw(batch, torch.Generator(device=j.task.device).manual_seed(0))
            total += counter.get_total_flops()
        x, y = j.task.batch(batch, torch.Generator(device=j.task.device).manual_seed(0))
        with flop_counter() as counter:
            j.task.loss(j.model(x), y).backward()
        j.model.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
    return total


class _Rates:
    """The rows of one part: each engine's steady-state rate, as samples/s, FLOP/s and its fraction of the
    measured matmul rate."""

    def __init__(self, device, console, peak: dict, batch: int, tokens_per_sample: int = 1):
        self.device, self.console, self.peak = device, console, peak
        self.batch, self.tokens = batch, tokens_per_sample

    def batched(self, label: str, jobs: list, compiled: bool) -> dict:
        from archbench.batched import train_batched

        flops = training_flops(jobs)
        _reset_memory(self.device)
        with _progress(self.console) as progress:
            clock = _Clock(self.device, progress, label, jobs[0].cfg.steps)
            train_batched(jobs, on_log=clock, compiled=compiled)
        n, sec = clock.steps_and_seconds()
        return self.row(len(jobs), n * len(jobs) * self.batch, n * flops, sec, flops)

    def plain(self, jobs: list) -> dict:
        """The plain loop, one run after another: the runs' samples and FLOPs over their summed times."""
        from archbench.train import train

        samples = flops = seconds = 0.0
        _reset_memory(self.device)
        with _progress(self.console) as progress:
            for j in jobs:
                step_flops = training_flops([j])
                clock = _Clock(self.device, progress, f"plain loop, depth {j.depth}", j.cfg.steps)
                train(j.model, j.task, j.cfg, seed=j.seed, depth=j.depth, on_log=clock)
                n, sec = clock.steps_and_seconds()
                samples, flops, seconds = samples + n * self.batch, flops + n * step_flops, seconds + sec
        return self.row(len(jobs), samples, flops, seconds)

    def row(self, students, samples, flops, seconds, flops_per_step=None) -> dict:
        out = {"students": students, "samples_per_s": samples / seconds, "achieved_flops_per_s": flops / seconds,
               "fraction_of_matmul_peak": flops / seconds / self.peak["flops_per_s"]}
        if self.tokens > 1:
            out["tokens_per_s"] = samples * self.tokens / seconds
        if flops_per_step is not None:
            out["flops_per_step"] = flops_per_step
        return {**out, **_peak_memory(self.device)}


def _log_every(steps: int) -> int:
    """About ``steps`` / 5, and from ``DRAW_AHEAD`` on a whole number of the compiled engine's draw-ahead
    chunks, so that each timed interval holds as many of the chunks' teacher passes as steps."""
    from archbench.batched import DRAW_AHEAD

    every = max(1, round(steps / 5))
    return every if every < DRAW_AHEAD else DRAW_AHEAD * round(every / DRAW_AHEAD)


def _precision_dtype(device, precision: str):
    return torch.bfloat16 if precision == "bf16" or (device.type == "cuda" and precision == "auto") else torch.float32


def sweep_part(device, steps: int, which: str, peaks, compiled: bool, console=None) -> dict:
    from archbench.batched import Job
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import EvalSpec, resolve_config
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig

    depths, temps, teachers, kinds, preset = SWEEPS["cuda" if which == "paper" else "cpu"]
    c = resolve_config(EvalSpec(block="residual-mlp", task="teacher-student", preset=preset))
    log_every = _log_every(steps)
    cfg = TrainConfig(**{**c.train, "steps": 6 * log_every, "log_every": log_every, "checkpoint_every": 0})
    block, task_entry = BLOCKS.get("residual-mlp"), TASKS.get("teacher-student")
    tasks = {(k, s, t): make_task(task_entry, {**c.task, "teacher": k, "teacher_seed": s, "temperature": t,
                                                "eval_batches": 1}, device)
             for k in kinds for s in teachers for t in temps}

    def jobs(keys):
        return [Job(new_model(block, c, d, 0, tasks[key]), tasks[key], cfg, 0, d, str(d)) for key in keys for d in depths]

    say = console.print if console else (lambda *a: None)
    rates = _Rates(device, console, peaks(_precision_dtype(device, cfg.precision)), cfg.batch_size)
    one_slice, everything = [next(iter(tasks))], list(tasks)
    say(f"sweep: plain loop, {len(depths)} students one after another")
    out = {"plain": rates.plain(jobs(one_slice))}
    for engine, flag in (("batched", False), ("compiled", True))[:2 if compiled else 1]:
        for label, keys in (("slice", one_slice), ("sweep", everything)):
            say(f"sweep: {engine} engine, {len(keys) * len(depths)} students together")
            out[f"{engine}_{label}"] = rates.batched(f"{engine}, {len(keys) * len(depths)} students", jobs(keys), flag)
    best = out["compiled_sweep" if compiled else "batched_sweep"]
    for row in out.values():
        row["x_plain"] = row["samples_per_s"] / out["plain"]["samples_per_s"]
    return {
        "what": f"teacher-student, residual-mlp, {preset} preset training (batch {cfg.batch_size}), depths "
                f"{list(depths)}, {len(temps)} temperatures, teacher seeds {list(teachers)}, kinds {list(kinds)}",
        "timed_steps": 5 * log_every, "matmul_peak": rates.peak, **out,
        # the whole sweep at the preset's step count, from the rates above
        "projected": {"steps": c.train["steps"],
                      "best_h": best["students"] * c.train["steps"] * cfg.batch_size / best["samples_per_s"] / 3600,
                      "plain_h": best["students"] * c.train["steps"] * cfg.batch_size / out["plain"]["samples_per_s"] / 3600},
    }


def sequence_sweep_part(device, steps: int, peaks, compiled: bool, console=None) -> dict:
    """A multi-seed sweep of a sequence model on a compositional task: plain loop (one seed's depths)
    against the batched engine on all seeds, eager and compiled."""
    from archbench.batched import Job
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import EvalSpec, resolve_config
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig

    block_name, task_name, preset, seeds = SEQUENCE_SWEEP
    c = resolve_config(EvalSpec(block=block_name, task=task_name, preset=preset))
    log_every = _log_every(steps)
    cfg = TrainConfig(**{**c.train, "steps": 6 * log_every, "log_every": log_every, "checkpoint_every": 0})
    task = make_task(TASKS.get(task_name), c.task, device)
    block = BLOCKS.get(block_name)

    def jobs(n_seeds):
        return [Job(new_model(block, c, d, s, task), task, cfg, s, d, str(d)) for s in range(n_seeds) for d in c.depths]

    say = console.print if console else (lambda *a: None)
    rates = _Rates(device, console, peaks(_precision_dtype(device, cfg.precision)), cfg.batch_size, task.input.seq_len)
    say(f"sequence sweep: plain loop, {len(c.depths)} models one after another")
    out = {"plain": rates.plain(jobs(1))}
    for engine, flag in (("batched", False), ("compiled", True))[:2 if compiled else 1]:
        say(f"sequence sweep: {engine} engine, {seeds * len(c.depths)} models together")
        out[engine] = rates.batched(f"{engine}, {seeds * len(c.depths)} models", jobs(seeds), flag)
    for row in out.values():
        row["x_plain"] = row["samples_per_s"] / out["plain"]["samples_per_s"]
    return {"what": f"{task_name}, {block_name}, {preset} preset (width {c.model['width']}, seq_len {task.input.seq_len}, "
                    f"batch {cfg.batch_size}), depths {c.depths}, {seeds} seeds",
            "timed_steps": 5 * log_every, "matmul_peak": rates.peak, **out}


def projection_part(device, steps: int, peaks, compiled: bool, console=None) -> dict:
    """The paper's exp-9-3 sweep at one temperature (both teacher kinds, three teachers, six depths, batch
    1,024, fp32) timed for a few steps with the fastest engine, projected to its 80,000 steps."""
    from archbench.batched import Job
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import EvalSpec, resolve_config
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig

    preset, kinds, teachers = PROJECTION
    c = resolve_config(EvalSpec(block="residual-mlp", task="teacher-student", preset=preset))
    log_every = _log_every(max(steps // 5, 10))
    cfg = TrainConfig(**{**c.train, "steps": 3 * log_every, "log_every": log_every, "checkpoint_every": 0,
                         "eval_every": 0})
    block, task_entry = BLOCKS.get("residual-mlp"), TASKS.get("teacher-student")
    tasks = [make_task(task_entry, {**c.task, "teacher": k, "teacher_seed": s, "eval_batches": 1}, device)
             for k in kinds for s in range(teachers)]
    jobs = [Job(new_model(block, c, d, 0, t), t, cfg, 0, d, str(d)) for t in tasks for d in c.depths]
    say = console.print if console else (lambda *a: None)
    say(f"projection: exp-9-3 at one temperature, {len(jobs)} students together")
    rates = _Rates(device, console, peaks(_precision_dtype(device, cfg.precision)), cfg.batch_size)
    row = rates.batched(f"exp-9-3, {len(jobs)} students", jobs, compiled)
    total = c.train["steps"]
    return {"what": f"exp-9-3 ({preset}): temperature {c.task['temperature']}, kinds {list(kinds)}, teachers "
                    f"0..{teachers - 1}, depths {c.depths}, batch {cfg.batch_size}, {cfg.precision}, "
                    f"{'compiled' if compiled else 'eager'} batched engine",
            "timed_steps": 2 * log_every, "matmul_peak": rates.peak, **row, "steps": total,
            "projected_h": total * row["students"] * cfg.batch_size / row["samples_per_s"] / 3600}


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


def sequence_part(device, steps: int, peaks, console=None) -> dict:
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
    dtype = _precision_dtype(device, cfg.precision)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    say = console.print if console else (lambda *a: None)
    peak = peaks(dtype)

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
    record = {"bench_version": 2, "command": sys.argv, "env": environment(device), "machine": machine(device),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    measured = {}

    def peaks(dtype) -> dict:  # the matmul rate at each precision, measured once in the run
        if dtype not in measured:
            if console:
                console.print(f"matmul rate ({str(dtype).removeprefix('torch.')})")
            measured[dtype] = matmul_rate(device, dtype)
        return measured[dtype]

    if "sweep" in spec.parts:
        record["sweep"] = sweep_part(device, steps, spec.sweep or ("paper" if device.type == "cuda" else "quick"),
                                     peaks, spec.compile, console)
    if "sequence" in spec.parts:
        record["sequence"] = sequence_part(device, steps, peaks, console)
    if "sequence-sweep" in spec.parts:
        record["sequence_sweep"] = sequence_sweep_part(device, steps, peaks, spec.compile, console)
    if "projection" in spec.parts:
        record["projection"] = projection_part(device, steps, peaks, spec.compile, console)
    return record
