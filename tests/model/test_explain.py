"""explain: per module the deciding rule, the overridden rules, and why other rules do not apply; never imports mlx."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import models
import pytest

from adapterspec.cli import main
from adapterspec.errors import UserError
from adapterspec.language.lint import parse_spec
from adapterspec.model.explain import (
    CANNOT,
    DECIDES,
    MISSES,
    OVERRIDDEN,
    explain,
    selected_paths,
)
from adapterspec.model.index import ModuleIndex
from adapterspec.model.plan import make_plan

SPEC = """\
defaults lora(r=4)
**@linear: lora
layers[-2:].self_attn.<q,v>_proj: lora(r=8)
layers[0]: none
**.*norm: full
"""

SELF_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm"]


@pytest.fixture(scope="module")
def moe():
    return ModuleIndex.from_model_dir(models.example_model_dir("tiny-moe"))


def explained(index, path: str, spec: str = SPEC):
    plan = make_plan(parse_spec(spec), index)
    (item,) = explain(plan, index, {path})
    return item, {v.line: v for v in item.verdicts}


def test_later_rule_decides_and_earlier_is_overridden(moe):
    item, by_line = explained(moe, "model.layers.2.self_attn.q_proj")
    assert item.outcome == "lora(r=8, scale=20)"
    assert by_line[3].status == DECIDES
    assert by_line[2].status == OVERRIDDEN and "line 3 comes later" in by_line[2].reason
    assert by_line[4].status == MISSES and "'model.layers.2'" in by_line[4].reason


def test_none_rule_on_a_container(moe):
    item, by_line = explained(moe, "model.layers.0.self_attn.q_proj")
    assert item.outcome.startswith("none")
    assert by_line[4].status == DECIDES and "container 'model.layers.0'" in by_line[4].reason
    assert by_line[3].status == MISSES


def test_type_filter_keeps_experts_out(moe):
    item, by_line = explained(moe, "model.layers.1.mlp.switch_mlp.up_proj")
    assert item.outcome.startswith("nothing")
    assert by_line[2].status == CANNOT and "@linear" in by_line[2].reason and "SwitchLinear" in by_line[2].reason


def test_transform_that_cannot_adapt_the_module(moe):
    item, by_line = explained(moe, "model.norm", "**.*norm: lora\nq_proj: lora\n")
    assert by_line[1].status == CANNOT and "not Norm" in by_line[1].reason
    assert 2 not in by_line


def test_rule_with_an_error_on_the_model():
    quantized = ModuleIndex.from_model_dir(models.example_model_dir("tiny-llama-4bit"))
    _, by_line = explained(quantized, "model.layers.1.mlp.up_proj", "mlp: full\n")
    assert by_line[1].status == CANNOT and "full cannot train the quantized weights" in by_line[1].reason


def test_dora_on_the_experts_is_switch_dora(moe):
    item, by_line = explained(moe, "model.layers.1.mlp.switch_mlp.up_proj", "mlp: dora(r=4)\n")
    assert by_line[1].status == DECIDES
    assert item.outcome == "switch-dora(r=4, scale=20)"


def test_filters(moe):
    assert selected_paths("model.layers.1.mlp.gate", moe) == {"model.layers.1.mlp.gate"}
    paths = selected_paths("layers[0].self_attn", moe)
    assert "model.layers.0.self_attn.q_proj" in paths and not any(".1." in p for p in paths)
    with pytest.raises(UserError, match="'nothing_here' matches 0 modules"):
        selected_paths("nothing_here", moe)
    with pytest.raises(UserError, match="neither a module path nor a selector"):
        selected_paths("layers[", moe)


def test_a_type_filter_selects_only_the_modules_that_pass_it(moe):
    assert selected_paths("layers[0]@experts", moe) == {
        f"model.layers.0.mlp.switch_mlp.{name}_proj" for name in ("down", "gate", "up")
    }
    assert selected_paths("**@embedding", moe) == {"model.embed_tokens"}
    assert selected_paths("layers[-1].self_attn@Linear", moe) == {
        f"model.layers.2.self_attn.{name}_proj" for name in "qkvo"
    }
    with pytest.raises(UserError, match="'layers\\[0\\]@embedding' matches 0 modules") as raised:
        selected_paths("layers[0]@embedding", moe)
    assert raised.value.exit_code == 1


def tree_marks(capsys, model: str, selector: str) -> tuple[int, int]:
    """`tree`'s exit status and the number of modules it says the selector matches."""
    code = main(["tree", model, selector])
    count = re.search(r"'.*' matches (\d+) modules?$", capsys.readouterr().out.strip()).group(1)
    return code, int(count)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-moe", "tiny-qwen2-vl"])
@pytest.mark.parametrize(
    "selector",
    [
        "layers[0]@experts",
        "layers[0]@embedding",
        "layers[0]@attention",
        "**@Embedding",
        "*@linear",
        "**.<q,gate>_proj@linear",
        "layers[-2:]@mlp",
        "layers[::2]@switch",
        "layers[0,1].mlp@router",
        "/model@shared_expert",
        "/lm_head@head",
        "**.*norm@linear",
    ],
)
def test_cli_selector_with_a_type_filter_selects_what_tree_marks(tmp_path, capsys, model, selector):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    model_dir = str(models.example_model_dir(model))
    tree_code, marked = tree_marks(capsys, model_dir, selector)
    code = main(["explain", str(spec), model_dir, selector, "--json"])
    captured = capsys.readouterr()
    assert code == tree_code
    if marked:
        assert len(json.loads(captured.out)["modules"]) == marked
    else:
        assert not captured.out and f"'{selector}' matches 0 modules" in captured.err


@pytest.mark.parametrize(
    ("selector", "beneath"),
    [
        ("layers[-1:]", [f"model.layers.3.{m}" for m in SELF_ATTN + MLP + NORMS]),
        (
            "layers[::2].mlp",
            [f"model.layers.{i}.mlp.{m}" for i in (0, 2) for m in ("down_proj", "gate_proj", "up_proj")],
        ),
        ("/model.layers.1.**.<q,up>_proj", ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
    ],
)
def test_cli_selector_without_a_type_filter_selects_its_matches_and_all_beneath(tmp_path, capsys, selector, beneath):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    assert main(["explain", str(spec), str(models.example_model_dir("tiny-llama")), selector, "--json"]) == 0
    assert sorted(m["path"] for m in json.loads(capsys.readouterr().out)["modules"]) == sorted(beneath)


def test_cli_bad_selector_fails_as_in_tree(tmp_path, capsys):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    model = str(models.example_model_dir("tiny-llama"))
    assert main(["tree", model, ".*@linear"]) == 1
    assert main(["explain", str(spec), model, ".*@linear"]) == 1
    assert "neither a module path nor a selector" in capsys.readouterr().err


def test_cli_json(tmp_path, capsys):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    model = str(models.example_model_dir("tiny-moe"))
    assert main(["explain", str(spec), model, "layers[2].self_attn.q_proj", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (module,) = payload["modules"]
    assert module["path"] == "model.layers.2.self_attn.q_proj" and module["adapter"]["r"] == 8
    assert [r["status"] for r in module["rules"]] == [OVERRIDDEN, DECIDES, MISSES]


def test_cli_json_of_a_spec_with_errors_holds_its_diagnostics(tmp_path, capsys):
    spec = tmp_path / "s.aspec"
    spec.write_text("q_proj: lora(rank=8)\n")
    assert main(["explain", str(spec), str(models.example_model_dir("tiny-llama")), "--json"]) == 1
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["modules"] == []
    (diagnostic,) = payload["diagnostics"]
    assert diagnostic["code"] == "AS201" and diagnostic["span"]["line"] == 1
    assert "AS201 unknown argument 'rank'" in captured.err


def test_cli_text_lists_every_adaptable_module(tmp_path, capsys):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    assert main(["explain", str(spec), str(models.example_model_dir("tiny-llama"))]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.self_attn.v_proj (Linear): lora(r=8, scale=20)" in out
    assert "model.embed_tokens (Embedding): nothing (no rule reaches it: stays frozen)" in out


def test_explain_and_config_imports_never_import_mlx(tmp_path):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": r".*q_proj"})
    )
    mlx_lm = tmp_path / "lora.json"
    mlx_lm.write_text(json.dumps({"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1.0, "dropout": 0.0}}))
    model = str(models.example_model_dir("tiny-llama"))
    code = textwrap.dedent(f"""
        import sys
        from adapterspec.cli import main
        assert main(["explain", {str(spec)!r}, {model!r}]) == 0
        assert main(["import", "peft", {str(peft_dir)!r}, "--model", {model!r}]) == 0
        assert main(["import", "mlx-lm", {str(mlx_lm)!r}, "--model", {model!r}]) == 0
        assert not [m for m in sys.modules if m == "mlx" or m.startswith("mlx.")], "mlx was imported"
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=models.ROOT)
    assert result.returncode == 0, result.stderr
