"""The model-facing commands end to end: tree, plan, apply (exit codes, output, files written)."""

from __future__ import annotations

import json
import subprocess
import sys

import models as tiny
import pytest

from adapterspec.cli import main

LLAMA = str(tiny.example_model_dir("tiny-llama"))
MOE = str(tiny.example_model_dir("tiny-moe"))


@pytest.fixture
def spec_file(tmp_path):
    def write(text: str, name: str = "s.aspec"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def test_tree_folds_identical_blocks_and_marks_selector(capsys):
    assert main(["tree", MOE, "layers[-2:].mlp.switch_mlp.*"]) == 0
    out = capsys.readouterr().out
    assert "layers[1..2] ×2" in out
    assert "SwitchLinear 4×(64→64)" in out
    assert out.count("── ● ") == 3
    assert "matches 6 modules" in out


def test_tree_without_fold_lists_every_block(capsys):
    assert main(["tree", LLAMA, "--no-fold"]) == 0
    out = capsys.readouterr().out
    assert "layers[" not in out
    assert out.count("q_proj") == 4


def test_tree_selector_that_matches_nothing_fails(capsys):
    assert main(["tree", LLAMA, "qq_proj"]) == 1
    assert "matches 0 modules" in capsys.readouterr().out


def test_tree_bad_selector_is_a_diagnostic(capsys):
    assert main(["tree", LLAMA, "layers[1"]) == 1
    assert "AS104" in capsys.readouterr().err


def test_plan_table_totals_and_compatibility(spec_file, capsys):
    path = spec_file("layers[*].self_attn.<q,v>_proj: lora(r=8, scale=20)\n")
    assert main(["plan", LLAMA, path]) == 0
    out = capsys.readouterr().out
    assert "layers[*].self_attn.<q,v>_proj" in out
    assert "8 modules adapted" in out
    assert "mlx-lm compatible: yes" in out


def test_plan_json_lists_modules_with_rule_positions(spec_file, capsys):
    path = spec_file("# attention\nself_attn.q_proj: lora(r=4)\nlayers[0]: none\n")
    assert main(["plan", LLAMA, path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    paths = [m["path"] for m in plan["modules"]]
    assert paths == [f"model.layers.{i}.self_attn.q_proj" for i in (1, 2, 3)]
    first = plan["modules"][0]
    assert first["rule"]["line"] == 2 and first["r"] == 4 and first["adapter"] == "lora"
    assert first["trainable"] == 4 * (64 + 64)
    assert plan["trainable_parameters"] == 3 * 4 * 128
    assert plan["total_parameters"] > plan["trainable_parameters"]


def test_plan_mixed_ranks_explains_mlx_lm_incompatibility(spec_file, capsys):
    path = spec_file("q_proj: lora(r=4)\nv_proj: lora(r=8)\n")
    assert main(["plan", MOE, path]) == 0
    assert "mlx-lm compatible: no" in capsys.readouterr().out


def test_plan_matching_errors_exit_1_with_spans(spec_file, capsys):
    path = spec_file("qq_proj: lora\n**.input_layernorm: lora\n")
    assert main(["plan", LLAMA, path]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1:1: AS301" in err and "did you mean 'q_proj'" in err
    assert f"{path}:2:1: AS302" in err


def test_plan_json_of_a_spec_with_errors_holds_its_diagnostics(spec_file, capsys):
    path = spec_file("q_proj: lora(rank=8)\nk_proj: lora(r=4, r=8)\n")
    assert main(["plan", LLAMA, path, "--json"]) == 1
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["modules"] == [] and plan["trainable_parameters"] == 0
    assert [(d["code"], d["severity"], d["span"]["line"]) for d in plan["diagnostics"]] == [
        ("AS201", "error", 1),
        ("AS209", "error", 2),
    ]
    assert f"{path}:1:14: AS201" in captured.err


def test_plan_strict_fails_on_warnings(spec_file):
    path = spec_file("q_proj: lora\nq_proj: none\nk_proj: lora\n")
    assert main(["plan", LLAMA, path]) == 0
    assert main(["plan", LLAMA, path, "--strict"]) == 1


def test_plan_missing_model_is_a_usage_error(spec_file, tmp_path, capsys):
    path = spec_file("q_proj: lora\n")
    assert main(["plan", str(tmp_path / "nope"), path]) == 2
    assert "error:" in capsys.readouterr().err


def test_apply_writes_an_adapter_directory_mlx_lm_loads(spec_file, tmp_path):
    from mlx_lm.utils import load

    path = spec_file("layers[-2:].self_attn.<q,v>_proj: lora(r=4, scale=10)\n")
    out = tmp_path / "adapters"
    assert main(["apply", LLAMA, path, "-o", str(out), "--seed", "3"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["adapterspec"]["spec"].startswith("layers[-2:]")
    assert config["num_layers"] == 2 and config["lora_parameters"]["rank"] == 4
    model, _tokenizer = load(LLAMA, adapter_path=str(out))
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_a")]
    assert len(adapted) == 4


def test_apply_is_seeded(spec_file, tmp_path):
    import mlx.core as mx

    path = spec_file("q_proj: lora(r=2)\n")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(["apply", LLAMA, path, "-o", str(tmp_path / name), "--seed", seed]) == 0
    a, b, c = (mx.load(str(tmp_path / n / "adapters.safetensors")) for n in "abc")
    key = "model.layers.0.self_attn.q_proj.lora_a"
    assert mx.array_equal(a[key], b[key]) and not mx.array_equal(a[key], c[key])


def test_apply_refuses_non_empty_output_and_spec_errors_write_nothing(spec_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    good = spec_file("q_proj: lora\n", "good.aspec")
    assert main(["apply", LLAMA, good, "-o", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    bad = spec_file("qq_proj: lora\n", "bad.aspec")
    fresh = tmp_path / "fresh"
    assert main(["apply", LLAMA, bad, "-o", str(fresh)]) == 1
    assert not fresh.exists()


def test_apply_with_given_adapters_keeps_their_weights(spec_file, tmp_path):
    import mlx.core as mx

    path = spec_file("q_proj: lora(r=2)\n")
    assert main(["apply", LLAMA, path, "-o", str(tmp_path / "first"), "--seed", "5"]) == 0
    weights = str(tmp_path / "first" / "adapters.safetensors")
    assert main(["apply", LLAMA, path, "-o", str(tmp_path / "second"), "--adapters", weights]) == 0
    first = mx.load(weights)
    second = mx.load(str(tmp_path / "second" / "adapters.safetensors"))
    assert all(mx.array_equal(first[k], second[k]) for k in first)
    wrong = spec_file("q_proj: lora(r=3)\n", "wrong.aspec")
    assert main(["apply", LLAMA, wrong, "-o", str(tmp_path / "third"), "--adapters", weights]) == 2
    assert not (tmp_path / "third").exists()


def test_cli_errors_never_show_a_traceback(tmp_path):
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{not json")
    spec = tmp_path / "s.aspec"
    spec.write_text("q_proj: lora\n")
    for argv in (
        ["plan", str(bad_model), str(spec)],
        ["tree", str(bad_model)],
        ["plan", LLAMA, str(tmp_path / "missing.aspec")],
    ):
        result = subprocess.run([sys.executable, "-m", "adapterspec", *argv], capture_output=True, text=True)
        assert result.returncode == 2, (argv, result.stderr)
        assert "Traceback" not in result.stderr
        assert "error:" in result.stderr


def test_apply_fuse_writes_a_model_equal_to_the_adapted_one(spec_file, tmp_path, capsys):
    import mlx.core as mx
    from mlx_lm.utils import load

    path = spec_file("layers[-2:].self_attn.<q,v>_proj: lora(r=4, scale=2)\n")
    trained = tmp_path / "trained"
    assert main(["apply", LLAMA, path, "-o", str(trained)]) == 0
    weights = mx.load(str(trained / "adapters.safetensors"))
    mx.random.seed(1)
    weights = {k: (mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v) for k, v in weights.items()}
    loose = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(loose), weights)
    fused = tmp_path / "fused"
    assert main(["apply", LLAMA, path, "--adapters", str(loose), "--fuse", "-o", str(fused)]) == 0
    assert "fused 4 adapter(s)" in capsys.readouterr().err
    tokens = mx.array([[1, 5, 9, 13, 2]])
    adapted, _ = load(LLAMA, adapter_path=str(trained))
    adapted.load_weights(list(weights.items()), strict=False)
    merged, _ = load(str(fused))
    assert not any(hasattr(m, "lora_a") for _, m in merged.named_modules())
    assert mx.allclose(adapted(tokens), merged(tokens), atol=1e-4).item()


def test_plan_and_apply_report_the_same_matches(tmp_path, capsys):
    spec = str(tiny.ROOT / "examples" / "specs" / "moe.aspec")
    assert main(["plan", MOE, spec]) == 0
    planned = capsys.readouterr().out.split("\n\n")[0]
    assert main(["apply", MOE, spec, "-o", str(tmp_path / "a")]) == 0
    applied = capsys.readouterr().out.split("\n\n")[0]
    assert planned == applied
    assert "switch_mlp.*          6        6" in planned
