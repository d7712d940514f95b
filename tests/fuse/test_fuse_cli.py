"""`adapterspec fuse` on the command line: the erasure report, --strict, --keep-precision auto, refusals."""

from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import (  # noqa: E402
    MLX_LM_SPEC,
    fuse_in_memory,
    fused_model_in_memory,
    read_weights,
    write_adapters,
)

from adapterspec.cli import main  # noqa: E402

ATTENTION_SPEC = """adapterspec 1

layers[*].self_attn.<q,v>_proj: lora(r=4, scale=2.0)
"""
Q4 = {"group_size": 32, "bits": 4, "mode": "affine"}
# q_proj's change is a few float16 steps but far below half a 4-bit step; v_proj's is many 4-bit steps.
PLANTED = {"q_proj": 2e-3, "v_proj": 1.0}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    model = tiny.write(root / "model", "llama", dtype="float16", quantization=Q4)
    return model, write_adapters(model, root / "adapters", ATTENTION_SPEC, b_scales=PLANTED)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("d")
    model = tiny.write(root / "model", "llama", dtype="float32")
    return model, write_adapters(model, root / "adapters", MLX_LM_SPEC)


def fuse(*args) -> int:
    return main(["fuse", *map(str, args)])


def test_report_flags_the_erased_adapter_and_passes_the_surviving_one(quantized, tmp_path, capsys):
    model, adapters = quantized
    assert fuse(model, adapters, "-o", tmp_path / "out", "--report-json", tmp_path / "report.json") == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    status = {m["path"]: m for m in report["modules"]}
    for i in range(4):
        q, v = status[f"model.layers.{i}.self_attn.q_proj"], status[f"model.layers.{i}.self_attn.v_proj"]
        assert q["status"] == "lost" and q["kept"] < 0.25 and q["stored"] == "4-bit g32"
        assert v["status"] == "ok" and v["kept"] > 0.9 and v["error"] < 0.3
    assert report["counts"] == {"lost": 4, "partial": 0, "ok": 4, "zero": 0}
    assert "model.layers.*.self_attn.q_proj" in out and "lost" in out
    assert "warning: 4 module(s) keep less than 50% of their adapter or store a change no closer" in err
    assert (tmp_path / "out" / "config.json").is_file()


def test_strict_fails_with_exit_1_and_writes_nothing(quantized, tmp_path, capsys):
    model, adapters = quantized
    code = fuse(model, adapters, "-o", tmp_path / "out", "--strict", "--report-json", tmp_path / "r.json")
    err = capsys.readouterr().err
    assert code == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert "4 module(s) would keep less than 50% of their adapter" in err and "nothing was written" in err
    assert "--keep-precision auto" in err


def test_keep_precision_auto_stores_only_the_erased_modules_unquantized(quantized, tmp_path, capsys):
    from mlx_lm.utils import load_model

    model, adapters = quantized
    assert (
        fuse(model, adapters, "-o", tmp_path / "out", "--keep-precision", "auto", "--strict", "--requantize", "plain")
        == 0
    )
    assert "kept 4 module(s) unquantized" in capsys.readouterr().err
    q_paths = {f"model.layers.{i}.self_attn.q_proj" for i in range(4)}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k for k, v in config["quantization"].items() if v is False} == q_paths
    assert config["quantization_config"] == config["quantization"]
    weights = read_weights(tmp_path / "out")
    reference = fuse_in_memory(model, adapters, dense_paths=q_paths)
    assert set(weights) == set(reference)
    assert all(mx.array_equal(weights[k], reference[k]).item() for k in reference)
    assert (
        "model.layers.0.self_attn.q_proj.scales" not in weights and "model.layers.0.self_attn.v_proj.scales" in weights
    )

    fused, _ = load_model(tmp_path / "out")
    assert type(fused.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert type(fused.model.layers[0].self_attn.v_proj).__name__ == "QuantizedLinear"
    tokens = mx.array([[1, 5, 9, 42, 7, 100, 3]])
    expected = fused_model_in_memory(model, adapters, dense_paths=q_paths)(tokens)
    assert mx.array_equal(fused(tokens), expected).item()


def test_dense_model_keeps_its_adapter_and_zero_adapters_are_reported(dense, tmp_path):
    model, adapters = dense
    assert fuse(model, adapters, "-o", tmp_path / "out", "--report-json", tmp_path / "r.json", "--quiet") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"]["ok"] == len(report["modules"]) == 15
    assert all(m["kept"] > 0.999 and m["error"] < 1e-3 and m["stored"] == "float32" for m in report["modules"])

    untrained = write_adapters(model, tmp_path / "untrained", MLX_LM_SPEC, b_scale=0.0)
    assert fuse(model, untrained, "-o", tmp_path / "out2", "--report-json", tmp_path / "r2.json", "--quiet") == 0
    assert json.loads((tmp_path / "r2.json").read_text())["counts"]["zero"] == 15


def test_full_report_has_one_row_per_module(dense, tmp_path, capsys):
    model, adapters = dense
    assert fuse(model, adapters, "-o", tmp_path / "out", "--full-report") == 0
    out = capsys.readouterr().out
    assert "model.layers.3.mlp.up_proj" in out and "model.layers.*" not in out


def test_dequantize_writes_an_unquantized_model(quantized, tmp_path):
    model, adapters = quantized
    assert fuse(model, adapters, "-o", tmp_path / "out", "--dequantize", "--strict", "--quiet") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights = read_weights(tmp_path / "out")
    assert not [k for k in weights if k.endswith((".scales", ".biases"))]
    assert weights["model.embed_tokens.weight"].dtype == mx.float16


# ── refusals ────────────────────────────────────────────────────────────────


def test_refuses_a_non_empty_output_without_force(dense, tmp_path, capsys):
    model, adapters = dense
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert fuse(model, adapters, "-o", out) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_a_previous_fuse_but_never_a_file_it_did_not_write(dense, tmp_path, capsys):
    model, adapters = dense
    out = tmp_path / "out"
    assert fuse(model, adapters, "-o", out, "--quiet") == 0
    first = sorted(p.name for p in out.iterdir())
    assert fuse(model, adapters, "-o", out, "--force", "--quiet") == 0
    assert sorted(p.name for p in out.iterdir()) == first
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert fuse(model, adapters, "-o", out, "--force", "--quiet") == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "does not write" in err
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == sorted(
        first + ["notes.txt"]
    )


@pytest.mark.parametrize("where", ["model", "inside-model", "adapters", "parent-of-model"])
def test_refuses_to_write_into_the_inputs(dense, where, capsys):
    model, adapters = dense
    out = {"model": model, "inside-model": model / "fused", "adapters": adapters, "parent-of-model": model.parent}[
        where
    ]
    before = sorted(p.name for p in model.iterdir())
    assert fuse(model, adapters, "-o", out, "--force") == 2
    assert "overlaps the input directory" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before


def test_usage_errors_exit_2_with_a_message(dense, tmp_path, capsys):
    model, adapters = dense
    assert fuse(model, tmp_path / "nowhere", "-o", tmp_path / "out") == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    assert fuse(tmp_path / "no-model", adapters, "-o", tmp_path / "out") == 2
    assert "no such directory" in capsys.readouterr().err
    assert fuse(model, adapters, "-o", tmp_path / "out", "--max-shard-size", "lots") == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_max_shard_size_accepts_units():
    from adapterspec.commands.fuse import parse_size

    assert parse_size("5GiB") == 5 << 30
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1048576") == 1 << 20
    assert parse_size("1.5 gb") == 1_500_000_000


def test_a_change_below_bfloat16_precision_is_reported_even_unquantized(tmp_path, capsys):
    model = tiny.write(tmp_path / "model", "llama", dtype="bfloat16")
    adapters = write_adapters(model, tmp_path / "adapters", ATTENTION_SPEC, b_scales={"q_proj": 1e-6})
    assert fuse(model, adapters, "-o", tmp_path / "out", "--report-json", tmp_path / "r.json") == 0
    err = capsys.readouterr().err
    modules = {m["path"]: m for m in json.loads((tmp_path / "r.json").read_text())["modules"]}
    assert modules["model.layers.0.self_attn.q_proj"]["status"] == "lost"
    assert modules["model.layers.0.self_attn.v_proj"]["status"] == "ok"
    assert "below the precision of the weights' dtype" in err


def test_progress_is_silent_off_a_terminal_and_counts_bytes_on_one():
    import io

    from adapterspec.fuse.progress import Progress, TextProgress, progress_for

    assert type(progress_for(io.StringIO())) is Progress
    stream = io.StringIO()
    bar = TextProgress(stream)
    bar.start(2_000_000_000, 2)
    bar.shard(1)
    bar.advance(1_000_000_000)
    bar.shard(2)
    bar.advance(1_000_000_000)
    bar.close()
    assert "shard 2/2" in stream.getvalue() and "2.00/2.00 GB" in stream.getvalue()


def test_a_system_error_is_a_message_and_exit_1_not_a_traceback(dense, tmp_path, capsys, monkeypatch):
    import adapterspec.fuse.run as fuse

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(fuse, "fuse_model_dir", full_disk)
    model, adapters = dense
    assert main(["fuse", str(model), str(adapters), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: No space left on device" in err and "model.safetensors" in err and "Traceback" not in err


def test_the_fused_config_carries_the_generation_eos_token_as_mlx_lm_fuse_writes_it(tmp_path):
    from mlx_lm.utils import load_config

    model = tiny.write(tmp_path / "model", "llama", dtype="float32")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    adapters = write_adapters(model, tmp_path / "adapters", MLX_LM_SPEC)
    assert fuse(model, adapters, "-o", tmp_path / "out", "--quiet") == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == [2, 7] == load_config(model)["eos_token_id"]


def test_apply_warns_when_the_spec_rescales_the_given_adapters(dense, tmp_path, capsys):
    model, adapters = dense  # saved at scale 2.0 (MLX_LM_SPEC)
    rescaled = tmp_path / "rescaled.aspec"
    rescaled.write_text(MLX_LM_SPEC.replace("scale=2.0", "scale=8.0"))
    argv = ["apply", str(model), str(rescaled), "--adapters", str(adapters), "--fuse"]
    assert main([*argv, "--strict", "-o", str(tmp_path / "strict")]) == 1
    assert "e.g. 'model.layers.1.mlp.down_proj': 8 instead of 2, 4× the trained effect" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
    assert main([*argv, "-o", str(tmp_path / "fused")]) == 0
    assert "warning: the spec gives 15 module(s) another scale" in capsys.readouterr().err
    fused, base = read_weights(tmp_path / "fused"), read_weights(model)
    expected = fuse_in_memory(model, adapters)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert mx.allclose(fused[name] - base[name], 4 * (expected[name] - base[name]), atol=1e-5).item()
    same = spec_file(tmp_path, MLX_LM_SPEC)
    assert main(["apply", str(model), same, "--adapters", str(adapters), "-o", str(tmp_path / "same")]) == 0
    assert "warning" not in capsys.readouterr().err, "the spec it was saved with rescales nothing"


def spec_file(tmp_path, text: str) -> str:
    path = tmp_path / "spec.aspec"
    path.write_text(text)
    return str(path)


def test_apply_dequantize_without_fuse_is_a_usage_error(dense, tmp_path, capsys):
    model, adapters = dense
    spec = spec_file(tmp_path, MLX_LM_SPEC)
    assert (
        main(["apply", str(model), spec, "--adapters", str(adapters), "--dequantize", "-o", str(tmp_path / "o")]) == 2
    )
    assert "--dequantize needs --fuse" in capsys.readouterr().err and not (tmp_path / "o").exists()
