"""The residual-stream protocol.

Every model archbench trains or analyses is seen the same way::

    input -> embed -> h_0 -> [effective layer 1] -> h_1 -> ... -> [effective layer L] -> h_L -> readout

An effective layer maps the stream state (batch, seq, dim) to the new state of the same
shape. ``StreamModel.forward`` takes an ``intervene(l, h_in, h_out) -> h_out`` callback through
which evaluators record states, skip a layer (return ``h_in``) or patch one, without knowing
the block's family. Blocks expose sublayer outputs through named ``Tap`` modules.

A block is either one layer (built once per layer) or a ``Stack`` subclass that runs all the
effective layers itself, for designs whose layers share more than the stream.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ArchbenchError, UsageError
from archbench.knobs import knobs_of

Intervene = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class Tap(nn.Identity):
    """A named observation point inside a block, e.g. ``self.attn_out = Tap()`` then
    ``a = self.attn_out(self.attn(...))``. Forward hooks on taps read (or replace) sublayer outputs."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a task feeds the model: vectors (batch, size) or token ids (batch, seq_len)."""

    kind: str  # "vector" or "tokens"
    size: int  # vector dimension or vocabulary size
    out_dim: int  # readout size (vocabulary of the prediction)
    seq_len: int = 1


class VectorEmbed(nn.Module):
    """h_0 = rmsnorm(x) (no learnable weight), with a linear map first if the width differs."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, width, bias=False) if in_dim != width else nn.Identity()

    def forward(self, x):  # (B, in_dim) -> (B, 1, width)
        h = self.proj(x)
        return F.rms_norm(h, (h.shape[-1],)).unsqueeze(1)


class TokenEmbed(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, vocab: int, width: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx):  # (B, T) -> (B, T, width)
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Readout(nn.Module):
    """logits = W_head · rmsnorm(h_L); zero-initialised by default so training starts from uniform."""

    def __init__(self, width: int, out_dim: int, zero_init: bool = True):
        super().__init__()
        self.head = nn.Linear(width, out_dim, bias=False)
        if zero_init:
            nn.init.zeros_(self.head.weight)

    def forward(self, h):
        return self.head(F.rms_norm(h, (h.shape[-1],)))


class FixedReadout(nn.Module):
    """logits = scale · W · rmsnorm(h_L) with W a buffer, never trained: a readout the task imposes
    (teacher-student's shared frozen head). ``weight=None`` outputs rmsnorm(h_L) itself."""

    def __init__(self, weight: torch.Tensor | None, scale: float = 1.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))  # a buffer, so that batched runs may differ in it

    def forward(self, h):
        h = F.rms_norm(h, (h.shape[-1],))
        return h if self.weight is None else F.linear(h, self.weight) * self.scale


def step(intervene: Intervene | None, l: int, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """The stream after effective layer ``l``: its output, or what the evaluator's callback makes of it."""
    return h_out if intervene is None else intervene(l, h_in, h_out)


def run_layers(layers: Sequence[nn.Module], h: torch.Tensor, intervene: Intervene | None, start: int = 0):
    """Apply ``layers`` in order as effective layers ``start, start + 1, ...``; the resulting stream."""
    for l, layer in enumerate(layers, start):
        h = step(intervene, l, h, layer(h))
    return h


class Stack(nn.Module):
    """The effective layers between embed and readout.

    This default runs ``layers[i]`` for each ``i`` in ``schedule`` (each layer once, in order, unless
    told otherwise), so residual and weight-tied stacks are the same type. A block family whose
    layers share state beyond the stream (dense connections, several streams, recurrence, several
    time scales) subclasses ``Stack`` and writes its own ``forward(h, intervene)``; registering the
    subclass as a block is enough for ``build_model``. A subclass calls ``step`` once per effective
    layer, in execution order, and treats the result as the new stream: ``h_in`` back means the layer
    is skipped, anything else replaces the output (its docstring says how extra state follows).
    """

    def __init__(self, layers: Sequence[nn.Module] = (), schedule: Sequence[int] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.schedule = list(range(len(self.layers)) if schedule is None else schedule)

    @classmethod
    def check_depth(cls, depth: int, knobs: dict) -> None:
        """Raise ``UsageError`` (naming valid depths) if the family cannot be built at this effective
        depth with these knobs (all of them: defaults filled in)."""

    def effective_layers(self) -> list[nn.Module]:
        """The module applied at each effective layer, in execution order (evaluation mode)."""
        return [self.layers[i] for i in self.schedule]

    def forward(self, h, intervene: Intervene | None = None):
        return run_layers(self.effective_layers(), h, intervene)


class StreamModel(nn.Module):
    """embed -> stack of effective layers -> readout.

    ``body`` is a ``Stack`` or a list of layer modules (wrapped in the default ``Stack`` with
    ``schedule``, which lists the module index run at each effective layer).
    """

    def __init__(self, embed: nn.Module, body: Stack | Sequence[nn.Module], readout: nn.Module,
                 schedule: Sequence[int] | None = None):
        super().__init__()
        self.embed, self.readout = embed, readout
        self.body = body if isinstance(body, Stack) else Stack(body, schedule)

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.layers

    def effective_layers(self) -> list[nn.Module]:
        return self.body.effective_layers()

    @property
    def effective_depth(self) -> int:
        return len(self.effective_layers())

    def forward(self, x, intervene: Intervene | None = None):
        return self.readout(self.body(self.embed(x), intervene))

    def resume(self, x, h, start: int, intervene: Intervene | None = None):
        """Logits from stream ``h`` entering effective layer ``start`` (see ``run``); None for a
        ``Stack`` subclass, whose layers may need state beyond the stream."""
        if type(self.body) is not Stack:
            return None
        return self.readout(run_layers(self.effective_layers()[start:], h, intervene, start))


@dataclasses.dataclass
class Trace:
    states: list[torch.Tensor]  # h_0 ... h_L, each (B, T, D)
    logits: torch.Tensor
    sublayers: list[dict[str, torch.Tensor]]  # per effective layer: tap name -> output


def taps(layer: nn.Module) -> dict[str, Tap]:
    """A layer's taps by their own name ("attn_out", not "branch.attn_out"): evaluators look up
    sublayers by role, whatever the block's internal layout."""
    return {name.rsplit(".", 1)[-1]: m for name, m in layer.named_modules() if isinstance(m, Tap)}


def sublayer_modules(model: nn.Module, layer: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are a layer's sublayer contributions ("attn_out", "mlp_out"):
    archbench's ``Tap`` modules, or what a wrapped model (e.g. a Hugging Face LM) names."""
    named = getattr(model, "sublayer_modules", None)
    return named(layer) if named is not None else taps(layer)


def first_tensor(out) -> torch.Tensor:
    """A module's output tensor (pretrained attention modules return (output, weights, ...))."""
    return out[0] if isinstance(out, (tuple, list)) else out


def replace_output(out, tensor: torch.Tensor):
    """``out`` with its output tensor replaced, in the same structure."""
    return (tensor, *out[1:]) if isinstance(out, (tuple, list)) else tensor


OnLayer = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
OnSublayer = Callable[[int, str, torch.Tensor], "torch.Tensor | None"]


def run(model: nn.Module, x, on_layer: OnLayer | None = None, on_sublayer: OnSublayer | None = None,
        start: int = 0, h_start: torch.Tensor | None = None):
    """Logits of ``model`` on ``x``, calling ``on_layer(l, h_in, h_out) -> new stream`` after each
    effective layer and ``on_sublayer(l, name, output) -> replacement or None`` on each sublayer
    output (``name`` as in ``sublayer_modules``) of effective layer ``l``. Evaluators record, skip
    and patch through these two callbacks only.

    With ``start > 0`` the stream entering layer ``start`` is ``h_start`` (taken from a trace of the
    same ``x``) and the callbacks see layers ``start`` onwards only. A model with a ``resume`` method
    then runs just those layers; any other model runs in full with ``h_start`` patched in.
    """
    current = [start]  # effective layer now running; shared modules (recurrence) appear at several l
    handles = []
    if on_sublayer is not None:
        for layer in {id(m): m for m in model.effective_layers()}.values():
            for name, module in sublayer_modules(model, layer).items():
                def hook(_m, _i, out, name=name):
                    if current[0] < start:
                        return None
                    new = on_sublayer(current[0], name, first_tensor(out))
                    return None if new is None else replace_output(out, new)
                handles.append(module.register_forward_hook(hook))

    def intervene(l, h_in, h_out):
        if l < start:
            h = h_start if l == start - 1 else h_out
        else:
            h = h_out if on_layer is None else on_layer(l, h_in, h_out)
        current[0] = l + 1
        return h

    try:
        resume = getattr(model, "resume", None) if start > 0 else None
        logits = resume(x, h_start, start, intervene) if resume is not None else None
        if logits is None:
            current[0] = 0
            logits = model(x, intervene=intervene)
        return logits
    finally:
        for h in handles:
            h.remove()


def trace(model: StreamModel, x, *, skip: Sequence[int] = (), sublayers: bool = True) -> Trace:
    """Run ``model`` on ``x`` recording every stream state; layers in ``skip`` pass h_s through."""
    skip = set(skip)
    states: list[torch.Tensor] = []
    subs: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}

    def on_sublayer(l, name, out):
        current[name] = out.detach()

    def on_layer(l, h_in, h_out):
        if not states:
            states.append(h_in.detach())
        subs.append(dict(current))
        current.clear()
        h = h_in if l in skip else h_out
        states.append(h.detach())
        return h

    logits = run(model, x, on_layer, on_sublayer if sublayers else None)
    if not states:  # depth 0
        states.append(model.embed(x).detach())
    return Trace(states, logits, subs)


def build_model(block, block_kwargs: dict, depth: int, spec: InputSpec, width: int,
                zero_head: bool = True, block_name: str | None = None,
                readout: nn.Module | None = None) -> StreamModel:
    """``depth`` effective layers of ``block`` for a task with input ``spec``, read out by ``readout``
    (default: a learned ``Readout``).

    ``block`` is a layer class, built once per layer as ``block(dim=, layer_idx=, depth=, **knobs)``,
    or a ``Stack`` subclass, built once as ``block(dim=, depth=, **knobs)``.
    """
    name = block_name or getattr(block, "registry_name", block.__name__)
    is_stack = isinstance(block, type) and issubclass(block, Stack)
    if is_stack:
        block.check_depth(depth, {**{k.name: k.default for k in knobs_of(block).values()}, **block_kwargs})
    try:
        if is_stack:
            body = block(dim=width, depth=depth, **block_kwargs)
        else:
            body = [block(dim=width, layer_idx=l, depth=depth, **block_kwargs) for l in range(depth)]
    except TypeError as e:
        signature = "dim, depth" if is_stack else "dim, layer_idx, depth"
        raise ArchbenchError(f"block {name!r} could not be built: {e} "
                             f"(a block takes keyword arguments {signature} and its knobs)") from None
    except ArchbenchError:
        raise
    except Exception as e:  # a knob value the block cannot take (heads that do not divide the width, ...)
        raise UsageError(f"block {name!r} could not be built (width {width}, {block_kwargs}): "
                          f"{type(e).__name__}: {e}") from None
    if spec.kind == "vector":
        embed = VectorEmbed(spec.size, width)
    else:
        embed = TokenEmbed(spec.size, width, spec.seq_len)
    if readout is None:
        readout = Readout(width, spec.out_dim, zero_init=zero_head)
    return StreamModel(embed, body, readout)


def check_stream_shapes(model: StreamModel, x, block_name: str) -> None:
    """One forward pass that names the block and layer whose output breaks the protocol."""

    def intervene(l, h_in, h_out):
        if not isinstance(h_out, torch.Tensor):
            raise ArchbenchError(f"block {block_name!r} (layer {l}) returned {type(h_out).__name__}; "
                                 f"forward(x) must return the new stream, a tensor shaped like x {tuple(h_in.shape)}")
        if h_out.shape != h_in.shape:
            raise ArchbenchError(f"block {block_name!r} (layer {l}) returned shape {tuple(h_out.shape)}, expected "
                                 f"{tuple(h_in.shape)}: forward(x) must return the new stream (batch, seq, dim)")
        return h_out

    with torch.no_grad():
        try:
            model(x, intervene=intervene)
        except ArchbenchError:
            raise
        except Exception as e:
            raise ArchbenchError(f"block {block_name!r} failed in forward: {type(e).__name__}: {e}") from None
