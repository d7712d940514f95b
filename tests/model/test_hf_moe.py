"""model/hf_moe's table against mlx-lm's own sanitize methods, and the expert layouts it refuses."""

from __future__ import annotations

import importlib
import re
import types

import pytest

from adapterspec.errors import UserError
from adapterspec.model.hf_moe import EXPERT_STACKING, FUSED_EXPERT_SPLITS, sanitized_tensors
from adapterspec.model.safetensors import TensorInfo

# attributes some sanitize methods read besides the expert count (dense leading layers, none here)
ARGS = {"num_hidden_layers": 2, "tie_word_embeddings": True, "first_k_dense_replace": 0, "num_dense_layers": 0}


def info(shape, itemsize=4) -> TensorInfo:
    n = itemsize
    for d in shape:
        n *= d
    return TensorInfo("F32", tuple(shape), (0, n))


def per_expert(model_type: str, experts: int = 3, layers: int = 2) -> dict[str, tuple]:
    """Per-expert tensor shapes of a Hugging Face checkpoint of this model type, plus embeddings and a tied head."""
    stacking = EXPERT_STACKING[model_type]
    # a block beyond num_hidden_layers: glm4_moe's multi-token-prediction layer, which its sanitize drops
    shapes = {
        "model.embed_tokens.weight": (8, 4),
        "lm_head.weight": (8, 4),
        f"model.layers.{layers}.eh_proj.weight": (4, 8),
    }
    for layer in range(layers):
        shapes[f"model.layers.{layer}.self_attn.q_proj.weight"] = (4, 4)
        for hf in stacking.renames:
            for e in range(experts):
                for param, shape in zip(stacking.params, ((6, 4), (6, 1), (6, 1))):
                    shapes[f"model.layers.{layer}.{stacking.container}.experts.{e}.{hf}.{param}"] = shape
    return shapes


def mlx_lm_sanitize(model_type: str, shapes: dict[str, tuple], args: dict) -> dict[str, tuple]:
    """What mlx-lm's own `Model.sanitize` of this model type makes of tensors of these shapes: name → shape."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.utils import MODEL_REMAPPING

    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    stub = types.SimpleNamespace(args=types.SimpleNamespace(**args))
    weights = {name: mx.zeros(shape) for name, shape in shapes.items()}
    return {name: tuple(value.shape) for name, value in module.Model.sanitize(stub, weights).items()}


@pytest.mark.parametrize("model_type", sorted(EXPERT_STACKING))
def test_the_stacking_table_is_mlx_lms_sanitize(model_type):
    stacking = EXPERT_STACKING[model_type]
    shapes = per_expert(model_type)
    config = {**ARGS, stacking.count_key: 3}
    want = mlx_lm_sanitize(model_type, shapes, config)
    ours = sanitized_tensors({n: info(s) for n, s in shapes.items()}, {"model_type": model_type, **config})
    assert {name: t.shape for name, t in ours.tensors.items()} == want
    assert any(len(shape) == 3 and shape[0] == 3 for shape in want.values())  # something was stacked


@pytest.mark.parametrize("model_type", sorted(FUSED_EXPERT_SPLITS))
def test_the_fused_split_is_mlx_lms_sanitize(model_type):
    shapes = {"model.embed_tokens.weight": (8, 4), "model.layers.0.self_attn.rotary_emb.inv_freq": (2,)}
    for layer in range(3):
        shapes[f"model.layers.{layer}.experts.gate_up_proj"] = (3, 12, 4)
        shapes[f"model.layers.{layer}.experts.down_proj"] = (3, 4, 6)
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[f"model.layers.{layer}.self_attn.{proj}.weight"] = (4, 4)
        shapes[f"model.layers.{layer}.self_attn.k_norm.weight"] = (4,)
    config = {"model_type": model_type, "num_hidden_layers": 3, "num_kv_shared_layers": 1}
    want = mlx_lm_sanitize(model_type, shapes, config)
    ours = sanitized_tensors({n: info(s) for n, s in shapes.items()}, config)
    assert {name: t.shape for name, t in ours.tensors.items()} == want
    assert "model.layers.2.self_attn.k_proj.weight" in ours.dropped
    gate, up = (ours.stacked[f"model.layers.1.experts.switch_glu.{p}_proj.weight"] for p in ("gate", "up"))
    per_expert_bytes = 12 * 4 * 4
    assert [p.start for p in gate.parts] == [e * per_expert_bytes for e in range(3)]
    assert [p.start for p in up.parts] == [e * per_expert_bytes + per_expert_bytes // 2 for e in range(3)]
    assert {p.length for p in gate.parts + up.parts} == {per_expert_bytes // 2}


def tensors_of(model_type="qwen3_moe", experts=3, drop=None, extra=None, reshape=None) -> dict[str, TensorInfo]:
    shapes = per_expert(model_type, experts)
    shapes.pop(drop, None)
    shapes.update(extra or {})
    shapes.update(reshape or {})
    return {n: info(s) for n, s in shapes.items()}


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (tensors_of(drop="model.layers.1.mlp.experts.2.up_proj.weight"), {"num_experts": 3},
         "'model.layers.1.mlp.experts.2.up_proj.weight' is missing"),
        (tensors_of(experts=4), {"num_experts": 3}, "'model.layers.0.mlp.experts.3.down_proj.weight' is beyond the 3"),
        (tensors_of(reshape={"model.layers.0.mlp.experts.1.gate_proj.weight": (5, 4)}), {"num_experts": 3},
         "experts stacked into one tensor must be alike"),
        (tensors_of(), {}, "config.json has no 'num_experts'"),
        (tensors_of(extra={"model.layers.0.mlp.experts.gate_up_proj": (3, 12, 4)}), {"num_experts": 3},
         "fused expert layout, which mlx-lm's qwen3_moe does not read"),
        ({"model.layers.0.mlp.experts.gate_up_proj": info((3, 12, 4))}, {"model_type": "qwen3_5_moe"},
         "adapterspec does not read yet"),
    ],
)  # fmt: skip
def test_layouts_mlx_lm_would_not_load_as_indexed_are_refused(tensors, config, message):
    with pytest.raises(UserError, match=re.escape(message)) as raised:
        sanitized_tensors(tensors, {"model_type": "qwen3_moe", **config}, "model")
    assert "mlx_lm.convert" in (raised.value.help or "") or "download" in (raised.value.help or "")


def test_other_model_types_are_left_as_stored():
    tensors = tensors_of()
    assert sanitized_tensors(tensors, {"model_type": "llama"}).tensors == tensors
    assert sanitized_tensors(tensors, {"model_type": "dbrx"}).tensors == tensors  # its experts are a list live


def test_per_expert_tensors_of_a_type_the_table_lacks_are_refused_where_mlx_lm_stacks_them():
    pytest.importorskip("mlx_lm")  # the check reads the installed mlx-lm's model source
    with pytest.raises(UserError, match="mlx-lm's lfm2_moe stacks when it loads the model") as raised:
        sanitized_tensors(tensors_of(), {"model_type": "lfm2_moe"}, "model")
    assert "mlx_lm.convert" in raised.value.help
