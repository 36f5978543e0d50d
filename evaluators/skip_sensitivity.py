"""skip-sensitivity: what breaks when one effective layer is skipped (Csordás et al. 2025).

Skipping layer s sets h_{s+1} := h_s (variant ``layer``), or zeroes its attention or MLP output
only (``attn``, ``mlp``, where the block has those taps). Nothing is skipped at the first token of
a sequence (it is an attention sink in LLMs). Per skipped layer s:

- effect on every later layer j > s: ‖c_j − c̃_j‖ / ‖c_j‖ with c_j = h_{j+1} − h_j its contribution,
  as a token mean (``later_mean``) and a maximum over tokens (``later_max``, the paper's heat map);
- effect on the output, each a separately named metric: ``output_l2`` = ‖p − p̃‖₂ (the papers'
  measure), ``output_kl`` = KL(p ‖ p̃), ``top1_flip`` (how often the top prediction changes) and
  ``loss_increase`` (task loss with the skip minus without);
- ``future``: skip only at positions before t = ``future_at`` × sequence length and measure from t
  on (what a layer contributes to later tokens; sequence tasks only);
- ``local``: remove c_s from the input of every later layer without letting the change propagate
  (each later layer sees h_j − c_s), which isolates the direct use of c_s;
- the skip centre Σ s·e_s / Σ e_s, with e_s the mean ``later_mean`` effect of skipping s (layers
  counted from 0; the last layer has no later layers). ``skip_centre_relative`` divides by L − 1.
  A token mean at the skipped positions: not paper 2's depth score.
- ``depth_score``, as the authors compute it: per sequence (prompt), up to ``cut_points`` cuts t
  drawn from {8, 16, …} < T − 4 (one seeded Python ``random`` shuffle per prompt, in order, as the
  authors draw them, so the same windows get the same cuts); skip s at positions 1 … t − 1 only
  and take, for every later layer j, the maximum over positions ≥ t of ‖c_j − c̃_j‖/‖c_j‖; the
  maximum over the cuts gives the prompt's s × j matrix. Over prompts it is averaged
  (``later_mean``; ``value``) or maximised (``later_max``; ``value_max``); e_s is the row's sum
  over j > s divided by the L − 1 − s later layers, and the score is Σ s·e_s / Σ e_s
  (``relative``: divided by L − 1). The effect is measured at every position from the cut on, as
  the authors' generic script does; on their question data sets they read the answer positions.
  Sequences shorter than 13 tokens have no cut.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import archbench
from archbench.evaluator import Evaluator, panels
from archbench.evaluators.layer_similarity import deepest, heat, style_axes, sublayer
from archbench.knobs import FRACTION, NON_NEGATIVE, POSITIVE, Range
from archbench.measure import Sums, halves, probs_stats, rel_norm, token_batches, tolist
from archbench.model import run, trace
from archbench.records import RunRecord
from archbench.task import (
    IGNORE,  # targets before t are not scored in the future variant
)

OUTPUT = ("output_l2", "output_kl", "top1_flip", "loss_increase")


# 2: effect_on_later, depth_score renamed skip_effect, skip_centre; 3: halves of output_l2_max, the
# authors' depth_score; 4: depth_score's cuts drawn per prompt (were per batch)
@archbench.register_evaluator("skip-sensitivity", family="skipping", version=4,
                              citation="Csordás, Manning, Potts 2025 (arXiv 2505.13898)")
class SkipSensitivity(Evaluator):
    """Skip each effective layer (or its attention or MLP) and measure later layers and the output."""

    kind = "model"

    def __init__(self, *,
                 max_tokens: Annotated[int, Range(16, 10_000_000), POSITIVE] = 2048,
                 batch_tokens: Annotated[int, Range(16, 1_000_000), POSITIVE] = 2048,
                 sublayers: bool = True,
                 local: bool = True,
                 future: bool = True,
                 future_at: Annotated[float, Range(0.05, 0.95), FRACTION] = 0.5,
                 cut_points: Annotated[int, Range(0, 16), NON_NEGATIVE] = 4,
                 cut_seed: int = 123):
        self.max_tokens, self.batch_tokens = max_tokens, batch_tokens
        self.sublayers, self.local, self.future, self.future_at = sublayers, local, future, future_at
        self.cut_points, self.cut_seed = cut_points, cut_seed

    @torch.no_grad()
    def evaluate_model(self, model, task) -> dict:
        L = model.effective_depth
        sums = Sums()
        variants: list[str] = []
        batches = token_batches(task, self.max_tokens, self.batch_tokens)
        rng = random.Random(self.cut_seed)
        per_prompt: list[tuple[torch.Tensor, torch.Tensor]] = []  # (later (L, L, B), output (L, B)) per batch
        for b, (x, y) in enumerate(batches):
            clean = trace(model, x)
            T = clean.states[0].shape[1]
            cuts = [draw_cuts(rng, T, self.cut_points) for _ in range(x.shape[0])]
            if any(cuts):
                per_prompt.append(future_max(model, x, clean, cuts))
            variants = ["layer"]
            if self.sublayers and clean.sublayers:
                variants += [v for v, tap in (("attn", "attn_out"), ("mlp", "mlp_out"))
                             if sublayer(clean.sublayers, tap, clean.states[0][..., 0].numel()) is not None]
            variants += ["local"] * self.local + ["future"] * (self.future and T > 1)
            for v, variant in enumerate(variants):
                for s in range(L):
                    self._skip(model, task, x, y, clean, s, variant, sums)
                    self.report((b + (v + (s + 1) / L) / len(variants)) / len(batches))
        out = {"tokens": sums.counts.get("layer/0/output_l2", 0), "depth": L,
               "skipped_positions": "all but the first" if task.input.kind == "tokens" else "all",
               "variants": {}}
        for variant in variants:
            res = {}
            for kind in ("mean", "max"):
                m = np.full((L, L), np.nan)
                for s in range(L - 1):
                    m[s, s + 1:] = sums.mean(f"{variant}/{s}/later") if kind == "mean" else sums.max(f"{variant}/{s}/later")
                res[f"later_{kind}"] = tolist(m)
            for name in OUTPUT:
                res[name] = [float(sums.mean(f"{variant}/{s}/{name}")) for s in range(L)]
            res["output_l2_max"] = [float(sums.max(f"{variant}/{s}/output_l2")) for s in range(L)]
            if variant == "future":
                res["t"] = int(self.future_at * T)
            out["variants"][variant] = res
        e = [float(np.mean(sums.mean(f"layer/{s}/later"))) for s in range(L - 1)]
        out["skip_effect"] = e
        total = sum(e)
        out["skip_centre"] = sum(s * v for s, v in enumerate(e)) / total if total > 0 else None
        out["skip_centre_relative"] = out["skip_centre"] / (L - 1) if out["skip_centre"] is not None else None
        # paper 2 reduces ‖Δp‖₂ by the maximum over positions (then prompts); the token mean is kept beside it
        layer = out["variants"]["layer"]
        out["halves"] = {"output_l2_max": halves(layer["output_l2_max"]), "output_l2": halves(layer["output_l2"]),
                         "skip_effect": halves(e)}
        out["halves_inner"] = {"output_l2_max": halves(layer["output_l2_max"], skip_ends=True),
                               "output_l2": halves(layer["output_l2"], skip_ends=True),
                               "skip_effect": halves(e[1:])}  # e stops before the last layer
        out["depth_score"] = depth_score(per_prompt) if per_prompt else None
        return out

    def _skip(self, model, task, x, y, clean, s, variant, sums: Sums):
        states = clean.states
        B, T = states[0].shape[:2]
        pos = torch.arange(T, device=states[0].device).view(1, T, 1)
        t = int(self.future_at * T)
        skip_at = (pos >= 1) if T > 1 else torch.ones_like(pos, dtype=torch.bool)
        measure = torch.ones_like(pos, dtype=torch.bool).expand(B, T, 1)
        if variant == "future":
            skip_at, measure = skip_at & (pos < t), (pos >= t).expand(B, T, 1)
        keep = measure.reshape(-1)
        later = []
        removed = {}

        def on_layer(l, h_in, h_out):
            if l == s and variant in ("layer", "local", "future"):
                h = torch.where(skip_at, h_in, h_out)
                removed["c"] = h_out - h
            elif variant == "local" and l > s:
                h = states[l + 1] - removed["c"]  # the clean stream minus c_s: no propagation
            else:
                h = h_out
            if l > s:
                c, c_new = states[l + 1] - states[l], h_out - h_in
                later.append(rel_norm((c - c_new).reshape(-1, c.shape[-1]), c.reshape(-1, c.shape[-1]))[keep])
            return h

        def on_sublayer(l, name, out):
            if l == s and name == {"attn": "attn_out", "mlp": "mlp_out"}.get(variant):
                return torch.where(skip_at, torch.zeros_like(out), out)
            return None

        logits = run(model, x, on_layer, on_sublayer if variant in ("attn", "mlp") else None, start=s, h_start=states[s])
        if later:
            sums.add(f"{variant}/{s}/later", torch.stack(later), track_max=True)
        V = logits.shape[-1]
        pick = (lambda t: t) if variant != "future" else (lambda t: t[keep])  # no copy of (tokens, V) unless needed
        st = probs_stats(pick(logits.reshape(-1, V)), pick(clean.logits.reshape(-1, V)))
        n = int(keep.sum())
        sums.add(f"{variant}/{s}/output_l2", st["l2"], track_max=True)
        sums.add(f"{variant}/{s}/output_kl", st["kl_ref_to"])
        sums.add(f"{variant}/{s}/top1_flip", 1 - st["top1_same"])
        target = y
        if variant == "future":
            target = y.clone()
            target[:, :t] = IGNORE
        increase = (task.loss(logits, target) - task.loss(clean.logits, target)).float()
        sums.add(f"{variant}/{s}/loss_increase", increase.reshape(1).expand(n))

    def plot(self, result: dict, runs: list[RunRecord], path: Path) -> bool:
        res = deepest(result, runs)
        if res is None:
            return False
        with panels(path, 1, 3, (14, 4.2), f"skip-sensitivity, depth {res['depth']} ({res['tokens']} tokens)") as (fig, ax):
            heat(ax[0], res["variants"]["layer"]["later_max"], "skip s: max ‖Δc_j‖/‖c_j‖", fig,
                 xlabel="later layer j", ylabel="skipped layer s")
            layers = np.arange(res["depth"])
            for variant, r in res["variants"].items():
                ax[1].plot(layers, r["output_l2"], "o-", label=variant)
            ax[1].set_yscale("log")
            style_axes(ax[1], "skipped layer s", "‖p − p̃‖₂ (token mean)", "effect on the output")
            ax[2].plot(layers[:-1], res["skip_effect"], "o-", label="mean effect on later layers")
            if res["skip_centre"] is not None:
                ax[2].axvline(res["skip_centre"], color="k", ls=":", label=f"skip centre {res['skip_centre']:.2f}")
            style_axes(ax[2], "skipped layer s", "mean ‖Δc_j‖/‖c_j‖", "effect on later layers")
        return True


def draw_cuts(rng: random.Random, T: int, n: int) -> list[int]:
    """One prompt's cut points: the first ``n`` of {8, 16, …} < T − 4 after a shuffle by ``rng`` (the
    authors' draw: ``random.seed(123)`` once, then one shuffle per prompt)."""
    candidates = list(range(8, T - 4, 8))
    rng.shuffle(candidates)
    return candidates[:n]


def future_max(model, x, clean, cuts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt b, the maximum over its ``cuts[b]`` (and over positions from the cut on) of each later
    layer's relative change when s is skipped before the cut: (L, L, B); and of ‖p − p̃‖₂: (L, B).
    Each cut runs once, on the prompts that drew it."""
    B, L = x.shape[0], len(clean.states) - 1
    later = torch.zeros(L, L, B, dtype=torch.float64)
    output = torch.zeros(L, B, dtype=torch.float64)
    for t in sorted({t for row in cuts for t in row}):
        rows = [b for b in range(B) if t in cuts[b]]
        at_t = _future_at(model, x[rows], [h[rows] for h in clean.states], clean.logits[rows], t)
        later[..., rows] = torch.maximum(later[..., rows], at_t[0])
        output[:, rows] = torch.maximum(output[:, rows], at_t[1])
    return later, output


def _future_at(model, x, states, logits, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One cut t for every prompt of ``x``: skip each s at positions 1 … t − 1 and take the maximum over
    positions ≥ t of each later layer's relative change, (L, L, B), and of ‖p − p̃‖₂, (L, B), on the CPU."""
    (B, T), L = states[0].shape[:2], len(states) - 1
    # kept on x's device until the end: one transfer per cut, not one per layer pair
    later = torch.zeros(L, L, B, dtype=torch.float64, device=x.device)
    output = torch.zeros(L, B, dtype=torch.float64, device=x.device)
    pos = torch.arange(T, device=x.device).view(1, T, 1)
    skip_at = (pos >= 1) & (pos < t)  # the first token is never skipped
    ref = logits[:, t:].float().softmax(-1)
    for s in range(L):
        def on_layer(l, h_in, h_out, s=s):
            if l == s:
                return torch.where(skip_at, h_in, h_out)
            if l > s:
                c, c_new = (states[l + 1] - states[l])[:, t:], (h_out - h_in)[:, t:]
                change = (c - c_new).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-6)  # (B, T - t)
                later[s, l] = change.amax(-1)
            return h_out

        moved = run(model, x, on_layer, start=s, h_start=states[s])[:, t:].float().softmax(-1) - ref
        output[s] = moved.norm(dim=-1).amax(-1)
    return later.cpu(), output.cpu()


def depth_score(per_prompt: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Paper 2's depth score from each prompt's s × j maximum effects (see the module doc)."""
    later = torch.cat([m for m, _ in per_prompt], dim=-1).numpy()  # (L, L, prompts)
    output = torch.cat([o for _, o in per_prompt], dim=-1).numpy()
    L = later.shape[0]
    out = {"prompts": int(later.shape[-1]), "later_mean": tolist(later.mean(-1)), "later_max": tolist(later.max(-1)),
           "output_l2_mean": tolist(output.mean(-1)), "output_l2_max": tolist(output.max(-1))}
    for name, m in (("value", later.mean(-1)), ("value_max", later.max(-1))):
        e = np.array([m[s, s + 1:].sum() / (L - 1 - s) for s in range(L - 1)])
        out[name] = float((np.arange(L - 1) * e).sum() / e.sum()) if e.sum() > 0 else None
    out["relative"] = out["value"] / (L - 1) if out["value"] is not None and L > 1 else None
    return out
