"""Build tiny mlx-vlm vision-language models with random weights and their processors, deterministically.

Run `python examples/models/make_vlms.py` to (re)write tiny-qwen2-vl, tiny-gemma3 and tiny-paligemma next to this
file (needs `pip install ".[vlm]"`). Each directory is what `mlx_vlm.convert` writes: config.json with
text_config and vision_config, model.safetensors with mlx-vlm's module paths, and the tokenizer, image
processor and chat template its processor reads. The tests import the same functions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import BOS, EOS, PAD, SEED, _write_json, build_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE_VOCAB = 320
# A template in the shape mlx-vlm's prompt helpers produce: the content is text, or a list of parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{IMAGE}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    + EOS
    + "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4}
_TEXT_KV = {"num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 512}

# name → (special tokens after the base vocabulary, the image placeholder in the chat template, config builder)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        "image": "<|vision_start|><|image_pad|><|vision_end|>",
    },
    "gemma3": {
        "tokens": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        "image": "<start_of_image>",
    },
    "paligemma": {"tokens": ["<image>"], "image": ""},
}
EXAMPLE_VLMS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-gemma3": "gemma3", "tiny-paligemma": "paligemma"}


def vlm_config(arch: str, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """config.json of a tiny `arch` model, as mlx-vlm's converter writes it."""
    if arch == "qwen2_vl":
        return {
            "model_type": "qwen2_vl",
            "architectures": ["Qwen2VLForConditionalGeneration"],
            **_TEXT,
            **_TEXT_KV,
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": False,
            "image_token_id": token_ids["<|image_pad|>"],
            "video_token_id": token_ids["<|video_pad|>"],
            "vision_start_token_id": token_ids["<|vision_start|>"],
            "vision_end_token_id": token_ids["<|vision_end|>"],
            "eos_token_id": token_ids[EOS],
            "vision_config": {
                "model_type": "qwen2_vl",
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": 64,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                "spatial_patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "in_channels": 3,
            },
        }
    if arch == "gemma3":
        return {
            "model_type": "gemma3",
            "architectures": ["Gemma3ForConditionalGeneration"],
            "hidden_size": 64,
            "vocab_size": vocab_size,
            "image_token_index": token_ids["<image_soft_token>"],
            "boi_token_index": token_ids["<start_of_image>"],
            "eoi_token_index": token_ids["<end_of_image>"],
            "mm_tokens_per_image": 4,
            "eos_token_id": token_ids[EOS],
            "text_config": {
                "model_type": "gemma3_text",
                **_TEXT,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "rms_norm_eps": 1e-6,
                "vocab_size": vocab_size,
                "sliding_window": 64,
                "sliding_window_pattern": 2,
                "mm_tokens_per_image": 4,
                "max_position_embeddings": 512,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "patch_size": 8,
                "image_size": 32,
            },
        }
    if arch == "paligemma":
        return {
            "model_type": "paligemma",
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "hidden_size": 64,
            "projection_dim": 64,
            "vocab_size": vocab_size,
            "image_token_index": token_ids["<image>"],
            "eos_token_id": token_ids[EOS],
            "text_config": {
                "model_type": "gemma",
                **_TEXT,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "rms_norm_eps": 1e-6,
                "vocab_size": vocab_size,
                "max_position_embeddings": 512,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
                "patch_size": 8,
                "image_size": 32,
                "projection_dim": 64,
            },
        }
    raise KeyError(f"unknown tiny VLM architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def preprocessor_config(arch: str) -> dict[str, Any]:
    """The image processor's settings: tiny images, few patches."""
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if arch == "qwen2_vl":
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": 56 * 56,
            "max_pixels": 56 * 56,
            "image_mean": mean,
            "image_std": std,
        }
    if arch == "gemma3":
        return {
            "image_processor_type": "Gemma3ImageProcessor",
            "processor_class": "Gemma3Processor",
            "size": {"height": 32, "width": 32},
            "image_mean": mean,
            "image_std": std,
            "do_resize": True,
            "do_normalize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_pan_and_scan": False,
        }
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        "size": {"height": 32, "width": 32},
        "image_seq_length": 16,
        "do_resize": True,
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "image_mean": mean,
        "image_std": std,
    }


def write_processor(path: Path, arch: str) -> tuple[dict[str, int], int]:
    """The tokenizer (the base vocabulary plus the model's image tokens), image processor and chat template;
    returns the special tokens' ids and the vocabulary size."""
    spec = ARCHITECTURES[arch]
    tokenizer = build_tokenizer(BASE_VOCAB)
    tokenizer.add_special_tokens(spec["tokens"])
    tokenizer.save(str(path / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in [PAD, BOS, EOS, *spec["tokens"]]}
    template = CHAT_TEMPLATE.replace("{IMAGE}", spec["image"])
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    if arch == "gemma3":
        tokenizer_config["extra_special_tokens"] = {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
    if arch == "paligemma":
        tokenizer_config["extra_special_tokens"] = {"image_token": "<image>"}
    processor_config: dict[str, Any] = {"processor_class": preprocessor_config(arch)["processor_class"]}
    if arch == "gemma3":
        processor_config.update({"image_seq_length": 4})
    if arch == "paligemma":
        processor_config.update({"image_seq_length": 16, "image_token": "<image>"})
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_json(path / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    _write_json(path / "preprocessor_config.json", preprocessor_config(arch))
    _write_json(path / "processor_config.json", processor_config)
    (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write_json(
        path / "generation_config.json", {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]}
    )
    return ids, tokenizer.get_vocab_size()


def build_vlm(config: dict[str, Any], seed: int = SEED):
    """mlx-vlm's model for config (as `mlx_vlm.load` builds it) with random float32 weights seeded by `seed`."""
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    config = {**config}
    model_class, _ = get_model_and_args(config)
    full = {
        **config,
        "text_config": dict(config.get("text_config", {})),
        "vision_config": dict(config["vision_config"]),
    }
    full.setdefault("audio_config", {})
    model_config = model_class.ModelConfig.from_dict(full)
    model_config = update_module_configs(model_config, model_class, full, ["text", "vision", "projector"])
    mx.random.seed(seed)
    model = model_class.Model(model_config)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def save_vlm_dir(model, config: dict[str, Any], path: Path) -> Path:
    """Weights (one shard and its index, mlx-vlm's names) and config.json."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": {name: "model.safetensors" for name in sorted(weights)},
    }
    _write_json(path / "model.safetensors.index.json", index)
    _write_json(path / "config.json", {**config, "torch_dtype": "float32"})
    return path


def make_vlm(arch: str, path: Path, seed: int = SEED) -> Path:
    """A tiny model directory of architecture `arch` at `path` (replaced)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    ids, vocab_size = write_processor(path, arch)
    config = vlm_config(arch, ids, vocab_size)
    return save_vlm_dir(build_vlm(config, seed), config, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to write: {', '.join(EXAMPLE_VLMS)} (default: all)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write them into")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXAMPLE_VLMS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    for name in args.names or list(EXAMPLE_VLMS):
        path = make_vlm(EXAMPLE_VLMS[name], args.out / name)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"wrote {path} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
