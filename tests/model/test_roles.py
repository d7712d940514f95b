"""Routed experts, routers, and the MoE diagnostics AS309 (experts left without adapters) and AS311 (router)."""

from __future__ import annotations

import models as tiny
import pytest

from adapterspec.language.lint import parse_spec
from adapterspec.model.index import ModuleIndex, ModuleInfo
from adapterspec.model.plan import make_plan
from adapterspec.model.roles import routed_experts, routers


@pytest.fixture(scope="module")
def moe():
    return ModuleIndex.from_model_dir(tiny.example_model_dir("tiny-moe"))


def codes(spec: str, index) -> list[str]:
    return [d.code for d in make_plan(parse_spec(spec), index).diagnostics if d.code in ("AS309", "AS311")]


def test_roles_of_qwen2_moe(moe):
    experts = routed_experts(moe)
    assert len(experts) == 9 and all(".switch_mlp." in p for p in experts)
    assert routers(moe) == [f"model.layers.{i}.mlp.gate" for i in range(3)]  # not shared_expert_gate


def test_as309_when_the_experts_are_left_out(moe):
    assert codes("**@linear: lora(r=4)\n", moe) == ["AS309", "AS311"]
    assert codes("layers[*].self_attn.*_proj: lora(r=4)\n", moe) == ["AS309"]
    assert codes("**: lora(r=4)\n", moe) == ["AS311"]
    assert codes("layers[*].self_attn.*_proj: lora(r=4)\n**@switch: none\n", moe) == []  # said on purpose
    assert codes("layers[*].self_attn.*_proj: lora(r=4)\n**@switch: lora(r=2)\n", moe) == []
    assert codes("/lm_head: lora(r=4)\n", moe) == []  # outside the blocks: no hole in the mixture


def test_dense_models_get_neither():
    index = ModuleIndex.from_model_dir(tiny.example_model_dir("tiny-llama"))
    assert routed_experts(index) == [] and codes("**@linear: lora(r=4)\n", index) == []


def test_per_expert_linears_and_a_nested_router():
    infos = [ModuleInfo("blocks", "list", "list"), ModuleInfo("blocks.0", "Block", "container")]
    infos += [ModuleInfo("blocks.0.attn", "Attn", "container"),
              ModuleInfo("blocks.0.attn.wqkv", "Linear", "linear", 8, 24, has_params=True),
              ModuleInfo("blocks.0.ffn", "MoE", "container"),
              ModuleInfo("blocks.0.ffn.router", "Router", "container"),
              ModuleInfo("blocks.0.ffn.router.layer", "Linear", "linear", 8, 2, has_params=True),
              ModuleInfo("blocks.0.ffn.experts", "list", "list")]  # fmt: skip
    for e in range(2):
        infos += [ModuleInfo(f"blocks.0.ffn.experts.{e}", "Expert", "container"),
                  ModuleInfo(f"blocks.0.ffn.experts.{e}.w1", "Linear", "linear", 8, 16, has_params=True)]  # fmt: skip
    index = ModuleIndex(infos)
    assert routed_experts(index) == ["blocks.0.ffn.experts.0.w1", "blocks.0.ffn.experts.1.w1"]
    assert routers(index) == ["blocks.0.ffn.router.layer"]
    assert codes("layers[*].attn.wqkv: lora(r=2)\n", index) == ["AS309"]


def test_role_type_filters(moe):
    def paths(spec):
        return {e.path.split(".", 3)[-1] for e in make_plan(parse_spec(spec), moe).entries}

    assert paths("**@experts: lora(r=2)\n") == {f"mlp.switch_mlp.{n}_proj" for n in ("down", "gate", "up")}
    assert paths("**@router: lora(r=2)\n") == {"mlp.gate"}
    assert paths("**@shared_expert: lora(r=2)\n") == {"mlp.shared_expert_gate"} | {
        f"mlp.shared_expert.{n}_proj" for n in ("down", "gate", "up")
    }
    assert paths("**@attention: lora(r=2)\n") == {f"self_attn.{n}_proj" for n in "qkvo"}
    assert paths("**@mlp: lora(r=2)\n") == paths("**@shared_expert: lora(r=2)\n")
    assert [e.path for e in make_plan(parse_spec("**@head: lora(r=2)\n"), moe).entries] == ["lm_head"]
    assert paths("layers[0]@embedding: lora(r=2)\n**@embedding: lora(r=2)\n") == {"embed_tokens"}
    # a dense model has no experts: AS304 says the filter excludes everything
    dense = ModuleIndex.from_model_dir(tiny.example_model_dir("tiny-llama"))
    assert [d.code for d in make_plan(parse_spec("**@experts: lora\n"), dense).diagnostics] == ["AS304"]
    assert {e.path.rsplit(".", 1)[-1] for e in make_plan(parse_spec("**@mlp: lora(r=2)\n"), dense).entries} == {
        "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


def test_tree_marks_each_role_once_on_the_highest_module_that_has_it(capsys):
    from adapterspec.cli import main

    assert main(["tree", str(tiny.example_model_dir("tiny-moe"))]) == 0
    out = capsys.readouterr().out
    assert "gate  Linear 64→4  @router" in out and "switch_mlp  Container  @experts" in out
    assert "shared_expert  Container  @mlp @shared_expert" in out and "self_attn  Container  @attention" in out
    assert "lm_head  Linear 64→320  @head" in out and "embed_tokens  Embedding 320×64  @embedding" in out
    assert "SwitchLinear 4×(64→64)  @" not in out  # said once, by switch_mlp
    assert "── mlp  Container\n" in out  # a mixture holds several roles


def test_hugging_face_expert_names_get_the_stacked_module(tmp_path):
    """The per-expert names users paste from PEFT configs get a help naming mlx-lm's SwitchLinear, with the
    model type's renames (Mixtral's w1 is gate_proj) and the model's own container."""
    mixtral = ModuleIndex.from_model_dir(tiny.write(tmp_path / "mixtral", "mixtral", with_tokenizer=False))

    def help_of(spec, index):
        (diagnostic,) = [d for d in make_plan(parse_spec(spec), index).diagnostics if d.code == "AS301"]
        return diagnostic.message, diagnostic.help

    message, help_text = help_of("layers[1:].block_sparse_moe.experts.2.w1: lora(r=2)\n", mixtral)
    assert "expert 2 of 'model.layers.0.block_sparse_moe.switch_mlp.gate_proj' (SwitchLinear" in message
    assert "write 'layers[1:].block_sparse_moe.switch_mlp.gate_proj'" in help_text
    message, help_text = help_of("model.layers.0.mlp.experts.*.w2: lora(r=2)\n", mixtral)
    assert (
        "switch_mlp.down_proj" in message
        and "write 'model.layers.0.block_sparse_moe.switch_mlp.down_proj'" in help_text
    )
    # a written spec with the suggested selector plans on the experts
    fixed = make_plan(parse_spec("layers[1:].block_sparse_moe.switch_mlp.gate_proj: lora(r=2)\n"), mixtral)
    assert fixed.ok and {e.adapter for e in fixed.entries} == {"switch-lora"}
    # a dense model has no stacked experts: the usual did-you-mean
    dense = ModuleIndex.from_model_dir(tiny.example_model_dir("tiny-llama"))
    assert "SwitchLinear" not in help_of("layers[*].mlp.experts.0.w1: lora\n", dense)[0]


def test_a_router_that_is_no_linear_is_named_when_at_router_finds_nothing(tmp_path):
    """deepseek's routers keep their weight themselves (MoEGate): '@router' matches nothing, and says why."""
    infos = [ModuleInfo("layers", "list", "list"), ModuleInfo("layers.0", "Block", "container"),
             ModuleInfo("layers.0.mlp", "MoE", "container"),
             ModuleInfo("layers.0.mlp.gate", "MoEGate", "leaf", has_params=True),
             ModuleInfo("layers.0.mlp.switch_mlp", "SwitchGLU", "container"),
             ModuleInfo("layers.0.mlp.switch_mlp.up_proj", "SwitchLinear", "switch", 8, 16, 4, has_params=True)]  # fmt: skip
    (diagnostic,) = make_plan(parse_spec("layers[*].**@router: lora(r=2)\n"), ModuleIndex(infos)).diagnostics
    assert diagnostic.code == "AS304" and "router 'layers.0.mlp.gate' holds its weight itself" in diagnostic.help
