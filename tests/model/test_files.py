"""adapterspec.model.files: safetensors headers, local model lookup, loading errors, atomic output directories."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import models as tiny
import pytest

from adapterspec.adapters.loading import load_model, load_tokenizer
from adapterspec.errors import UserError
from adapterspec.model.files import (
    ModelNotFound,
    copy_model_side_files,
    resolve_model_path,
)
from adapterspec.model.safetensors import CorruptWeightFile, read_safetensors_header
from adapterspec.outputs import atomic_output_dir, write_json_atomic


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ── atomic_output_dir ───────────────────────────────────────────────────────


def test_success_moves_the_directory_into_place(tmp_path):
    dest = tmp_path / "out"
    with atomic_output_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.json").write_text("{}")
        assert not dest.exists()
    assert (dest / "a.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, error):
    dest = tmp_path / "out"
    with pytest.raises(error):
        with atomic_output_dir(dest) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 10)
            raise error()
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_failed_forced_write_keeps_the_old_directory(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_refuses_a_non_empty_destination(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty") as raised:
        with atomic_output_dir(dest):
            pytest.fail("the block must not run")
    assert "--force" in raised.value.help
    assert (dest / "keep.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []


def test_empty_destination_is_fine(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with atomic_output_dir(dest) as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in dest.iterdir()] == ["a"]


def test_force_replaces(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_output_dir(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_creates_missing_parents(tmp_path):
    with atomic_output_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "out" / "x").exists()


@pytest.mark.parametrize("dest", ["model", "model/sub", "."], ids=["same", "inside", "around"])
def test_refuses_to_overlap_protected_inputs(tmp_path, dest):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(UserError, match="overlaps the input"):
        with atomic_output_dir(tmp_path / dest, force=True, protect=[model]):
            pytest.fail("the block must not run")
    assert (model / "config.json").exists()


def test_refuses_a_file_as_destination(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        with atomic_output_dir(tmp_path / "out", force=True):
            pass


def test_write_json_atomic(tmp_path):
    path = tmp_path / "c.json"
    write_json_atomic(path, {"a": 1, "é": [1, 2]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "é": [1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "é": [1, 2]}
    assert leftovers(tmp_path) == []


def test_copy_model_side_files(tmp_path):
    src = tmp_path / "src"
    tiny.write(src, "llama", num_hidden_layers=1)
    for name in ("chat_template.jinja", "README.md", "pytorch_model.bin", "model.gguf", ".gitattributes"):
        (src / name).write_text(name)
    (src / "assets").mkdir()
    (src / "assets" / "vocab.txt").write_text("v")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_model_side_files(src, dst)
    assert copied == sorted(
        ["README.md", "assets", "chat_template.jinja", "generation_config.json", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip
    assert (dst / "assets" / "vocab.txt").read_text() == "v"
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


# ── safetensors headers ─────────────────────────────────────────────────────


@pytest.mark.parametrize("name", tiny.EXAMPLE_MODELS)
def test_header_agrees_with_safetensors_and_mlx(name):
    import mlx.core as mx
    from safetensors import safe_open

    path = tiny.example_model_dir(name) / "model.safetensors"
    header = read_safetensors_header(path)
    arrays = mx.load(str(path))
    assert sorted(header) == sorted(arrays)
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(header)
        for key in f.keys():
            tensor_slice = f.get_slice(key)
            assert list(header[key].shape) == tensor_slice.get_shape()
            assert header[key].dtype == tensor_slice.get_dtype()
    for key, array in arrays.items():
        assert header[key].shape == tuple(array.shape)
        assert header[key].dtype_name == str(array.dtype).rsplit(".", 1)[-1]


def test_header_of_mixed_dtypes(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {
        "a": np.zeros((2, 3), np.float16),
        "b": np.zeros((4,), np.int8),
        "c": np.zeros((1, 2, 3), np.uint32),
        "scalar": np.zeros((), np.float64),
        "empty": np.zeros((0, 5), np.float32),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "np"})
    header = read_safetensors_header(tmp_path / "m.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {
        "a": ("F16", (2, 3)), "b": ("I8", (4,)), "c": ("U32", (1, 2, 3)), "scalar": ("F64", ()), "empty": ("F32", (0, 5)),
    }  # fmt: skip


def _corrupt_variants(good: bytes) -> dict[str, bytes]:
    (length,) = struct.unpack("<Q", good[:8])
    header = good[8 : 8 + length]
    bad_offsets = json.loads(header)
    first = next(k for k in bad_offsets if k != "__metadata__")
    bad_offsets[first]["data_offsets"][1] += 4
    raw = json.dumps(bad_offsets).encode()
    return {
        "empty": b"",
        "short": good[:5],
        "huge header length": struct.pack("<Q", 1 << 40) + good[8:],
        "cut in header": good[: 8 + length // 2],
        "cut in data": good[: len(good) - 100],
        "not json": struct.pack("<Q", 4) + b"\xff\xfe{]" + good[8 + length :],
        "json list": struct.pack("<Q", 2) + b"[]",
        "offsets disagree with shape": struct.pack("<Q", len(raw)) + raw + good[8 + length :],
    }


CORRUPTIONS = (
    "empty",
    "short",
    "huge header length",
    "cut in header",
    "cut in data",
    "not json",
    "json list",
    "offsets disagree with shape",
)


@pytest.mark.parametrize("variant", CORRUPTIONS)
def test_corrupt_files_raise_user_errors(tmp_path, variant):
    good = (tiny.example_model_dir("tiny-llama") / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(_corrupt_variants(good)[variant])
    with pytest.raises(CorruptWeightFile, match="not a valid safetensors file") as raised:
        read_safetensors_header(path)
    assert isinstance(raised.value, UserError) and raised.value.help


# ── resolve_model_path ──────────────────────────────────────────────────────


def _fake_cache(root: Path, repo: str, commit: str = "0123456789abcdef", ref: str | None = "main") -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    if ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def test_resolve_local_directory(tmp_path):
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tiny.example_model_dir("tiny-llama"))) == tiny.example_model_dir("tiny-llama")


def test_resolve_from_local_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = _fake_cache(tmp_path, "org/model-4bit")
    assert resolve_model_path("org/model-4bit") == snapshot
    assert resolve_model_path("org/model-4bit", revision="0123456789abcdef") == snapshot


def test_resolve_from_hf_home_without_ref(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snapshot = _fake_cache(tmp_path / "hub", "org/only-snapshot", ref=None)
    assert resolve_model_path("org/only-snapshot") == snapshot


@pytest.mark.parametrize("name", ["org/absent", "./no/such/dir", "/no/such/dir"])
def test_resolve_missing_model(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as raised:
        resolve_model_path(name)
    assert isinstance(raised.value, UserError) and raised.value.help


def test_resolve_incomplete_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = _fake_cache(tmp_path, "org/partial")
    (snapshot / "config.json").unlink()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model_path("org/partial")


def test_resolve_a_file_is_an_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="not a directory"):
        resolve_model_path(tmp_path / "model.safetensors")


# ── load_model ──────────────────────────────────────────────────────────────


def test_load_model_and_tokenizer():
    import mlx.core as mx

    path = tiny.example_model_dir("tiny-llama")
    model, config = load_model(path)
    assert config["model_type"] == "llama"
    tokenizer = load_tokenizer(path)
    ids = tokenizer.encode("hello adapters")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])


def _copy_model(tmp_path: Path, **config_changes) -> Path:
    src = tiny.example_model_dir("tiny-llama")
    dst = tmp_path / "copy"
    dst.mkdir(parents=True)
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    # both are now refused from config.json and the headers, before mlx-lm builds anything
    with pytest.raises(UserError, match="model_type 'no_such_arch': mlx-lm has no such architecture"):
        load_model(_copy_model(tmp_path / "a", model_type="no_such_arch"))
    with pytest.raises(UserError, match="intermediate_size 96 need"):
        load_model(_copy_model(tmp_path / "b", intermediate_size=96))
    missing = _copy_model(tmp_path / "c")
    (missing / "model.safetensors").unlink()
    (missing / "model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match="no model\\*.safetensors"):
        load_model(missing)


@pytest.mark.parametrize("name", tiny.EXAMPLE_MODELS)
def test_example_models_load_and_generate_offline(monkeypatch, name):
    from mlx_lm import generate, load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load(str(tiny.example_model_dir(name)))
    text = generate(model, tokenizer, "hello adapters", max_tokens=4)
    assert isinstance(text, str)


def test_example_models_match_their_builder(tmp_path):
    """The committed example directories are what make_models.py writes (weights compared by header)."""
    for written in tiny.builder.make_example_models(tmp_path):
        committed = tiny.example_model_dir(written.name)
        assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in committed.iterdir())
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
            assert (written / name).read_text() == (committed / name).read_text(), (written.name, name)
        assert read_safetensors_header(written / "model.safetensors") == read_safetensors_header(
            committed / "model.safetensors"
        )


def test_a_header_with_null_metadata_as_mlx_writes_it_is_read(tmp_path):
    import mlx.core as mx

    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"a": mx.zeros((2, 3))})
    assert read_safetensors_header(tmp_path / "w.safetensors")["a"].shape == (2, 3)
