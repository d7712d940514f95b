"""Build tiny mlx-lm models with random weights and a small tokenizer, deterministically, for examples and tests.

Run `python examples/models/make_models.py` to (re)write tiny-llama, tiny-moe and tiny-llama-4bit next to
this file. The tests import the same functions to build other architectures on the fly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED = 0
VOCAB_SIZE = 320
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}" + EOS + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A tiny model learns nothing, but it runs.
Adapters change a few modules of a large model: low-rank updates to the query and value
projections, to the experts of a mixture, or to the token embeddings. The rest stays frozen.
Every rule of a spec names modules by their path, such as model.layers.3.self_attn.q_proj,
and says which transform they get: lora, dora, full or none. The plan shows the result.
Quantized layers keep their packed weights; the adapter learns in float32 beside them.
In the beginning the weights were random, and the loss was high, and the learning rate was
small. Then the optimizer took a step, and another, and the loss went down a little.
Mixture-of-experts models route every token to a few experts; each expert is a small MLP,
stacked with the others in one switch layer so that a single gather matmul serves them all.
Tokenizers split text into pieces: bytes first, then merges of the most frequent pairs, until
the vocabulary is full. Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 appear too.
user: hello! assistant: hello, how can I help you today? user: tell me about adapters.
"""

# Tiny configs of real mlx-lm architectures, as config.json would hold them.
_COMMON = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 512,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        **_COMMON,
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "qwen2_moe": {
        **_COMMON,
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "phi3": {
        **_COMMON,
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "gemma": {
        **_COMMON,
        "model_type": "gemma",
        "architectures": ["GemmaForCausalLM"],
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}

# name → (architecture, dtype, quantization or None, overrides of the tiny config)
EXAMPLE_MODELS: dict[str, tuple[str, str, dict | None, dict]] = {
    "tiny-llama": ("llama", "float32", None, {}),
    "tiny-moe": ("qwen2_moe", "float32", None, {"num_hidden_layers": 3}),
    "tiny-llama-4bit": ("llama", "float32", {"group_size": 32, "bits": 4, "mode": "affine"}, {}),
}


# ── tokenizer ───────────────────────────────────────────────────────────────


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on CORPUS, with exactly `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the corpus yields {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    return tokenizer


def write_tokenizer(path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json."""
    tokenizer = build_tokenizer(vocab_size)
    path = Path(path)
    tokenizer.save(str(path / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_json(path / "special_tokens_map.json", specials)
    _write_json(path / "generation_config.json", generation_config)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ── models ──────────────────────────────────────────────────────────────────


def tiny_config(arch: str, **overrides: Any) -> dict[str, Any]:
    """The config.json dict of a tiny model of architecture `arch`, with overrides."""
    if arch not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_CONFIGS)}")
    return {**TINY_CONFIGS[arch], **overrides}


def build_model(config: dict[str, Any], dtype: str = "float32", seed: int = SEED):
    """A model of mlx-lm's class for config['model_type'] with random weights seeded by `seed`."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    config = {**config, "torch_dtype": dtype}
    return model, config


def quantize_model(model, config: dict, group_size: int = 32, bits: int = 4, mode: str = "affine", predicate=None):
    """Quantize as `mlx_lm.convert` does (same predicate, same config entries); returns (model, config).

    `predicate(path, module)` may return False (keep), True (defaults) or a dict of per-module parameters.
    """
    from mlx_lm.utils import quantize_model as mlx_lm_quantize_model

    with contextlib.redirect_stdout(io.StringIO()):
        return mlx_lm_quantize_model(model, config, group_size, bits, mode=mode, quant_predicate=predicate)


def build(
    arch: str,
    *,
    dtype: str = "float32",
    quantization: dict | None = None,
    seed: int = SEED,
    **overrides: Any,
):
    """(model, config) of a tiny `arch` model, quantized when `quantization` = {group_size, bits, mode}."""
    model, config = build_model(tiny_config(arch, **overrides), dtype=dtype, seed=seed)
    if quantization:
        model, config = quantize_model(model, config, **quantization)
    return model, config


def save_model_dir(model, config: dict, path: Path, with_tokenizer: bool = True) -> Path:
    """Write a model directory in mlx-lm's layout (weights, index, config) plus the tokenizer files."""
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    if with_tokenizer:
        write_tokenizer(path, config["vocab_size"])
    return path


def make_example_models(out_dir: Path = HERE, names: list[str] | None = None) -> list[Path]:
    """(Re)write the example model directories under out_dir."""
    written = []
    for name in names or list(EXAMPLE_MODELS):
        arch, dtype, quantization, overrides = EXAMPLE_MODELS[name]
        model, config = build(arch, dtype=dtype, quantization=quantization, **overrides)
        target = Path(out_dir) / name
        if target.exists():
            shutil.rmtree(target)
        written.append(save_model_dir(model, config, target))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to write: {', '.join(EXAMPLE_MODELS)} (default: all)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write them into")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXAMPLE_MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    for path in make_example_models(args.out, args.names or None):
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"wrote {path} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
