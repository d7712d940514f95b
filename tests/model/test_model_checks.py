"""Broken model directories end in a UserError naming the file and the field: config.json, the index, the headers."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import models as tiny
import pytest

from adapterspec.errors import UserError
from adapterspec.jsonfile import read_json
from adapterspec.model.config import check_model_config, mlx_lm_model_problem
from adapterspec.model.files import read_model_weights
from adapterspec.model.index import ModuleIndex
from adapterspec.model.safetensors import CorruptWeightFile, read_safetensors_header


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny.write(tmp_path_factory.mktemp("llama") / "m", "llama", with_tokenizer=False)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return tiny.write(tmp_path_factory.mktemp("moe") / "m", "qwen2_moe", with_tokenizer=False)


def copy(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def st_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict | bytes, payload: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def edit_header(model_dir: Path, change) -> Path:
    path = model_dir / "model.safetensors"
    header, payload = st_parts(path)
    write_st(path, change(header), payload)
    return path


# ── real models pass ────────────────────────────────────────────────────────


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_every_tiny_architecture_passes_the_checks(tmp_path, arch):
    index = ModuleIndex.from_model_dir(tiny.write(tmp_path / arch, arch, with_tokenizer=False))
    assert index.model_type == arch


def test_a_quantized_model_passes_the_checks(tmp_path):
    model_dir = tiny.write(tmp_path / "q", "llama", quantization=tiny.Q4, with_tokenizer=False)
    assert ModuleIndex.from_model_dir(model_dir)["model.layers.0.self_attn.q_proj"].bits == 4


# ── config.json on its own ──────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("num_attention_heads", 0, "outside 1.."),
        ("hidden_size", -64, "outside 1.."),
        ("hidden_size", 10**12, "outside 1.."),
        ("hidden_size", "64", "not an integer"),
        ("hidden_size", 64.5, "not an integer"),
        ("hidden_size", math.nan, "not an integer"),
        ("hidden_size", True, "not an integer"),
        ("num_hidden_layers", 1e9, "not an integer"),
        ("vocab_size", 0, "outside 1.."),
        ("num_key_value_heads", 3, "does not divide"),
        ("tie_word_embeddings", "yes", "not true or false"),
        ("model_type", 42, "not an architecture name"),
        ("model_type", "../../os", "not an architecture name"),
        ("quantization", "yes", "not an object"),
    ],
)
def test_config_fields_are_checked(tmp_path, field, value, words):
    config = {**tiny.tiny_config("llama"), field: value}
    with pytest.raises(UserError, match=f"config.json: '{field}.*{words}"):
        check_model_config(config, tmp_path / "config.json")


def test_optional_fields_may_be_null(tmp_path, llama):
    """Hugging Face configs write optional fields as null; mlx-lm then uses its defaults."""
    model_dir = copy(llama, tmp_path / "m", head_dim=None, num_key_value_heads=None, tie_word_embeddings=None)
    with pytest.raises(UserError, match="self_attn.k_proj' maps 64 → 32"):  # kv heads default to the 4 heads
        ModuleIndex.from_model_dir(model_dir)
    ModuleIndex.from_model_dir(copy(llama, tmp_path / "n", head_dim=None, num_experts=None))


@pytest.mark.parametrize("config", [[], None, "llama", 42])
def test_config_must_be_an_object(tmp_path, config):
    with pytest.raises(UserError, match="config.json: not a JSON object"):
        check_model_config(config, tmp_path / "config.json")


def test_model_type_is_one_mlx_lm_can_build(tmp_path):
    assert mlx_lm_model_problem("llama") is None
    assert mlx_lm_model_problem("mistral") is None  # built by llama's module (mlx-lm's remapping)
    assert mlx_lm_model_problem("solar_open") is None  # its module takes glm4_moe's Model
    assert "no such architecture" in mlx_lm_model_problem("no-such-arch")
    assert "defines no Model" in mlx_lm_model_problem("cache")
    with pytest.raises(UserError, match="model_type 'base'"):
        check_model_config({**tiny.tiny_config("llama"), "model_type": "base"}, tmp_path / "config.json")


def test_deep_json_is_refused_without_recursion(tmp_path):
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100 + "1" + "}" * 100):
        (tmp_path / "deep.json").write_text(text)
        with pytest.raises(UserError, match="deep.json: JSON is nested"):
            read_json(tmp_path / "deep.json")


def test_a_directory_is_not_read_as_json(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(UserError, match="config.json: is a directory"):
        read_json(tmp_path / "config.json")


# ── config.json against the weights ─────────────────────────────────────────


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_hidden_layers": 6}, "'num_hidden_layers' is 6 but the weights hold 4 block"),
        ({"vocab_size": 321}, "'vocab_size' is 321 but model.embed_tokens holds 320 rows"),
        ({"intermediate_size": 96}, "mlp.down_proj' maps 128 → 64"),
        ({"model_type": "qwen2_moe"}, "mixture of experts, but the weights hold no experts"),
        ({"quantization": {"bits": 4, "group_size": 32}}, "says the model is quantized, but no weight has scales"),
    ],
)
def test_config_is_checked_against_the_weights(tmp_path, llama, changes, words):
    model_dir = copy(llama, tmp_path / "m", **changes)
    with pytest.raises(UserError, match=f"config.json: .*{words}"):
        ModuleIndex.from_model_dir(model_dir)


def test_experts_are_checked_against_the_switch_layers(tmp_path, moe):
    with pytest.raises(UserError, match="'num_experts' is 8 but 'model.layers.0.mlp.switch_mlp.down_proj' holds 4"):
        ModuleIndex.from_model_dir(copy(moe, tmp_path / "m", num_experts=8))


def test_quantization_bits_are_checked_against_the_packed_weights(tmp_path):
    model_dir = tiny.write(tmp_path / "q", "llama", quantization=tiny.Q4, with_tokenizer=False)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": 32, "bits": 3}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'quantization' \\(bits 3, group_size 32\\) does not fit"):
        ModuleIndex.from_model_dir(model_dir)


def test_a_missing_tensor_of_one_block_is_named(tmp_path, llama):
    model_dir = copy(llama, tmp_path / "m")
    (model_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    edit_header(model_dir, lambda h: {k: v for k, v in h.items() if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(UserError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
        ModuleIndex.from_model_dir(model_dir)


# ── the index ───────────────────────────────────────────────────────────────


def sharded(src: Path, dst: Path, dup: str | None = None) -> Path:
    """src's single file split into two shards with an index; dup: a tensor stored in both."""
    model_dir = copy(src, dst)
    header, payload = st_parts(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(k for k in header if k != "__metadata__")
    halves = [names[::2], names[1::2] + ([dup] if dup else [])]
    weight_map = {}
    for i, half in enumerate(halves):
        shard, new, chunks, offset = f"model-0000{i + 1}-of-00002.safetensors", {}, [], 0
        for name in half:
            start, end = header[name]["data_offsets"]
            new[name] = dict(header[name], data_offsets=[offset, offset + end - start])
            chunks.append(payload[start:end])
            offset += end - start
            weight_map.setdefault(name, shard)
        write_st(model_dir / shard, new, b"".join(chunks))
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model_dir


def test_a_sharded_model_is_read(tmp_path, llama):
    assert len(read_model_weights(sharded(llama, tmp_path / "m"))) > 30


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path, llama):
    model_dir = sharded(llama, tmp_path / "m", dup="model.norm.weight")
    with pytest.raises(UserError, match="'model.norm.weight' is stored twice, in model-00001-of-00002.safetensors and"):
        read_model_weights(model_dir)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("../x.safetensors", "not a file inside the model directory"),
        ("/etc/hostname", "not a file inside the model directory"),
        ("", "not a file inside the model directory"),
        (7, "is 7, not a file name"),
        (None, "is null, not a file name"),
        (["model.safetensors"], "not a file name"),
    ],
)
def test_weight_map_entries_name_files_inside_the_directory(tmp_path, llama, entry, words):
    model_dir = sharded(llama, tmp_path / "m")
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"index.json: weight_map\\['model.norm.weight'\\] .*{words}"):
        read_model_weights(model_dir)


def test_the_index_must_place_each_tensor_where_it_is(tmp_path, llama):
    model_dir = sharded(llama, tmp_path / "m")
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.x.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match="'model.layers.9.x.weight' in model-00001-of-00002.safetensors, but"):
        read_model_weights(model_dir)


def test_an_index_that_is_a_directory_is_refused(tmp_path, llama):
    model_dir = copy(llama, tmp_path / "m")
    (model_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    (model_dir / "model.safetensors.index.json").mkdir()
    with pytest.raises(UserError, match="index.json: is a directory"):
        ModuleIndex.from_model_dir(model_dir)


# ── safetensors headers ─────────────────────────────────────────────────────

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda h: {**h, Q: dict(h[Q], data_offsets=["0", "16384"])}, "data_offsets \\['0', '16384'\\]"),
        (lambda h: {**h, Q: dict(h[Q], data_offsets=[0, 1, 2])}, "not \\[start, end\\]"),
        (lambda h: {**h, Q: dict(h[Q], dtype="Q4_K")}, "unknown dtype 'Q4_K'"),
        (lambda h: {**h, Q: dict(h[Q], shape=[64.0, 64.0])}, "not a list of sizes"),
        (lambda h: {**h, Q: dict(h[Q], shape=[64, 65])}, "do not match shape"),
        (lambda h: {**h, "__metadata__": 5}, "'__metadata__' is not an object of strings"),
        (lambda h: {**h, K: dict(h[K], data_offsets=[h[Q]["data_offsets"][0] + 4, h[Q]["data_offsets"][0] + 4 + 8192])},
         "share bytes"),
    ],
)  # fmt: skip
def test_header_fields_are_checked(tmp_path, llama, change, words):
    path = edit_header(copy(llama, tmp_path / "m"), change)
    with pytest.raises(CorruptWeightFile, match=f"model.safetensors: not a valid safetensors file: .*{words}"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "name", ["../../evil.weight", "..model.layers.0.self_attn.q_proj.weight", "", "a\n.weight", "a..weight", "a b"]
)
def test_tensor_names_are_dotted_segments(tmp_path, llama, name):
    path = edit_header(copy(llama, tmp_path / "m"), lambda h: {**{k: v for k, v in h.items() if k != Q}, name: h[Q]})
    with pytest.raises(CorruptWeightFile, match="tensor name .* is not dot-separated names"):
        read_safetensors_header(path)


def test_a_deep_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_st(path, b"[" * 100_000 + b"]" * 100_000, b"")
    with pytest.raises(CorruptWeightFile, match="the header is nested too deeply"):
        read_safetensors_header(path)


# ── mlx-lm's own failures ───────────────────────────────────────────────────


def test_what_mlx_lm_raises_names_the_directory_and_model_type(monkeypatch, llama):
    import mlx_lm.utils

    from adapterspec.adapters.loading import ModelLoadError, load_model

    def broken(path, lazy=False):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(mlx_lm.utils, "load_model", broken)
    with pytest.raises(ModelLoadError, match="mlx-lm cannot build model_type 'llama': ZeroDivisionError"):
        load_model(llama)
