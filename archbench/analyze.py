"""``archbench analyze``: the per-model evaluators on a pretrained Hugging Face causal LM.

spec (model, text, tokens, evaluators and their knobs)
  -> load the model (``archbench.hf``) and cut the text into windows of its tokens
  -> each evaluator in turn, saving the result JSON after each (a rerun resumes after the last one finished)
  -> figures beside the result JSON

::

    from archbench.analyze import AnalyzeSpec, run_analyze

    result = run_analyze(AnalyzeSpec(hf_model="smollm2-135m", tokens=4096))
    result["metrics"]["layer-similarity"]["halves"]
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from archbench.env import environment, resolve_device
from archbench.errors import UsageError, unknown
from archbench.hf import HFStreamModel, load_hf_model
from archbench.knobs import resolve
from archbench.progress import Progress
from archbench.records import atomic_write_text, digest
from archbench.registry import EVALUATORS, Entry
from archbench.tasks.hf_text import HFTextTask

__all__ = ["AnalyzeSpec", "run_analyze", "DEFAULT_EVALUATORS", "DTYPES"]

DEFAULT_EVALUATORS = ("layer-similarity", "skip-sensitivity")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class AnalyzeSpec:
    hf_model: str  # a checkpoint directory, a .gguf file, a model id in the local HF cache, or smollm2-135m
    text: str | None = None  # UTF-8 text file to measure on; None: Python's bundled docs
    tokens: int = 20_000  # tokens of text to measure on
    seq_len: int = 256  # tokens per window
    evaluators: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_EVALUATORS))  # per-model ones
    sets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # evaluator -> knob -> raw value
    device: str = "auto"
    dtype: str = "float32"  # a key of DTYPES
    out: str | None = None  # result JSON; None: runs/analyze/<model>__<config hash>.json


def run_analyze(spec: AnalyzeSpec, console: Console | None = None) -> dict:
    """Load the model, run each evaluator not already in the result file, draw the figures; returns the result dict.

    The result JSON is rewritten after every evaluator, so an interrupted analysis resumes after the
    last one that finished (when the model, text and knobs are the same). ``console`` (stderr by
    default) shows the loading status and the evaluators' progress bars.
    """
    console = console or Console(stderr=True, highlight=False)
    if spec.tokens < spec.seq_len:
        raise UsageError(f"--tokens {spec.tokens}: need at least one window of --seq-len {spec.seq_len} tokens")
    entries = model_evaluators(spec.evaluators)
    knobs = evaluator_knobs(entries, spec.sets, spec.tokens)
    if spec.dtype not in DTYPES:
        raise unknown("--dtype", spec.dtype, DTYPES)
    device = resolve_device(spec.device)

    t0 = time.perf_counter()
    with console.status(f"loading {spec.hf_model} …"):
        model, task = load_model_and_text(spec, device)
    load_s = time.perf_counter() - t0
    described = model.describe()
    config = {"model": described["source"] if "source" in described else spec.hf_model, "text": task.describe(),
              "evaluators": knobs, "versions": {n: e.version for n, e in entries.items()}, "dtype": spec.dtype}
    path = result_path(spec, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _load_previous(path, config)
    result = {"model": described, "task": task.describe(), "config": config, "metrics": previous.get("metrics", {}),
              "timing_s": previous.get("timing_s", {}), "command": sys.argv, "env": environment(device)}
    result["timing_s"]["load"] = round(load_s, 2)

    _measure(result, entries, knobs, model, task, path, console)
    result.update(_peak_memory(device))
    result["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    result["files"] = {"result": str(path), "plots": _plot(result, entries, knobs, path)}
    _save(path, result)
    return result


def model_evaluators(names: list[str]) -> dict[str, Entry]:
    """The registry entries of ``names``; each must be a per-model evaluator (one model, not a depth sweep)."""
    entries = {n: EVALUATORS.get(n) for n in names}
    for n, e in entries.items():
        if e.obj.kind != "model":
            model_kind = [x.name for x in EVALUATORS.entries() if x.obj.kind == "model"]
            raise UsageError(f"--evaluators: {n!r} needs a depth sweep, not one pretrained model; "
                             f"per-model evaluators: {', '.join(model_kind)}")
    return entries


def evaluator_knobs(entries: dict[str, Entry], sets: dict[str, dict[str, Any]], tokens: int) -> dict[str, dict]:
    """Each evaluator's resolved knobs: its defaults, then ``sets``. layer-similarity measures all ``tokens``
    unless told otherwise; the others keep their own ``max_tokens``."""
    for section in sets:
        if section not in entries:
            raise unknown("--set section", section, entries)
    defaults = {"layer-similarity": {"max_tokens": tokens}}
    return {n: resolve(e.obj, n, {**defaults.get(n, {}), **sets.get(n, {})}) for n, e in entries.items()}


def load_model_and_text(spec: AnalyzeSpec, device: torch.device) -> tuple[HFStreamModel, HFTextTask]:
    """The pretrained model in eval mode on ``device``, and the text cut into windows of its tokens."""
    hf, tokenizer = load_hf_model(spec.hf_model, device=device, dtype=DTYPES[spec.dtype])
    model = HFStreamModel(hf).eval()
    task = HFTextTask(tokenizer, device=device, seq_len=spec.seq_len, max_tokens=spec.tokens, text_file=spec.text)
    return model, task


def result_path(spec: AnalyzeSpec, config: dict) -> Path:
    """``spec.out``, or runs/analyze/<model>__<hash of config>.json (the same analysis finds the same file)."""
    if spec.out:
        return Path(spec.out)
    return Path("runs") / "analyze" / f"{_slug(spec.hf_model)}__{digest(config)[:8]}.json"


def _measure(result: dict, entries: dict[str, Entry], knobs: dict, model: HFStreamModel, task: HFTextTask,
             path: Path, console: Console) -> None:
    """Run each evaluator whose metrics ``result`` lacks, saving ``result`` to ``path`` after each."""
    with Progress(console) as progress:
        for name, entry in entries.items():
            if name in result["metrics"]:
                console.print(f"{name}: reusing the result in {path}")
                continue
            ev = entry.obj(**knobs[name])
            bar = progress.add(name, total=100, unit="percent")
            ev.on_progress = lambda frac, bar=bar: progress.update(bar, completed=100 * frac)
            t = time.perf_counter()
            result["metrics"][name] = ev.evaluate_model(model, task)
            result["timing_s"][name] = round(time.perf_counter() - t, 2)
            progress.remove(bar)
            _save(path, result)  # an interrupted analysis resumes after the last finished evaluator


def _peak_memory(device: torch.device) -> dict[str, float]:
    import resource  # Unix only, like the measurement

    peak = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return peak


def _plot(result: dict, entries: dict[str, Entry], knobs: dict, path: Path) -> list[str]:
    """Each evaluator's figure beside the result JSON (``<result>.<evaluator>.png``); the paths drawn."""
    plots = []
    for name, entry in entries.items():
        if entry.obj(**knobs[name]).plot(result["metrics"][name], [], png := path.with_suffix(f".{name}.png")):
            plots.append(str(png))
    return plots


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)[:60]


def _load_previous(path: Path, config: dict) -> dict:
    """The result saved at ``path`` by an earlier run of the same analysis (same config), else {}."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old if old.get("config") == config else {}


def _save(path: Path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, indent=1, default=str))
