"""Named model sizes for `calm-dist plan` and the cost model: config.json fields of published checkpoints.

Each entry is a plain dict of the fields a Hugging Face `config.json` carries (only those the cost model reads,
plus `model_type` and `architectures`), copied from the published configuration named in `SOURCES`.
`calm_dist.planning.costs.model_spec("llama-7b")` or `model_spec(MODEL_SIZES["llama-7b"])` turns one into a `ModelSpec`;
`transformers.AutoConfig.for_model(**entry)` builds a real config from one.

The `llama-*` names without a version are the Llama-2 family plus TinyLlama: they share Llama-2's 32,000-token
vocabulary, so any two of them can be composed (CALM needs one vocabulary for both models). `llama3*` models
share the 128,256-token Llama-3 vocabulary. `llama-0.3b` is NOT a published checkpoint (see `SOURCES`).

Pure data, no imports: safe to read from anywhere.
"""

__all__ = ["MODEL_SIZES", "SOURCES", "ALIASES", "get", "names"]


def _llama(hidden, inter, layers, heads, kv_heads, vocab, max_pos, tie=False, head_dim=None, rope_theta=10000.0,
           model_type="llama", arch="LlamaForCausalLM", **extra):
    cfg = {
        "model_type": model_type,
        "architectures": [arch],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    cfg.update(extra)
    return cfg


def _gpt2(n_embd, n_layer, n_head):
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_inner": None,
        "n_positions": 1024,
        "vocab_size": 50257,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
    }


def _neox(hidden, layers, heads, inter, vocab):
    return {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "hidden_act": "gelu",
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "attention_bias": True,
        "tie_word_embeddings": False,
    }


MODEL_SIZES = {
    # Llama-2 family (+ TinyLlama): 32,000-token vocabulary, composable with each other.
    "llama-70b": _llama(8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-13b": _llama(5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-1b": _llama(2048, 5632, 22, 32, 4, 32000, 2048),
    "llama-0.3b": _llama(1024, 2816, 24, 16, 16, 32000, 4096),
    # Llama-3 family: 128,256-token vocabulary.
    "llama3-70b": _llama(8192, 28672, 80, 64, 8, 128256, 8192, rope_theta=500000.0),
    "llama3-8b": _llama(4096, 14336, 32, 32, 8, 128256, 8192, rope_theta=500000.0),
    "llama3.2-3b": _llama(3072, 8192, 28, 24, 8, 128256, 131072, tie=True, head_dim=128, rope_theta=500000.0),
    "llama3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, 131072, tie=True, head_dim=64, rope_theta=500000.0),
    # Mistral (Llama-2-sized vocabulary of its own).
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, 32000, 32768, model_type="mistral", arch="MistralForCausalLM",
                         sliding_window=4096),
    # Qwen2 (q/k/v biases; 0.5b and 1.5b tie their embeddings).
    "qwen2-7b": _llama(3584, 18944, 28, 28, 4, 152064, 32768, rope_theta=1000000.0, model_type="qwen2",
                       arch="Qwen2ForCausalLM", rms_norm_eps=1e-6),
    "qwen2-1.5b": _llama(1536, 8960, 28, 12, 2, 151936, 131072, tie=True, rope_theta=1000000.0,
                         model_type="qwen2", arch="Qwen2ForCausalLM", rms_norm_eps=1e-6),
    "qwen2-0.5b": _llama(896, 4864, 24, 14, 2, 151936, 131072, tie=True, rope_theta=1000000.0,
                         model_type="qwen2", arch="Qwen2ForCausalLM", rms_norm_eps=1e-6),
    # GPT-2 (learned positions, tied embeddings, 4x GELU MLP, biases everywhere).
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    # Pythia (GPT-NeoX: 2-matrix GELU MLP, LayerNorm, biases, untied head).
    "pythia-160m": _neox(768, 12, 12, 3072, 50304),
    "pythia-410m": _neox(1024, 24, 16, 4096, 50304),
    "pythia-1b": _neox(2048, 16, 8, 8192, 50304),
    "pythia-6.9b": _neox(4096, 32, 32, 16384, 50432),
}

SOURCES = {
    "llama-70b": "meta-llama/Llama-2-70b-hf (68,976,648,192 parameters)",
    "llama-13b": "meta-llama/Llama-2-13b-hf (13,015,864,320 parameters)",
    "llama-7b": "meta-llama/Llama-2-7b-hf (6,738,415,616 parameters)",
    "llama-1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (Llama-2 tokenizer; 1,100,048,384 parameters)",
    "llama-0.3b": "illustrative, NOT a published checkpoint: a Llama-2-vocabulary 24x1024 model "
                  "(~0.31B non-embedding parameters) for small-scale planning",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B (1,235,814,400 parameters)",
    "mistral-7b": "mistralai/Mistral-7B-v0.1 (7,241,732,096 parameters)",
    "qwen2-7b": "Qwen/Qwen2-7B (7,615,616,512 parameters)",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "gpt2-small": "openai-community/gpt2 (124,439,808 parameters)",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "pythia-1b": "EleutherAI/pythia-1b (1,011,781,632 parameters)",
    "pythia-6.9b": "EleutherAI/pythia-6.9b",
}

ALIASES = {
    "llama2-70b": "llama-70b",
    "llama2-13b": "llama-13b",
    "llama2-7b": "llama-7b",
    "tinyllama-1.1b": "llama-1b",
    "gpt2": "gpt2-small",
}


def names():
    """The canonical names, in table order."""
    return list(MODEL_SIZES)


def get(name):
    """A copy of the config dict for `name` (case-insensitive; aliases accepted). KeyError lists the names."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODEL_SIZES:
        raise KeyError(f"unknown model size {name!r}; known: {', '.join(names())} "
                       f"(aliases: {', '.join(sorted(ALIASES))})")
    cfg = dict(MODEL_SIZES[key])
    cfg["architectures"] = list(cfg["architectures"])
    return cfg
