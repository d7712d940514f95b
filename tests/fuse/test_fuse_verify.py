"""`fuse --verify` and `adapterspec verify`: the fused model against the adapted one; the erasure report's statuses."""

from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import MLX_LM_SPEC, fuse_in_memory, read_weights, write_adapters  # noqa: E402

from adapterspec.cli import main  # noqa: E402

Q4 = {"group_size": 32, "bits": 4, "mode": "affine"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A 4-bit llama with adapters whose change is far below half a 4-bit step (as after a short training)."""
    root = tmp_path_factory.mktemp("q")
    model = tiny.write(root / "model", "llama", dtype="float16", quantization=Q4)
    return model, write_adapters(model, root / "small", MLX_LM_SPEC, b_scale=1e-3)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("d")
    model = tiny.write(root / "model", "llama", dtype="float32")
    return model, write_adapters(model, root / "adapters", MLX_LM_SPEC, b_scale=0.5)


def run(*args) -> int:
    return main([*map(str, args)])


def mlx_lm_log_probs(model_dir, adapter_dir, tokens):
    """Log-probabilities of mlx-lm's own model, with mlx-lm's adapter layers when `adapter_dir` is given."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    if adapter_dir is not None:
        model = load_adapters(model, str(adapter_dir))
    model.eval()
    logits = model(mx.array(tokens)).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_verify_passes_a_good_fuse_and_agrees_with_mlx_lm(dense, tmp_path, capsys):
    model, adapters = dense
    code = run("fuse", model, adapters, "-o", tmp_path / "out", "--verify", "--strict", "--quiet",
               "--report-json", tmp_path / "r.json", "--verify-sequences", 3, "--verify-length", 16)  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    verify = report["verify"]
    assert verify["status"] == "ok" and verify["tokens"] == 48
    assert verify["effect_kept"] == pytest.approx(1.0, abs=1e-3) and verify["effect_error"] < 1e-2
    assert verify["fused_vs_adapted"]["top1_agreement"] == 1.0 and verify["fused_vs_adapted"]["kl_mean"] < 1e-6
    assert report["counts"]["ok"] == len(report["modules"])

    # The base-vs-adapted figures are those of mlx-lm's own model and adapter layers on the same tokens.
    from adapterspec.fuse.verify import sample_sequences

    tokens = sample_sequences(model, 3, 16, 0)
    base, adapted = mlx_lm_log_probs(model, None, tokens), mlx_lm_log_probs(model, adapters, tokens)
    kl = mx.sum(mx.exp(adapted) * (adapted - base), axis=-1)
    assert verify["base_vs_adapted"]["kl_mean"] == pytest.approx(mx.mean(kl).item(), rel=1e-3)
    assert verify["base_vs_adapted"]["kl_max"] == pytest.approx(mx.max(kl).item(), rel=1e-3)
    agree = mx.mean(mx.argmax(base, axis=-1) == mx.argmax(adapted, axis=-1)).item()
    assert verify["base_vs_adapted"]["top1_agreement"] == pytest.approx(agree)


def test_verify_catches_a_fuse_that_erased_the_adapter(quantized, tmp_path, capsys):
    model, adapters = quantized
    code = run("fuse", model, adapters, "-o", tmp_path / "out", "--verify", "--strict", "--quiet",
               "--keep-precision", "never", "--requantize", "plain", "--verify-sequences", 3, "--verify-length", 16)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "out").exists()
    assert "nothing was written" in err

    # The same fuse written without checks, then verified on its own.
    assert run("fuse", model, adapters, "-o", tmp_path / "plain", "--quiet", "--requantize", "plain") == 0
    capsys.readouterr()
    code = run("verify", model, adapters, tmp_path / "plain", "--strict", "--report-json", tmp_path / "v.json",
               "--verify-sequences", 3, "--verify-length", 16)  # fmt: skip
    out = capsys.readouterr().out
    verify = json.loads((tmp_path / "v.json").read_text())["verify"]
    assert code == 1 and verify["status"] == "lost" and verify["effect_error"] > 1
    # Requantization noise moves the outputs further from the adapted model than the adapter itself does.
    assert verify["fused_vs_adapted"]["kl_mean"] > verify["base_vs_adapted"]["kl_mean"]
    assert "no closer to the adapted model than the base is" in out
    assert run("verify", model, adapters, tmp_path / "plain", "--verify-sequences", 2, "--verify-length", 8) == 0


def test_the_erasure_report_judges_by_the_error_too(quantized, tmp_path):
    """Tiny adapters (a change of about a float16 step) under requantization noise: kept is noise (far from 1 either
    way, sometimes near it) and the error is over 1."""
    model, _ = quantized
    tiny_adapters = write_adapters(model, tmp_path / "tiny", MLX_LM_SPEC, b_scale=1e-4)
    report_file = tmp_path / "r.json"
    assert run("fuse", model, tiny_adapters, "-o", tmp_path / "out", "--quiet", "--requantize", "plain",
               "--report-json", report_file) == 0  # fmt: skip
    modules = json.loads(report_file.read_text())["modules"]
    assert all(m["error"] > 1 and m["status"] == "lost" for m in modules)
    assert any(m["kept"] > 0.9 for m in modules), "some modules' kept share alone would have said ok"
    assert run("fuse", model, tiny_adapters, "-o", tmp_path / "strict", "--quiet", "--strict") == 1
    assert run("fuse", model, tiny_adapters, "-o", tmp_path / "auto", "--quiet", "--keep-precision", "auto") == 0
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert sum(1 for v in config["quantization"].values() if v is False) == len(modules)
    # Block 0 is not adapted and keeps its scales; the others do not: the model still loads (mixed precision).
    assert run("verify", model, tiny_adapters, tmp_path / "auto", "--verify-sequences", 2, "--verify-length", 8) == 0


def test_verify_reads_mlx_lm_jsonl(dense, tmp_path, capsys):
    model, adapters = dense
    data = tmp_path / "data"
    data.mkdir()
    lines = [{"text": "the quick brown fox"}, {"prompt": "a b", "completion": "c d e"}, {"text": "jumps over"}]
    (data / "valid.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run("fuse", model, adapters, "-o", tmp_path / "out", "--quiet") == 0
    code = run("verify", model, adapters, tmp_path / "out", "--data", data, "--report-json", tmp_path / "v.json")
    verify = json.loads((tmp_path / "v.json").read_text())["verify"]
    assert code == 0 and verify["sequences"] == 3 and verify["tokens_from"].endswith("valid.jsonl")
    (data / "valid.jsonl").write_text('{"other": 1}\n')
    assert run("verify", model, adapters, tmp_path / "out", "--data", data) == 2
    assert "valid.jsonl:1: none of mlx-lm's layouts" in capsys.readouterr().err


def test_adapters_that_change_nothing_pass_only_where_the_fused_model_gives_the_adapted_outputs(
    dense, tmp_path, capsys
):
    model, adapters = dense
    zero = write_adapters(model, tmp_path / "zero", MLX_LM_SPEC, b_scale=0.0)
    assert run("fuse", model, zero, "-o", tmp_path / "same", "--quiet") == 0
    assert run("fuse", model, adapters, "-o", tmp_path / "moved", "--quiet") == 0
    capsys.readouterr()
    short = ("--verify-sequences", 2, "--verify-length", 8)
    assert (
        run("verify", model, zero, tmp_path / "same", "--strict", "--report-json", tmp_path / "same.json", *short) == 0
    )
    assert json.loads((tmp_path / "same.json").read_text())["verify"]["status"] == "zero"
    code = run("verify", model, zero, tmp_path / "moved", "--strict", "--report-json", tmp_path / "moved.json", *short)
    verify = json.loads((tmp_path / "moved.json").read_text())["verify"]
    assert code == 1 and verify["status"] == "changed" and verify["effect_kept"] is None
    assert not verify["fused_vs_adapted"]["within_rounding"] and verify["base_vs_adapted"]["max_abs_logit_diff"] == 0
    assert "but the fused model's differ" in capsys.readouterr().out

    # Fresh PiSSA: the base's weights less A·B plus A·B, an effect of float32 rounding alone, is no effect either.
    spec = tmp_path / "pissa.aspec"
    spec.write_text("adapterspec 1\nlayers[*].self_attn.<q,v>_proj: lora(r=8, init=pissa)\n")
    assert run("apply", model, spec, "-o", tmp_path / "pissa") == 0
    code = run("fuse", model, tmp_path / "pissa", "-o", tmp_path / "pissa-fused", "--verify", "--strict", "--quiet",
               "--report-json", tmp_path / "pissa.json", *short)  # fmt: skip
    verify = json.loads((tmp_path / "pissa.json").read_text())["verify"]
    assert verify["base_vs_adapted"]["max_abs_logit_diff"] > 0 and verify["base_vs_adapted"]["within_rounding"]
    assert code == 0 and verify["status"] == "zero" and verify["fused_vs_adapted"]["within_rounding"]


def test_verify_refuses_a_fused_model_of_another_architecture(dense, tmp_path, capsys):
    model, adapters = dense
    other = tiny.example_model_dir("tiny-moe")
    assert run("verify", model, adapters, other, "--verify-sequences", 1, "--verify-length", 4) == 2
    err = capsys.readouterr().err
    assert "model_type 'qwen2_moe'" in err and "'llama'" in err and "Traceback" not in err


def test_verify_runs_a_vision_language_models_language_model(tmp_path, capsys):
    model = tiny.example_model_dir("tiny-qwen2-vl")
    spec = "adapterspec 1\n/language_model.model.layers[*].self_attn.<q,v>_proj: lora(r=4, scale=2.0)\n"
    adapters = write_adapters(model, tmp_path / "adapters", spec, b_scale=0.5)
    code = run("fuse", model, adapters, "-o", tmp_path / "out", "--verify", "--strict", "--quiet",
               "--report-json", tmp_path / "r.json", "--verify-sequences", 2, "--verify-length", 8)  # fmt: skip
    verify = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert code == 0 and verify["status"] == "ok" and verify["fused_vs_adapted"]["kl_max"] < 1e-6
    assert verify["base_vs_adapted"]["kl_max"] > 1e-4, "the adapters move the language model's outputs"


def test_verify_refuses_sequences_beyond_the_context_or_the_memory_before_fusing(dense, tmp_path, capsys, monkeypatch):
    from adapterspec.fuse import verify

    model, adapters = dense
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    assert run("fuse", model, adapters, "-o", tmp_path / "out", "--verify", "--verify-length", context + 1) == 2
    assert f"longer than the model's context ({context} tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(verify, "_device_memory", lambda: 10**9)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    sequences = 10**9 // (2 * 8 * 4 * vocab) + 1  # their logits alone: more than half of 1 GB
    assert run("fuse", model, adapters, "-o", tmp_path / "out", "--verify", "--verify-length", 8,
               "--verify-sequences", sequences) == 2  # fmt: skip
    assert "more than half of the 1.0 GB" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert verify.check_verify_size(model, sequences // 4, 8) is None, "a quarter of it is within the bound"


def test_keep_precision_fit_stays_quantized_and_keeps_what_plain_requantization_loses(quantized, tmp_path, capsys):
    """A change of a fraction of a 4-bit step (as after a short training): plain requantization loses it, the grid
    keeps the base, and fit stores each module in the cheapest finer quantization that keeps it, which mlx-lm loads."""
    from mlx_lm.utils import load_model

    from adapterspec.fuse.plan import Quantization

    model, _ = quantized
    adapters = write_adapters(model, tmp_path / "short", MLX_LM_SPEC, b_scale=3e-3)
    verify = ("--verify", "--verify-sequences", 3, "--verify-length", 16)
    statuses = {}
    for mode in (("--requantize", "plain"), ("--requantize", "grid"), ("--keep-precision", "fit")):
        out = tmp_path / mode[1]
        assert run("fuse", model, adapters, "-o", out, *mode, *verify, "--quiet", "--report-json", out.with_suffix(".json")) == 0  # fmt: skip
        statuses[mode[1]] = json.loads(out.with_suffix(".json").read_text())["verify"]
    assert statuses["plain"]["status"] == "lost" and statuses["grid"]["status"] == "lost"
    assert statuses["grid"]["effect_kept"] == 0.0  # the grid keeps the base exactly, never adds noise
    assert statuses["fit"]["status"] == "ok" and statuses["fit"]["effect_kept"] > 0.9
    err = capsys.readouterr().err
    assert "warning: verify: the fused model keeps" in err and "stored 15 module(s) in a finer quantization" in err

    config = json.loads((tmp_path / "fit" / "config.json").read_text())
    finer = {path: entry for path, entry in config["quantization"].items() if isinstance(entry, dict)}
    assert len(finer) == 15 and all(4 < entry["bits"] <= 8 and entry["mode"] == "affine" for entry in finer.values())
    assert config["quantization_config"] == config["quantization"]
    # Each such module is mx.quantize of the adapter layer's own dense fuse, in its new quantization.
    ours = read_weights(tmp_path / "fit")
    path, entry = next(iter(finer.items()))
    dense = fuse_in_memory(model, adapters, dense_paths={path})[f"{path}.weight"]
    q = Quantization(entry["group_size"], entry["bits"], "affine")
    expected = mx.quantize(dense, group_size=q.group_size, bits=q.bits)
    for got, want in zip((ours[f"{path}.{p}"] for p in ("weight", "scales", "biases")), expected):
        assert mx.array_equal(got, want).item()
    fused, _ = load_model(tmp_path / "fit")
    layer = dict(fused.named_modules())[path]
    assert (layer.bits, layer.group_size) == (q.bits, q.group_size)
    sizes = {name: sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors")) for name in statuses}
    assert sizes["grid"] == sizes["plain"] < sizes["fit"]
