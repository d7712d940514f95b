"""`layers` is the model's block list as mlx-lm defines it (`model.layers`), whatever the architecture names
it: gpt2's `model.h`, dbrx's `transformer.blocks`. Real mlx-lm models, built tiny."""

from __future__ import annotations

import contextlib
import io

import models as tiny
import pytest

from adapterspec.language.diagnostics import SpecError
from adapterspec.model.blocks import guess_block_list
from adapterspec.model.index import ModuleIndex, ModuleInfo
from adapterspec.model.mlxlm import block_list_path, spec_from_mlx_lm
from adapterspec.model.plan import plan_spec

CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 3, "n_positions": 64,
             "layer_norm_epsilon": 1e-5, "num_key_value_heads": 4, "vocab_size": 64},
    "dbrx": {"model_type": "dbrx", "d_model": 32, "n_heads": 4, "n_layers": 3, "vocab_size": 64,
             "attn_config": {"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
}  # fmt: skip
BLOCKS = {"gpt2": "model.h", "dbrx": "transformer.blocks"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def subject(request, tmp_path_factory):
    arch = request.param
    model, config = tiny.builder.build_model(dict(CONFIGS[arch]))
    path = tiny.save(tmp_path_factory.mktemp(arch), model, config, with_tokenizer=False)
    return arch, model, path


def test_both_indexes_name_the_block_list(subject):
    arch, model, path = subject
    live, disk = ModuleIndex.from_module(model), ModuleIndex.from_model_dir(path)
    assert live.block_list == disk.block_list == BLOCKS[arch]
    assert live[BLOCKS[arch]].family == "list" and live.list_length(BLOCKS[arch]) == len(model.layers) == 3
    assert block_list_path(live) == block_list_path(disk) == BLOCKS[arch]


@pytest.mark.parametrize("source", ["live", "dir"])
def test_layers_selects_the_block_list(subject, source):
    arch, model, path = subject
    index = ModuleIndex.from_module(model) if source == "live" else ModuleIndex.from_model_dir(path)
    plan = plan_spec("layers[-1:].**: lora(r=2)\n", index)
    assert plan.ok and plan.entries
    assert all(e.path.startswith(f"{BLOCKS[arch]}.2.") for e in plan.entries)
    adaptable = {m.path for m in index.descendants(f"{BLOCKS[arch]}.2") if m.adaptable}
    assert {e.path for e in plan.entries} == adaptable
    # the architecture's own name still works, and means the same modules
    own = BLOCKS[arch].rsplit(".", 1)[-1]
    assert {e.path for e in plan_spec(f"{own}[-1:].**: lora(r=2)\n", index).entries} == adaptable
    # `/layers` anchored at the root does not reach a nested block list: it is a path, not a name
    with pytest.raises(SpecError, match="AS301"):
        plan_spec("/layers[*].**: lora(r=2)\n", index)


def test_mlx_lm_config_translates_to_the_block_list(subject):
    """mlx-lm's keys/num_layers config becomes a spec over the real block list (it was `/None[*]`), and
    its plan adapts exactly the modules mlx-lm's own `linear_to_lora_layers` turns into LoRA."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    arch, _, path = subject
    model, _ = tiny.builder.build_model(dict(CONFIGS[arch]))
    index = ModuleIndex.from_model_dir(path)
    parameters = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    text, notes = spec_from_mlx_lm(parameters, 2, "lora", index)
    assert f"/{BLOCKS[arch]}[-2:]" in text and "None" not in text, text
    model.freeze()
    with contextlib.redirect_stdout(io.StringIO()):
        linear_to_lora_layers(model, 2, parameters)
    theirs = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(model.trainable_parameters())}
    theirs = {p.removesuffix(".linear") for p in theirs}
    ours = {e.path for e in plan_spec(text, index).entries}
    assert ours == theirs and ours


def test_tree_marks_the_block_list(subject, capsys):
    from adapterspec.cli import main

    arch, _, path = subject
    assert main(["tree", str(path)]) == 0
    name = BLOCKS[arch].rsplit(".", 1)[-1]
    assert any(
        line.strip(" │├└─").startswith(f"{name}  list[3]  (layers)") for line in capsys.readouterr().out.splitlines()
    )


def test_guess_without_a_model():
    def block(prefix: str, n: int) -> list[ModuleInfo]:
        out = [ModuleInfo(prefix, "list", "list")]
        for i in range(n):
            out += [
                ModuleInfo(f"{prefix}.{i}", "Container", "container"),
                ModuleInfo(f"{prefix}.{i}.fc", "Linear", "linear", 4, 4, num_params=16, has_params=True),
            ]
        return out

    assert guess_block_list(block("transformer.h", 2) + block("vision_tower.layers", 2)) == "transformer.h"
    assert guess_block_list(block("model.layers", 1) + block("model.blocks", 1)) == "model.layers"
    assert guess_block_list([ModuleInfo("x", "Linear", "linear", 2, 2)]) is None
    index = ModuleIndex(block("backbone.layers", 2))
    assert index.block_list == "backbone.layers"
    assert ModuleIndex(block("m.h", 2), block_list=None).block_list is None
