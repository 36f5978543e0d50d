"""A pretrained Hugging Face causal LM seen through archbench's residual-stream protocol.

``HFStreamModel(hf)`` wraps a ``*ForCausalLM`` module: the decoder layers are the effective
layers; h_0 is the stream entering the first decoder layer and h_l the output of decoder layer l;
h_L is taken *before* the final norm. ``_LAYOUTS`` says, per ``config.model_type``, where a family
keeps its layers, norm, embeddings and sublayers; only families whose layers add the attention and
MLP outputs straight to the stream belong there (``SUPPORTED_MODEL_TYPES``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from archbench.errors import UsageError
from archbench.model import Intervene, first_tensor, replace_output

__all__ = ["HFStreamModel", "SUPPORTED_MODEL_TYPES"]


# --------------------------------------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a family keeps its parts: attribute paths from the *ForCausalLM module."""

    family: str
    layers: str  # the decoder layers (a ModuleList)
    norm: str  # the final norm, applied before the LM head
    tok_embed: str  # token embedding
    pos_embed: str | None  # learned absolute position embedding (None: rotary, inside attention)
    attn: str  # attribute of a decoder layer: the attention module (output a_l, first of a tuple)
    mlp: str  # attribute of a decoder layer: the MLP module (output m_l)


_LLAMA = _Layout("llama", "model.layers", "model.norm", "model.embed_tokens", None, "self_attn", "mlp")
_GPT2 = _Layout("gpt2", "transformer.h", "transformer.ln_f", "transformer.wte", "transformer.wpe", "attn", "mlp")
_NEOX = _Layout("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in", None,
                "attention", "mlp")

# config.model_type -> layout. Only architectures whose layers add the attention and MLP outputs
# straight to the stream (pre-norm, no post-sublayer norms, no embedding scale) belong here.
_LAYOUTS: dict[str, _Layout] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
                                "gpt2": _GPT2, "gpt_neox": _NEOX}
SUPPORTED_MODEL_TYPES = tuple(sorted(_LAYOUTS))


def _get(root: nn.Module, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------- the model

class HFStreamModel(nn.Module):
    """A Hugging Face causal LM as archbench's ``embed -> effective layers -> readout``.

    - ``embed(x)`` is h_0, the stream entering the first decoder layer: token embeddings, plus the
      learned position embeddings for GPT-2 (rotary families add positions inside attention).
    - the effective layers are the decoder layers; ``forward(x, intervene)`` runs the model's own
      forward (no cache, no attention mask: full causal windows) and calls
      ``intervene(l, h_in, h_out)`` after each decoder layer l; what it returns replaces the layer's
      output (returning ``h_in`` skips the layer).
    - ``readout(h)`` is final norm then LM head, so ``readout(h_L)`` equals the model's logits.
    - ``sublayer_modules(layer)`` gives ``{"attn_out": attention, "mlp_out": MLP}``: modules whose
      output (first element of a tuple) is a_l / m_l of paper 2, added to the stream (eval mode,
      where dropout is the identity). Llama and GPT-2 layers are sequential (h + a_l, then the MLP
      reads that); GPT-NeoX with ``use_parallel_residual`` feeds attention and MLP the same h_l.

    Traced states versus ``output_hidden_states``: the traced h_L is taken *before* the final norm,
    whereas Hugging Face's ``hidden_states[-1]`` (transformers 4 and 5, all supported families) is
    *after* it (``final_norm(h_L)``, the last_hidden_state); ``hidden_states[l]`` equals h_l for
    l < L. ``final_norm_in_hidden_states`` records this. Transformers 5 collects ``hidden_states``
    with forward hooks of its own, installed on the decoder layers the first time they are asked
    for and never removed; hooks run in the order they were registered, so those may see a layer's
    original output rather than an intervention's replacement. Record states through
    ``intervene`` (``archbench.trace``), not through ``output_hidden_states``.
    """

    final_norm_in_hidden_states = True  # HF hidden_states[-1] == final_norm(h_L), not h_L

    def __init__(self, model: nn.Module, source: str | None = None):
        super().__init__()
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _LAYOUTS:
            raise UsageError(f"unsupported Hugging Face architecture {model_type or type(model).__name__!r} "
                             f"({type(model).__name__}); supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.layout = _LAYOUTS[model_type]
        try:
            for path in (self.layout.layers, self.layout.norm, self.layout.tok_embed):
                _get(model, path)
        except AttributeError:
            raise UsageError(f"{type(model).__name__} (model type {model_type!r}) lacks {path!r}: pass a "
                             f"*ForCausalLM model (AutoModelForCausalLM), not its base model") from None
        if model.get_output_embeddings() is None:
            raise UsageError(f"{type(model).__name__} has no LM head: pass a *ForCausalLM model")
        self.hf = model
        self.model_type = model_type
        self.source = source or getattr(model, "archbench_source", None) or getattr(config, "_name_or_path", None)

    # -- the protocol ---------------------------------------------------------------------------

    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def config(self):
        return self.hf.config

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.hf, self.layout.layers)

    def effective_layers(self) -> list[nn.Module]:
        return list(self.layers)

    @property
    def effective_depth(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.hf, self.layout.norm)

    @property
    def head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """h_0 (B, T, D) for token ids x (B, T)."""
        h = _get(self.hf, self.layout.tok_embed)(x)
        if self.layout.pos_embed is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            h = h + _get(self.hf, self.layout.pos_embed)(positions).to(h.dtype)
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from a stream state: final norm, then the LM head."""
        return self.head(self.final_norm(h))

    def sublayer_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """{"attn_out": attention module, "mlp_out": MLP module} of one decoder layer; their outputs
        (``first_tensor``) are a_l and m_l, and a forward hook may return ``replace_output(out, new)``."""
        return {"attn_out": getattr(layer, self.layout.attn), "mlp_out": getattr(layer, self.layout.mlp)}

    def forward(self, x: torch.Tensor, intervene: Intervene | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of the model's own forward on token ids x (B, T)."""
        if intervene is None:
            return self._logits(x)
        inputs: dict[int, torch.Tensor] = {}
        handles = []
        self._calls = {"x": x, "args": {}}  # each layer's other arguments, for ``resume`` on this x

        def before(l):
            def hook(_module, args, kwargs):
                inputs[l] = args[0] if args else kwargs["hidden_states"]
                self._calls["args"][l] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        def after(l):
            def hook(_module, _args, out):
                h_in = inputs.pop(l)
                return replace_output(out, intervene(l, h_in, first_tensor(out)))
            return hook

        try:
            for l, layer in enumerate(self.effective_layers()):
                handles.append(layer.register_forward_pre_hook(before(l), with_kwargs=True))
                handles.append(layer.register_forward_hook(after(l)))
            return self._logits(x)
        finally:
            for handle in handles:
                handle.remove()

    def resume(self, x, h: torch.Tensor, start: int, intervene: Intervene | None = None):
        """Logits from stream ``h`` entering decoder layer ``start``, calling each later layer with the
        arguments (rotary embeddings, masks) it got in the last ``forward`` with ``intervene`` on this
        same ``x``; None (run in full instead) if there was none."""
        calls = getattr(self, "_calls", None)
        if calls is None or calls["x"] is not x or len(calls["args"]) != self.effective_depth:
            return None
        for l, layer in enumerate(self.effective_layers()[start:], start):
            args, kwargs = calls["args"][l]
            h_out = first_tensor(layer(h, *args, **kwargs))
            h = h_out if intervene is None else intervene(l, h, h_out)
        return self.readout(h)

    def _logits(self, x):
        out = self.hf(input_ids=x, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    # -- provenance -----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        config = self.hf.config
        param = next(self.hf.parameters())
        return {
            "model_class": type(self.hf).__name__,
            "model_type": self.model_type,
            "family": self.family,
            "layers": self.effective_depth,
            "width": int(config.hidden_size),
            "vocab": int(self.head.weight.shape[0]),
            "params": int(sum(p.numel() for p in self.hf.parameters())),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "source": self.source,
            "hidden_states_last": "final_norm(h_L)" if self.final_norm_in_hidden_states else "h_L",
        }
