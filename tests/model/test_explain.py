"""explain: per module the deciding rule, the overridden rules, and why other rules do not apply; never imports mlx."""

from __future__ import annotations

import json
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
    with pytest.raises(UserError, match="matches no module"):
        selected_paths("nothing_here", moe)
    with pytest.raises(UserError, match="neither a module path nor a selector"):
        selected_paths("layers[", moe)


def test_cli_json(tmp_path, capsys):
    spec = tmp_path / "s.aspec"
    spec.write_text(SPEC)
    model = str(models.example_model_dir("tiny-moe"))
    assert main(["explain", str(spec), model, "layers[2].self_attn.q_proj", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (module,) = payload["modules"]
    assert module["path"] == "model.layers.2.self_attn.q_proj" and module["adapter"]["r"] == 8
    assert [r["status"] for r in module["rules"]] == [OVERRIDDEN, DECIDES, MISSES]


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
