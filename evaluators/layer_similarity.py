"""layer-similarity: how alike a trained model's layers are, measured on held-out tokens.

On h_0 … h_L (the residual stream at each layer boundary) and, where a block has them, its
attention and MLP outputs a_l and m_l (taps ``attn_out``, ``mlp_out``):

- Liu et al. 2026, per layer: angular update θ_l = ∠(h_l, h_{l+1}); neighbouring-update angle
  φ_l = ∠(Δh_l, Δh_{l+1}); ‖h_l‖; ∠(h_l, h_L); progress along the chord
  s_l = ⟨h_l − h_0, h_L − h_0⟩ / ‖h_L − h_0‖²; the loss of h_l fed straight into the last layer.
- Token classes (the paper's clustering rule is not public; this is archbench's): over the middle
  layers (all but the first and the last), a token *stops early* when its θ summed over the second
  half of them is below ``stop_ratio`` × its sum over the first half; otherwise it is *evenly in the
  middle* when its middle θ have a coefficient of variation ≤ ``even_cv`` and the first and last
  layers' θ are both at least the middle mean; the rest are *other*. Needs 4 or more layers.
- Csordás et al. 2025: relative contributions ‖c_l‖/‖h_l‖, ‖a_l‖/‖h_l‖, ‖m_l‖/‖h_l + a_l‖ with
  c_l = h_{l+1} − h_l, and the cosine of each with the residual it is added to.
- Logit lens: p_l = readout(h_l) (the model's own final norm and head); KL(p_l ‖ p_L), top-5
  overlap with the final prediction, and the task loss of p_l.
- Gromov et al. 2024: angular distance arccos(cos)/π between every pair of states, as a mean over
  all tokens (``angular_distance``) and, as the paper measures it, at the last token of each
  sequence (``angular_distance_last``); for each block size n the start ℓ whose d(h_ℓ, h_{ℓ+n}) is
  smallest is the most prunable (``prunable``, ``prunable_last``).
  Block Influence (ShortGPT) 1 − cos(h_l, h_{l+1}).
- Linear CKA between every pair of states (exact, or the unbiased minibatch estimator).

Angles are in radians. Everything is a token mean, streamed over batches; per-token θ profiles
are returned only with ``per_token=true``. The logit lens and the last-layer loss cost one readout
or one forward per layer, so they use the first ``lens_tokens`` tokens only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

import archbench
from archbench.evaluator import Evaluator, panels
from archbench.knobs import NON_NEGATIVE, POSITIVE, Range
from archbench.measure import (
    CKA,
    Sums,
    angle,
    cosine,
    flat_states,
    halves,
    probs_stats,
    rel_norm,
    token_batches,
    tolist,
)
from archbench.model import run, trace
from archbench.records import RunRecord

CITATION = ("Liu et al. 2026 (arXiv 2602.05970); Csordás et al. 2025 (arXiv 2505.13898); "
            "Gromov et al. 2024 (arXiv 2403.17887); Men et al. 2024 (ShortGPT); Kornblith et al. 2019 (CKA)")


def angular_distances(s: torch.Tensor) -> torch.Tensor:
    """arccos(cos)/π between every pair of states, per token: (L+1, N, D) -> (L+1, L+1, N)."""
    sn = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.arccos(torch.einsum("ind,jnd->ijn", sn, sn).clamp(-1.0, 1.0)) / torch.pi


# 2: angular distance and prunable blocks at the last token too (angular_distance_last, prunable_last)
@archbench.register_evaluator("layer-similarity", family="similarity", citation=CITATION, version=2)
class LayerSimilarity(Evaluator):
    """Per-layer update angles, relative contributions, logit lens, angular distances and CKA."""

    kind = "model"

    def __init__(self, *,
                 max_tokens: Annotated[int, Range(16, 10_000_000), POSITIVE] = 8192,
                 lens_tokens: Annotated[int, Range(0, 10_000_000), NON_NEGATIVE] = 1024,
                 batch_tokens: Annotated[int, Range(16, 1_000_000), POSITIVE] = 4096,
                 cka: Literal["auto", "exact", "minibatch"] = "auto",
                 cka_batch: Annotated[int, Range(8, 8192), POSITIVE] = 256,
                 stop_ratio: Annotated[float, Range(0.0, 1.0), NON_NEGATIVE] = 0.1,
                 even_cv: Annotated[float, Range(0.0, 10.0), NON_NEGATIVE] = 0.5,
                 per_token: bool = False):
        self.max_tokens, self.lens_tokens, self.batch_tokens = max_tokens, lens_tokens, batch_tokens
        self.cka, self.cka_batch = cka, cka_batch
        self.stop_ratio, self.even_cv, self.per_token = stop_ratio, even_cv, per_token

    @torch.no_grad()
    def evaluate_model(self, model, task) -> dict:
        L = model.effective_depth
        sums, cka = Sums(), CKA(self.cka, self.cka_batch)
        classes = np.zeros(3)
        per_token_theta = []
        lens_seen = 0
        batches = token_batches(task, self.max_tokens, self.batch_tokens)
        for b, (x, y) in enumerate(batches):
            tr = trace(model, x)
            s = flat_states(tr.states)  # (L+1, N, D)
            self._stream_stats(s, tr.sublayers, sums)
            # Gromov et al. measure at the last token of each sequence only
            sums.add("angular_distance_last", angular_distances(torch.stack([h[:, -1] for h in tr.states])))
            theta = angle(s[:-1], s[1:])  # (L, N)
            if L >= 4:
                classes += self._classify(theta, sums)
            if self.per_token:
                per_token_theta.append(theta.T.cpu())
            cka.add(s)
            if lens_seen < self.lens_tokens:
                per_example = tr.states[0].shape[1]
                n = -(-(self.lens_tokens - lens_seen) // per_example)
                if n < x.shape[0]:  # a part of this batch, traced again on its own (resume needs its trace)
                    x, y = x[:n], y[:n]
                    tr = trace(model, x)
                lens_seen += self._lens(model, task, x, y, tr, sums)
            self.report((b + 1) / len(batches))
        out = {"tokens": sums.counts["theta"], "depth": L, "per_layer": {}, "per_state": {}}
        for name in ("theta", "phi", "block_influence", "rel_contribution", "cos_contribution", "attn_rel",
                     "attn_cos", "mlp_rel", "mlp_cos", "last_block_loss"):
            if name in sums:
                out["per_layer"][name] = tolist(sums.mean(name))
        for name in ("norm", "angle_to_final", "chord_progress", "lens_kl", "lens_top5", "lens_loss"):
            if name in sums:
                out["per_state"][name] = tolist(sums.mean(name))
        out["lens_tokens"] = sums.counts.get("lens_kl", 0)
        theta = sums.mean("theta")
        out["middle_theta"] = float(theta[1:-1].mean()) if L >= 3 else None
        out["token_classes"] = self._class_summary(classes, sums) if L >= 4 else None
        for suffix in ("", "_last"):  # all tokens (archbench's mean), the last token (Gromov et al.'s)
            dist = sums.mean("angular_distance" + suffix)
            out["angular_distance" + suffix] = tolist(dist)
            out["prunable" + suffix] = [
                {"n": n, "start": int(i), "distance": float(dist[i, i + n])}
                for n in range(1, L) for i in [int(np.argmin([dist[j, j + n] for j in range(L + 1 - n)]))]]
        out["cka"], out["cka_method"] = tolist(cka.matrix()), cka.method
        # first against second half of the layers (paper 2), also without the first and last layer,
        # whose large updates (embedding read-in, unembedding write-out) can dominate a half
        out["halves"] = {k: halves(out["per_layer"][k]) for k in ("rel_contribution", "cos_contribution", "theta")}
        out["halves_inner"] = {k: halves(out["per_layer"][k], skip_ends=True)
                               for k in ("rel_contribution", "cos_contribution", "theta")}
        if self.per_token:
            out["per_token_theta"] = torch.cat(per_token_theta).tolist()
        return out

    def _stream_stats(self, s, sublayers, sums: Sums):
        L = s.shape[0] - 1
        h, nxt, last, first = s[:-1], s[1:], s[-1], s[0]
        delta = nxt - h
        sums.add("theta", angle(h, nxt))
        if L >= 2:
            sums.add("phi", angle(delta[:-1], delta[1:]))
        sums.add("block_influence", 1 - cosine(h, nxt))
        sums.add("rel_contribution", rel_norm(delta, h))
        sums.add("cos_contribution", cosine(delta, h))
        sums.add("norm", s.norm(dim=-1))
        sums.add("angle_to_final", angle(s, last.expand_as(s)))
        chord = last - first
        sums.add("chord_progress", ((s - first) * chord).sum(-1) / chord.square().sum(-1).clamp_min(1e-12))
        # sublayers count only where every layer has them on the traced stream's positions
        # (an hourglass's inner layers run on a shortened sequence)
        a, m = (sublayer(sublayers, name, h.shape[1]) for name in ("attn_out", "mlp_out"))
        if a is not None:
            sums.add("attn_rel", rel_norm(a, h))
            sums.add("attn_cos", cosine(a, h))
        else:
            a = torch.zeros_like(h)
        if m is not None:
            sums.add("mlp_rel", rel_norm(m, h + a))
            sums.add("mlp_cos", cosine(m, h + a))
        sums.add("angular_distance", angular_distances(s))

    def _classify(self, theta, sums: Sums) -> np.ndarray:
        """Counts of (evenly in the middle, stops early, other) among these tokens (rule in the module doc)."""
        mid = theta[1:-1]
        half = mid.shape[0] // 2
        early = mid[mid.shape[0] - half:].sum(0) < self.stop_ratio * mid[:half].sum(0)
        mean = mid.mean(0)
        cv = mid.std(0, correction=0) / mean.clamp_min(1e-12)
        even = ~early & (cv <= self.even_cv) & (theta[0] >= mean) & (theta[-1] >= mean)
        other = ~early & ~even
        for name, mask in (("class_even", even), ("class_early", early), ("class_other", other)):
            sums.add(name, theta * mask.double())
        return np.array([even.sum().item(), early.sum().item(), other.sum().item()], float)

    def _class_summary(self, counts, sums: Sums) -> dict:
        total = max(counts.sum(), 1)
        out = {"rule": f"stops early: second-half middle θ sum < {self.stop_ratio} × first-half sum; evenly in the "
                       f"middle: middle θ CV ≤ {self.even_cv} and first and last θ ≥ middle mean"}
        for i, (key, name) in enumerate((("evenly_in_middle", "class_even"), ("stops_early", "class_early"),
                                         ("other", "class_other"))):
            out[key] = float(counts[i] / total)
            # sums hold θ·mask over all tokens: divide by the class count for the class's mean profile
            out[f"{key}_theta"] = tolist(sums.sums[name].cpu().numpy() / counts[i]) if counts[i] else None
        return out

    def _lens(self, model, task, x, y, tr, sums: Sums) -> int:
        """Logit lens and last-layer loss on this batch; returns its token count."""
        final = tr.logits.reshape(-1, tr.logits.shape[-1])
        kl, top5, loss = [], [], []
        for h in tr.states:
            logits = model.readout(h)
            st = probs_stats(logits.reshape(-1, logits.shape[-1]), final)
            kl.append(st["kl_to_ref"])
            top5.append(st["topk_overlap"])
            loss.append(task.loss(logits, y).reshape(1).expand(final.shape[0]))
        sums.add("lens_kl", torch.stack(kl))
        sums.add("lens_top5", torch.stack(top5))
        sums.add("lens_loss", torch.stack(loss))
        L = len(tr.states) - 1
        if L >= 1:
            losses = []
            for l in range(L):  # h_l straight into the last layer: replace the last layer's input
                logits = tr.logits if l == L - 1 else run(model, x, start=L - 1, h_start=tr.states[l])
                losses.append(task.loss(logits, y).reshape(1).expand(final.shape[0]))
            sums.add("last_block_loss", torch.stack(losses))
        return final.shape[0]

    def plot(self, result: dict, runs: list[RunRecord], path: Path) -> bool:
        res = deepest(result, runs)
        if res is None:
            return False
        with panels(path, 2, 3, (13, 7.5), f"layer-similarity, depth {res['depth']} ({res['tokens']} tokens)") as (fig, ax):
            layers = np.arange(1, res["depth"] + 1)
            pl, ps = res["per_layer"], res["per_state"]
            ax[0, 0].plot(layers, pl["theta"], "o-", label="θ_l update angle")
            if "phi" in pl:
                ax[0, 0].plot(layers[:-1] + 0.5, pl["phi"], "s-", label="φ_l neighbouring updates")
            ax[0, 0].axhline(np.pi / 2, color="grey", lw=0.8, ls=":")
            style_axes(ax[0, 0], "layer", "radians", "update angles")
            for key, label in (("rel_contribution", "layer ‖c‖/‖h‖"), ("attn_rel", "attention"), ("mlp_rel", "MLP")):
                if key in pl:
                    ax[0, 1].plot(layers, pl[key], "o-", label=label)
            ax[0, 1].set_yscale("log")
            style_axes(ax[0, 1], "layer", "relative contribution", "contribution (Csordás)")
            for key, label in (("cos_contribution", "layer"), ("attn_cos", "attention"), ("mlp_cos", "MLP")):
                if key in pl:
                    ax[0, 2].plot(layers, pl[key], "o-", label=label)
            ax[0, 2].axhline(0, color="grey", lw=0.8)
            style_axes(ax[0, 2], "layer", "cos(contribution, residual)", "writes new (<0) or reinforces (>0)")
            if "lens_kl" in ps:
                states = np.arange(res["depth"] + 1)
                ax[1, 0].plot(states, ps["lens_kl"], "o-", label="KL(p_l ‖ p_L)")
                ax[1, 0].plot(states, ps["lens_top5"], "s-", label="top-5 overlap")
                ax[1, 0].set_yscale("symlog", linthresh=1e-2)
            style_axes(ax[1, 0], "state l", "", "logit lens")
            heat(ax[1, 1], res["angular_distance"], "angular distance /π", fig)
            heat(ax[1, 2], res["cka"], f"linear CKA ({res['cka_method']})", fig)
        return True


def sublayer(sublayers: list[dict], name: str, tokens: int) -> torch.Tensor | None:
    """Tap ``name`` of every layer as one (L, tokens, D) tensor, or None where a layer lacks it or
    it does not cover the stream's tokens."""
    outs = [sub.get(name) for sub in sublayers]
    if not outs or any(t is None or t[..., 0].numel() != tokens for t in outs):
        return None
    return torch.stack([t.reshape(tokens, -1) for t in outs]).float()


def deepest(result: dict, runs: list[RunRecord]) -> dict | None:
    """The result to draw: a single model's, or the deepest run's in an eval sweep."""
    if "per_run" not in result:
        return result
    done = [(r.effective_depth, r.seed, result["per_run"][r.key]) for r in runs
            if result["per_run"].get(r.key)]
    return max(done, key=lambda t: (t[0], -t[1]))[2] if done else None


def style_axes(ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def heat(ax, matrix, title, fig, xlabel="state j", ylabel="state i"):
    """A matrix as a heat map with a colour bar."""
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
    im = ax.imshow(m, origin="upper", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
