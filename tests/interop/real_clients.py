"""Shared pieces of the real-client tests (no tests here): tiny random transformers models saved with save_pretrained
and the same weights in mlx-lm's layout (through mlx-lm's own sanitize), PEFT adapters made by real PEFT, logits."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import transformers

TOKENS = [[1, 5, 7, 9, 100, 2, 4, 60, 63, 17, 90, 33]]
ROPE_THETA = 10000.0
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    rope_theta=ROPE_THETA,
    rms_norm_eps=1e-6,
)
MOE = dict(intermediate_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
MODEL_KINDS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(intermediate_size=64)),
    "llama-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(intermediate_size=64, tie_word_embeddings=True),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(MOE, shared_expert_intermediate_size=32),
    ),
    "qwen3_moe-tied": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(MOE, head_dim=8, tie_word_embeddings=True),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    ),
}
MOE_KINDS = ("qwen2_moe", "qwen3_moe-tied", "mixtral")


def build_pair(kind: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(hf_dir, mlx_dir): a random transformers model saved with save_pretrained, and the same weights as mlx-lm
    loads them (its sanitize stacks the experts) written in mlx-lm's layout."""
    import models
    from mlx_lm.utils import load_model

    config_class, model_class, extra = MODEL_KINDS[kind]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra})
    model = model_class(config).float()
    with torch.no_grad():  # tiny random weights routed with clear margins: larger router weights
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(20)
    hf_dir = root / f"{kind}-hf"
    model.save_pretrained(hf_dir)
    # transformers 5 writes rope_parameters (and, for qwen3_moe, num_local_experts), which mlx-lm 0.32 does not read
    overrides = {
        "rope_theta": ROPE_THETA,
        **({"num_experts": MOE["num_experts"]} if kind.startswith("qwen3_moe") else {}),
    }
    mlx_model, mlx_config = load_model(hf_dir, model_config=overrides)
    mlx_dir = models.save(root / f"{kind}-mlx", mlx_model, mlx_config)
    return hf_dir, mlx_dir


def hf_model(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def mlx_logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def make_peft(hf_dir: Path, out: Path, seed: int = 1, **config):
    """A PEFT adapter made by real PEFT on the transformers model, every factor random and nonzero, saved to `out`."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    return model


def peft_loaded(hf_dir: Path, peft_dir: Path):
    """The PEFT adapter directory loaded by PEFT onto a fresh transformers model."""
    import peft

    return peft.PeftModel.from_pretrained(hf_model(hf_dir), str(peft_dir)).eval()


def cli(*argv: str) -> tuple[int, str]:
    """adapterspec's command line run in this process: (exit code, stderr)."""
    from adapterspec.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def config_of(peft_dir: Path) -> dict:
    return json.loads((Path(peft_dir) / "adapter_config.json").read_text())


def write_our_adapters(mlx_dir: Path, out: Path, spec: str, seed: int = 1) -> Path:
    """An adapterspec adapter directory for `spec` with random nonzero factors, as if trained (the fuse tests' writer)."""
    import importlib.util
    import sys

    name = "fuse_support"
    if name not in sys.modules:
        location = Path(__file__).resolve().parent.parent / "fuse" / "fuse_support.py"
        module_spec = importlib.util.spec_from_file_location(name, location)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    return sys.modules[name].write_adapters(mlx_dir, out, "adapterspec 1\n" + spec + "\n", b_scale=0.1, seed=seed)


def ours_logits(mlx_dir: Path, adapters: Path) -> np.ndarray:
    """Logits of the mlx-lm model with the adapter directory installed by adapterspec.load_adapters."""
    from adapterspec import load_adapters
    from adapterspec.adapters.loading import load_model

    model, _ = load_model(mlx_dir)
    load_adapters(model, adapters)
    return mlx_logits(model)


def mlx_lm_logits(mlx_dir: Path, adapters: Path | None = None) -> np.ndarray:
    """Logits of the model as mlx-lm itself loads it (with `adapter_path` when given)."""
    import mlx_lm

    model, _ = mlx_lm.load(str(mlx_dir), adapter_path=str(adapters) if adapters else None)
    return mlx_logits(model)
