"""A pretrained Hugging Face causal LM seen through archbench's residual-stream protocol.

::

    from archbench.hf import HFStreamModel, load_hf_model
    from archbench.tasks.hf_text import HFTextTask

    hf, tokenizer = load_hf_model("smollm2-135m")      # local files only, never a download
    model = HFStreamModel(hf)                          # embed / effective_layers / readout / forward(x, intervene)
    task = HFTextTask(tokenizer, seq_len=128)          # windows of Python's bundled docs, in the model's tokens

Every archbench evaluator that only uses the protocol (``archbench.model.run``, ``trace``, the
``intervene(l, h_in, h_out)`` callback, ``sublayer_modules``) then runs on the pretrained model
unchanged. The decoder layers are the effective layers: h_0 is the stream entering the first
decoder layer and h_l the output of decoder layer l; h_L is taken *before* the final norm.

Supported architectures (``config.model_type``): Llama-style (llama, mistral, qwen2, qwen3),
gpt2 and gpt_neox. Transformers is optional: ``pip install "archbench[hf]"``.

- ``loading``: finding a model's local files (``resolve_model_files``) and ``load_hf_model``.
- ``adapter``: ``HFStreamModel`` and the table of where each family keeps its parts.
"""

from archbench.hf.adapter import SUPPORTED_MODEL_TYPES, HFStreamModel
from archbench.hf.loading import SMOLLM2_NAMES, load_hf_model, resolve_model_files
from archbench.model import first_tensor, replace_output

__all__ = ["load_hf_model", "resolve_model_files", "HFStreamModel", "first_tensor", "replace_output",
           "SUPPORTED_MODEL_TYPES", "SMOLLM2_NAMES"]
