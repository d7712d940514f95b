"""Small steps that build a bad input inside a case's workspace (a fresh temporary directory).

Every step is a function of the workspace `ws` (a Path). The workspace holds, once the steps ran:
`model/` (a copy of an example model), `spec.aspec`, `adapters/` (an adapter directory made by
`adapterspec apply` once per session), `peft/` (a PEFT directory made by `adapterspec export peft`),
`data/` (a copy of the example training data), and whatever the case's own steps add or break.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

Step = Callable[[Path], None]

# Filled in by the session fixture of test_bad_inputs.py: name -> a directory made once per session.
PREPARED: dict[str, Path] = {}

ATTENTION_SPEC = "adapterspec 1\n\nlayers[*].self_attn.<q,k,v,o>_proj: lora(r=8, alpha=16)\n"


# ── the usual inputs ────────────────────────────────────────────────────────


def model(name: str = "tiny-llama", dest: str = "model") -> Step:
    def step(ws: Path) -> None:
        shutil.copytree(EXAMPLES / "models" / name, ws / dest)

    return step


def spec(text: str | bytes = ATTENTION_SPEC, dest: str = "spec.aspec") -> Step:
    def step(ws: Path) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        (ws / dest).parent.mkdir(parents=True, exist_ok=True)
        (ws / dest).write_bytes(data)

    return step


def example_spec(name: str, dest: str = "spec.aspec") -> Step:
    def step(ws: Path) -> None:
        shutil.copyfile(EXAMPLES / "specs" / name, ws / dest)

    return step


def prepared(name: str, dest: str) -> Step:
    """Copy a directory made once per session (adapters, a PEFT directory)."""

    def step(ws: Path) -> None:
        shutil.copytree(PREPARED[name], ws / dest)

    return step


def adapters(name: str = "llama", dest: str = "adapters") -> Step:
    return prepared(f"adapters-{name}", dest)


def peft(name: str = "llama", dest: str = "peft") -> Step:
    return prepared(f"peft-{name}", dest)


def data(dest: str = "data") -> Step:
    def step(ws: Path) -> None:
        (ws / dest).mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid", "test"):
            lines = (EXAMPLES / "data" / f"{split}.jsonl").read_text().splitlines(keepends=True)
            (ws / dest / f"{split}.jsonl").write_text("".join(lines[:16]))

    return step


# ── generic file steps ──────────────────────────────────────────────────────


def write(rel: str, content: str | bytes) -> Step:
    def step(ws: Path) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)

    return step


def write_json(rel: str, obj: Any) -> Step:
    return write(rel, json.dumps(obj, allow_nan=True))


def remove(rel: str) -> Step:
    def step(ws: Path) -> None:
        path = ws / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    return step


def mkdir(rel: str) -> Step:
    def step(ws: Path) -> None:
        (ws / rel).mkdir(parents=True, exist_ok=True)

    return step


def replace_with_dir(rel: str) -> Step:
    """The file becomes a directory of the same name (holding one user file)."""

    def step(ws: Path) -> None:
        path = ws / rel
        if path.exists():
            path.unlink()
        path.mkdir(parents=True)
        (path / "notes.txt").write_text("user file\n")

    return step


def fifo(rel: str) -> Step:
    def step(ws: Path) -> None:
        path = ws / rel
        if path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)

    return step


def symlink(rel: str, target: str) -> Step:
    """A symlink at rel pointing at target (target relative to the link's directory, or absolute)."""

    def step(ws: Path) -> None:
        path = ws / rel
        if path.exists() or path.is_symlink():
            remove(rel)(ws)
        os.symlink(target, path)

    return step


def truncate(rel: str, size: int) -> Step:
    def step(ws: Path) -> None:
        with open(ws / rel, "r+b") as f:
            f.truncate(size if size >= 0 else max(0, os.path.getsize(ws / rel) + size))

    return step


def chmod(rel: str, mode: int) -> Step:
    def step(ws: Path) -> None:
        os.chmod(ws / rel, mode)

    return step


def user_dir(rel: str = "out", files: dict[str, str] | None = None) -> Step:
    """A pre-existing directory holding the user's own files."""

    def step(ws: Path) -> None:
        for name, text in (files or {"notes.txt": "my notes\n", "keep/me.txt": "keep\n"}).items():
            path = ws / rel / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return step


# ── JSON edits ──────────────────────────────────────────────────────────────

DELETE = object()


def edit_json(rel: str, **changes: Any) -> Step:
    """Set (or with DELETE remove) top-level keys; a key 'a__b' reaches into nested objects."""

    def step(ws: Path) -> None:
        path = ws / rel
        obj = json.loads(path.read_text())
        for key, value in changes.items():
            *parents, last = key.split("__")
            target = obj
            for parent in parents:
                target = target.setdefault(parent, {})
            if value is DELETE:
                target.pop(last, None)
            else:
                target[last] = value
        path.write_text(json.dumps(obj, allow_nan=True))

    return step


def map_json(rel: str, fn: Callable[[Any], Any]) -> Step:
    def step(ws: Path) -> None:
        path = ws / rel
        path.write_text(json.dumps(fn(json.loads(path.read_text())), allow_nan=True))

    return step


def deep_json(rel: str, depth: int = 100_000, opener: str = "[", closer: str = "]") -> Step:
    return write(rel, opener * depth + closer * depth)


# ── safetensors by hand: 8-byte little-endian header length, JSON header, data ──


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_bytes(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(head) if header_len is None else header_len) + head + data


def edit_st(rel: str, fn: Callable[[dict, bytes], tuple[dict | bytes, bytes]]) -> Step:
    """Rewrite a safetensors file: fn(header, data) -> (header or raw header bytes, data)."""

    def step(ws: Path) -> None:
        path = ws / rel
        header, payload = read_st(path)
        new_header, new_data = fn(header, payload)
        path.write_bytes(st_bytes(new_header, new_data))

    return step


def raw_st(rel: str, content: bytes) -> Step:
    return write(rel, content)


def tensors(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def pick(header: dict, needle: str) -> str:
    return next(k for k in tensors(header) if needle in k)


def set_tensor(needle: str, **fields: Any) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Change fields (dtype, shape, data_offsets) of the first tensor whose name contains needle."""

    def fn(header: dict, payload: bytes) -> tuple[dict, bytes]:
        header[pick(header, needle)].update(fields)
        return header, payload

    return fn


def rename_tensor(needle: str, new_name: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def fn(header: dict, payload: bytes) -> tuple[dict, bytes]:
        header[new_name] = header.pop(pick(header, needle))
        return header, payload

    return fn


def drop_tensor(needle: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def fn(header: dict, payload: bytes) -> tuple[dict, bytes]:
        del header[pick(header, needle)]
        return header, payload

    return fn


def overlap(needle_a: str, needle_b: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Tensor b's data starts inside tensor a's (same size, so only the overlap is wrong)."""

    def fn(header: dict, payload: bytes) -> tuple[dict, bytes]:
        a, b = header[pick(header, needle_a)], header[pick(header, needle_b)]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        start = a["data_offsets"][0] + 4
        if start + size <= len(payload):
            b["data_offsets"] = [start, start + size]
        return header, payload

    return fn


def fill_tensor(needle: str, value: float) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Overwrite a float32 tensor's values with value (NaN, Inf)."""

    def fn(header: dict, payload: bytes) -> tuple[dict, bytes]:
        entry = header[pick(header, needle)]
        assert entry["dtype"] == "F32", entry
        start, end = entry["data_offsets"]
        count = (end - start) // 4
        payload = payload[:start] + struct.pack(f"<{count}f", *([value] * count)) + payload[end:]
        return header, payload

    return fn


def swap_shape(needle: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Reverse a tensor's shape (same size: only the shape is wrong)."""

    def fn(header: dict, payload: bytes) -> tuple[dict, bytes]:
        entry = header[pick(header, needle)]
        entry["shape"] = list(reversed(entry["shape"]))
        if entry["shape"] == list(reversed(entry["shape"])):
            entry["shape"] = (
                [entry["shape"][0] // 2, entry["shape"][1] * 2] if len(entry["shape"]) == 2 else [1] + entry["shape"]
            )
        return header, payload

    return fn


def raw_header(text: bytes) -> Callable[[dict, bytes], tuple[bytes, bytes]]:
    return lambda header, payload: (text, payload)


def split_shards(dup: str | None = None) -> Step:
    """model.safetensors becomes two shards with an index; dup: a tensor stored in both shards."""

    def step(ws: Path) -> None:
        path = ws / "model" / "model.safetensors"
        header, payload = read_st(path)
        names = tensors(header)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        if dup:
            extra = pick(header, dup)
            for half in halves:
                if extra not in half:
                    half.append(extra)
        weight_map = {}
        for i, half in enumerate(halves):
            shard = f"model-0000{i + 1}-of-00002.safetensors"
            new_header, chunks, offset = {"__metadata__": {"format": "mlx"}}, [], 0
            for name in half:
                start, end = header[name]["data_offsets"]
                chunks.append(payload[start:end])
                new_header[name] = dict(header[name], data_offsets=[offset, offset + end - start])
                offset += end - start
                weight_map.setdefault(name, shard)
            (ws / "model" / shard).write_bytes(st_bytes(new_header, b"".join(chunks)))
        path.unlink()
        (ws / "model" / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )

    return step


def index_entry(value: Any, needle: str = "q_proj") -> Step:
    """One weight_map entry of model.safetensors.index.json gets value."""

    def fn(index: dict) -> dict:
        key = next(k for k in sorted(index["weight_map"]) if needle in k)
        index["weight_map"][key] = value
        return index

    return map_json("model/model.safetensors.index.json", fn)


def nan() -> float:
    return math.nan


def spec_lines(line: str, count: int, header: str = "adapterspec 1\n") -> Step:
    return spec(header + line * count)


def run_all(*steps: Step) -> Step:
    def step(ws: Path) -> None:
        for s in steps:
            s(ws)

    return step
