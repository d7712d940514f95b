"""The corpus of bad inputs: one record per case, run through the CLI by test_bad_inputs.py.

A case is `Case(id, argv, steps, exit=..., names=...)`:

* `argv`: the command line after `adapterspec`, with placeholders for the workspace's paths:
  `{ws}` (the workspace), `{model}`, `{spec}`, `{adapters}`, `{peft}`, `{data}`, `{out}` (a
  destination that does not exist yet), `{outspec}` (a spec file to write), `{yaml}`.
* `steps`: what breaks the inputs (tests/cli/builders.py), run after the usual inputs are in place.
* `exit`: the documented exit code (or a tuple of acceptable ones where the docs leave it open):
  0 fine, 1 diagnostics with errors, 2 usage errors and unreadable inputs.
* `names`: what the message must name: a placeholder path (its full path, its path inside the
  workspace or its base name count), or a literal word (an option's name). A tuple inside the
  tuple is a choice: any of its members will do.
* `forbid`: words that must appear in no output and no written file (rule injection).

Most cases come from tables crossed with the commands they make sense for: to add a case, add one
entry to a table (a new way to break a model, say) or one `Case(...)` to EXTRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from builders import (
    DELETE,
    adapters,
    chmod,
    data,
    deep_json,
    drop_tensor,
    edit_json,
    edit_st,
    example_spec,
    fifo,
    fill_tensor,
    index_entry,
    map_json,
    mkdir,
    model,
    overlap,
    peft,
    raw_header,
    raw_st,
    remove,
    rename_tensor,
    replace_with_dir,
    set_tensor,
    spec,
    spec_lines,
    split_shards,
    st_bytes,
    swap_shape,
    symlink,
    truncate,
    user_dir,
    write,
    write_json,
)

NAN, INF = math.nan, math.inf
FIFO_TIMEOUT = 5  # reading a FIFO nobody writes blocks for ever: 5 s tell a hang


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    steps: tuple = ()
    exit: int | tuple[int, ...] = 2
    names: tuple = ()
    env: dict = field(default_factory=dict)
    timeout: float = 60.0
    base: tuple = ()  # the usual inputs; empty: model, spec, adapters, peft, data
    forbid: tuple[str, ...] = ()
    root_skip: bool = False  # permissions mean nothing to root
    stdin: bytes | None = None

    def __str__(self) -> str:
        return self.id


def default_base(model_name: str = "tiny-llama", adapter_name: str = "llama") -> tuple:
    specs = {"tiny-llama": None, "tiny-llama-4bit": "dora-4bit.aspec", "tiny-moe": "moe.aspec"}
    spec_step = example_spec(specs[model_name]) if specs[model_name] else spec()
    return (model(model_name), spec_step, adapters(adapter_name), peft(), data())


TRAIN_SHORT = (
    "--iters",
    "2",
    "--batch-size",
    "2",
    "--val-batches",
    "1",
    "--steps-per-eval",
    "1000",
    "--save-every",
    "1000",
    "--steps-per-report",
    "1",
)

COMMANDS = {
    "lint": ("lint", "{spec}", "--model", "{model}"),
    "tree": ("tree", "{model}"),
    "plan": ("plan", "{model}", "{spec}"),
    "explain": ("explain", "{spec}", "{model}"),
    "apply": ("apply", "{model}", "{spec}", "-o", "{out}"),
    "fuse": ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
    "export": ("export", "peft", "{model}", "{adapters}", "-o", "{out}"),
    "train": ("train", "{model}", "{spec}", "--data", "{data}", "-o", "{out}", *TRAIN_SHORT),
    "applyadapters": ("apply", "{model}", "{spec}", "--adapters", "{adapters}", "-o", "{out}"),
    "importmlxlm": ("import", "mlx-lm", "{adapters}", "-o", "{outspec}"),
    "importpeft": ("import", "peft", "{peft}", "-o", "{outspec}"),
    "importpeftmodel": ("import", "peft", "{peft}", "--model", "{model}", "-o", "{outspec}", "--adapters-out", "{out}"),
    "speclint": ("lint", "{spec}"),
    "fmt": ("fmt", "{spec}"),
}

CHEAP = ("lint", "tree", "plan", "explain")


def strip_adapterspec(rel: str = "adapters/adapter_config.json"):
    """mlx-lm's own adapter config: adapterspec's block removed."""
    return map_json(rel, lambda c: {k: v for k, v in c.items() if k != "adapterspec"} if isinstance(c, dict) else c)


# ── model directories ───────────────────────────────────────────────────────
# (what, steps, names, commands, exit, extra) — commands: a space-separated subset of COMMANDS.

CFG = "model/config.json"
IDX = "model/model.safetensors.index.json"
ST = "model/model.safetensors"
M_CFG, M_IDX, M_ST = "{model}/config.json", "{model}/model.safetensors.index.json", "{model}/model.safetensors"
ALL_MODEL = "lint tree plan explain fuse apply export"
HEADERS = "tree plan explain fuse"


def deep_object(depth: int = 100_000) -> str:
    return '{"a":' * depth + "1" + "}" * depth


MODEL_BREAKS: list[tuple] = [
    # config.json
    ("config-missing", (remove(CFG),), (M_CFG, "config.json"), "fuse export", 2, {}),
    ("config-not-json", (write(CFG, "{not json"),), (M_CFG,), "fuse", 2, {}),
    ("config-empty", (write(CFG, ""),), (M_CFG,), "fuse", 2, {}),
    ("config-not-utf8", (write(CFG, b'{"model_type": "ll\xffama"}'),), (M_CFG,), "fuse", 2, {}),
    ("config-deep-lists", (deep_json(CFG),), (M_CFG,), "fuse", 2, {}),
    ("config-deep-objects", (write(CFG, deep_object()),), (M_CFG,), "fuse", 2, {}),
    ("config-list", (write_json(CFG, []),), (M_CFG,), "fuse", 2, {}),
    ("config-null", (write_json(CFG, None),), (M_CFG,), "fuse", 2, {}),
    ("config-string", (write_json(CFG, "llama"),), (M_CFG,), "fuse", 2, {}),
    ("config-number", (write_json(CFG, 42),), (M_CFG,), "fuse", 2, {}),
    ("config-is-dir", (replace_with_dir(CFG),), (M_CFG,), "fuse", 2, {}),
    ("config-fifo", (fifo(CFG),), (M_CFG,), "fuse", 2, {"timeout": FIFO_TIMEOUT}),
    ("config-symlink-loop", (symlink(CFG, "config.json"),), (M_CFG,), "fuse", 2, {}),
    (
        "config-heads-zero",
        (edit_json(CFG, num_attention_heads=0),),
        (M_CFG, "num_attention_heads"),
        "fuse apply export",
        2,
        {},
    ),
    ("config-heads-negative", (edit_json(CFG, num_attention_heads=-4),), ("num_attention_heads",), "fuse", 2, {}),
    ("config-hidden-negative", (edit_json(CFG, hidden_size=-64),), ("hidden_size",), "fuse", 2, {}),
    ("config-hidden-huge", (edit_json(CFG, hidden_size=10**12),), ("hidden_size",), "fuse", 2, {}),
    ("config-hidden-string", (edit_json(CFG, hidden_size="64"),), ("hidden_size",), "fuse", 2, {}),
    ("config-hidden-float", (edit_json(CFG, hidden_size=64.5),), ("hidden_size",), "fuse", 2, {}),
    ("config-hidden-nan", (edit_json(CFG, hidden_size=NAN),), ("hidden_size",), "fuse", 2, {}),
    ("config-hidden-null", (edit_json(CFG, hidden_size=None),), ("hidden_size",), "fuse", 2, {}),
    ("config-layers-1e9", (edit_json(CFG, num_hidden_layers=1e9),), ("num_hidden_layers",), "fuse", 2, {}),
    ("config-layers-int-1e9", (edit_json(CFG, num_hidden_layers=10**9),), ("num_hidden_layers",), "fuse", 2, {}),
    ("config-layers-negative", (edit_json(CFG, num_hidden_layers=-1),), ("num_hidden_layers",), "fuse", 2, {}),
    ("config-layers-string", (edit_json(CFG, num_hidden_layers="4"),), ("num_hidden_layers",), "fuse", 2, {}),
    ("config-layers-zero", (edit_json(CFG, num_hidden_layers=0),), ("num_hidden_layers",), "fuse", 2, {}),
    ("config-layers-more", (edit_json(CFG, num_hidden_layers=6),), ("num_hidden_layers",), "fuse", 2, {}),
    ("config-vocab-zero", (edit_json(CFG, vocab_size=0),), ("vocab_size",), "fuse", 2, {}),
    ("config-vocab-huge", (edit_json(CFG, vocab_size=10**15),), ("vocab_size",), "fuse", 2, {}),
    ("config-kv-heads-not-dividing", (edit_json(CFG, num_key_value_heads=3),), ("num_key_value_heads",), "fuse", 2, {}),
    ("config-intermediate-negative", (edit_json(CFG, intermediate_size=-128),), ("intermediate_size",), "fuse", 2, {}),
    ("config-model-type-unknown", (edit_json(CFG, model_type="no-such-arch"),), ("no-such-arch",), "fuse", 2, {}),
    ("config-model-type-missing", (edit_json(CFG, model_type=DELETE),), ("model_type",), "fuse", 2, {}),
    ("config-model-type-number", (edit_json(CFG, model_type=42),), ("model_type",), "fuse", 2, {}),
    ("config-model-type-base", (edit_json(CFG, model_type="base"),), ("base",), "fuse apply", 2, {}),
    ("config-model-type-cache", (edit_json(CFG, model_type="cache"),), ("cache",), "fuse", 2, {}),
    ("config-model-type-path", (edit_json(CFG, model_type="../../os"),), ("model_type",), "fuse", 2, {}),
    ("config-model-type-moe-on-dense", (edit_json(CFG, model_type="qwen2_moe"),), ("qwen2_moe",), "fuse", 2, {}),
    ("config-tie-string", (edit_json(CFG, tie_word_embeddings="yes"),), ("tie_word_embeddings",), "fuse", 2, {}),
    (
        "config-quantization-on-dense",
        (edit_json(CFG, quantization={"bits": 4, "group_size": 32}),),
        ("quantization",),
        "fuse",
        2,
        {},
    ),
    # index files
    ("index-not-json", (write(IDX, "{oops"),), (M_IDX,), "fuse", 2, {}),
    ("index-list", (write_json(IDX, ["model.safetensors"]),), (M_IDX,), "fuse", 2, {}),
    ("index-no-weight-map", (write_json(IDX, {"metadata": {}}),), (M_IDX,), "fuse", 2, {}),
    ("index-weight-map-list", (write_json(IDX, {"weight_map": ["model.safetensors"]}),), (M_IDX,), "fuse", 2, {}),
    ("index-deep", (deep_json(IDX),), (M_IDX,), "fuse", 2, {}),
    ("index-number-in-map", (index_entry(7),), (M_IDX,), "fuse", 2, {}),
    ("index-null-in-map", (index_entry(None),), (M_IDX,), "fuse", 2, {}),
    ("index-list-in-map", (index_entry(["model.safetensors"]),), (M_IDX,), "fuse", 2, {}),
    (
        "index-parent-path",
        (write("x.safetensors", b""), index_entry("../x.safetensors")),
        (M_IDX, "../x.safetensors"),
        "fuse apply export",
        2,
        {},
    ),
    ("index-parent-deep", (index_entry("../../../../../../../../etc/hostname"),), (M_IDX,), "fuse", 2, {}),
    ("index-absolute-path", (index_entry("/etc/hostname"),), (M_IDX,), "fuse", 2, {}),
    (
        "index-missing-shard",
        (index_entry("model-00002-of-00002.safetensors"),),
        ("model-00002-of-00002.safetensors",),
        "fuse",
        2,
        {},
    ),
    ("index-empty-name", (index_entry(""),), (M_IDX,), "fuse", 2, {}),
    ("index-dot-name", (index_entry("."),), (M_IDX,), "fuse", 2, {}),
    (
        "index-shard-is-dir",
        (mkdir("model/shard.safetensors"), index_entry("shard.safetensors")),
        ("shard.safetensors",),
        "fuse",
        2,
        {},
    ),
    (
        "index-same-tensor-two-shards",
        (split_shards(dup="layers.0.self_attn.q_proj"),),
        (
            (
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.layers.0.self_attn.q_proj.weight",
            ),
        ),
        "fuse",
        2,
        {},
    ),
    (
        "index-tensor-in-wrong-shard",
        (
            split_shards(),
            map_json(
                IDX, lambda i: {**i, "weight_map": {k: "model-00001-of-00002.safetensors" for k in i["weight_map"]}}
            ),
        ),
        (M_IDX,),
        "fuse",
        2,
        {},
    ),
    (
        "index-names-unknown-tensor",
        (
            map_json(
                IDX, lambda i: {**i, "weight_map": {**i["weight_map"], "model.layers.9.x.weight": "model.safetensors"}}
            ),
        ),
        ("model.layers.9.x.weight",),
        "fuse",
        2,
        {},
    ),
    ("index-fifo", (fifo(IDX),), (M_IDX,), "fuse", 2, {"timeout": FIFO_TIMEOUT}),
    ("index-is-dir", (replace_with_dir(IDX),), (M_IDX,), "fuse", 2, {}),
    # safetensors files
    ("st-empty", (write(ST, b""),), (M_ST,), "fuse", 2, {}),
    ("st-4-bytes", (truncate(ST, 4),), (M_ST,), "fuse", 2, {}),
    ("st-truncated-half", (truncate(ST, 380_000),), (M_ST,), "fuse export", 2, {}),
    ("st-truncated-last-byte", (truncate(ST, -1),), (M_ST,), "fuse", 2, {}),
    ("st-header-len-past-end", (raw_st(ST, st_bytes(b'{"a": 1}', b"", header_len=1000)),), (M_ST,), "fuse", 2, {}),
    ("st-header-len-huge", (raw_st(ST, st_bytes(b"{}", b"", header_len=2**63)),), (M_ST,), "fuse", 2, {}),
    ("st-header-not-json", (edit_st(ST, raw_header(b"{this is not json")),), (M_ST,), "fuse", 2, {}),
    ("st-header-not-utf8", (edit_st(ST, raw_header(b'{"\xff\xfe": 1}')),), (M_ST,), "fuse", 2, {}),
    ("st-header-list", (edit_st(ST, raw_header(b"[]")),), (M_ST,), "fuse", 2, {}),
    ("st-header-deep", (edit_st(ST, raw_header(b"[" * 100_000 + b"]" * 100_000)),), (M_ST,), "fuse", 2, {}),
    (
        "st-header-entry-list",
        (edit_st(ST, lambda h, d: ({**h, "model.layers.0.self_attn.q_proj.weight": [1, 2]}, d)),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-offsets-outside",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", data_offsets=[0, 10**12])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-offsets-negative",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", data_offsets=[-16384, 0])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-offsets-reversed",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", data_offsets=[16384, 0])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-offsets-strings",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", data_offsets=["0", "16384"])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-offsets-three",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", data_offsets=[0, 1, 2])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-offsets-overlap",
        (edit_st(ST, overlap("layers.0.self_attn.k_proj", "layers.0.self_attn.q_proj")),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-dtype-Q4_K",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", dtype="Q4_K")),),
        (M_ST, "Q4_K"),
        "fuse",
        2,
        {},
    ),
    (
        "st-dtype-F64",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", dtype="F64", shape=[32, 64])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-dtype-lowercase",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", dtype="f32")),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    ("st-dtype-number", (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", dtype=32)),), (M_ST,), "fuse", 2, {}),
    (
        "st-dtype-missing",
        (
            edit_st(
                ST,
                lambda h, d: (
                    {
                        k: ({kk: vv for kk, vv in v.items() if kk != "dtype"} if "q_proj" in k else v)
                        for k, v in h.items()
                    },
                    d,
                ),
            ),
        ),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-shape-mismatch",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", shape=[64, 65])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-shape-negative",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", shape=[-64, -64])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    ("st-shape-string", (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", shape="64x64")),), (M_ST,), "fuse", 2, {}),
    (
        "st-shape-floats",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", shape=[64.0, 64.0])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-shape-huge",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj", shape=[2**40, 2**40])),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-name-dotdot",
        (edit_st(ST, rename_tensor("layers.0.self_attn.q_proj", "../../evil.weight")),),
        (M_ST, "../../evil.weight"),
        "fuse export",
        2,
        {},
    ),
    (
        "st-name-dotdot-prefix",
        (edit_st(ST, rename_tensor("layers.0.self_attn.q_proj", "..model.layers.0.self_attn.q_proj.weight")),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    ("st-name-empty", (edit_st(ST, rename_tensor("layers.0.self_attn.q_proj", "")),), (M_ST,), "fuse", 2, {}),
    (
        "st-name-newline",
        (edit_st(ST, rename_tensor("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj\n.weight")),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    (
        "st-name-double-dot",
        (edit_st(ST, rename_tensor("layers.0.self_attn.q_proj", "model.layers.0..self_attn.q_proj.weight")),),
        (M_ST,),
        "fuse",
        2,
        {},
    ),
    ("st-metadata-number", (edit_st(ST, lambda h, d: ({**h, "__metadata__": 5}, d)),), (M_ST,), "fuse", 2, {}),
    (
        "st-missing-tensor",
        (edit_st(ST, drop_tensor("layers.0.self_attn.q_proj")),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse export",
        2,
        {},
    ),
    (
        "st-wrong-shape",
        (edit_st(ST, swap_shape("layers.0.self_attn.k_proj")),),
        ("model.layers.0.self_attn.k_proj",),
        "fuse apply",
        2,
        {},
    ),
    ("st-is-dir", (replace_with_dir(ST),), (M_ST,), "fuse", 2, {}),
    ("st-fifo", (fifo(ST),), (M_ST,), "fuse", 2, {"timeout": FIFO_TIMEOUT}),
    ("st-symlink-dev-zero", (symlink(ST, "/dev/zero"),), (M_ST,), "fuse", 2, {}),
    # the directory itself
    ("dir-missing", (remove("model"),), ("{model}",), "fuse export", 2, {}),
    ("dir-is-file", (remove("model"), write("model", "not a directory\n")), ("{model}",), "fuse", 2, {}),
    ("dir-empty", (remove("model"), mkdir("model")), ("{model}",), "fuse", 2, {}),
    ("dir-no-weights", (remove(ST), remove(IDX)), ("{model}",), "fuse", 2, {}),
    ("dir-index-without-shard", (remove(ST),), (M_ST,), "fuse", 2, {}),
    ("dir-symlink-loop", (remove("model"), symlink("model", "model")), ("{model}",), "fuse", 2, {}),
]

# 4-bit and MoE models: (what, model, adapter, steps, names, commands)
OTHER_MODEL_BREAKS: list[tuple] = [
    (
        "4bit-group-size-zero",
        "tiny-llama-4bit",
        (edit_json(CFG, quantization={"group_size": 0, "bits": 4}),),
        ("group_size",),
        "fuse",
    ),
    (
        "4bit-bits-string",
        "tiny-llama-4bit",
        (edit_json(CFG, quantization={"group_size": 32, "bits": "4"}),),
        ("bits",),
        "fuse",
    ),
    (
        "4bit-bits-three",
        "tiny-llama-4bit",
        (edit_json(CFG, quantization={"group_size": 32, "bits": 3}),),
        ("bits",),
        "fuse",
    ),
    ("4bit-quantization-string", "tiny-llama-4bit", (edit_json(CFG, quantization="yes"),), ("quantization",), "fuse"),
    (
        "4bit-quantization-missing",
        "tiny-llama-4bit",
        (edit_json(CFG, quantization=DELETE, quantization_config=DELETE),),
        ("quantization",),
        "fuse",
    ),
    (
        "4bit-scales-missing",
        "tiny-llama-4bit",
        (edit_st(ST, drop_tensor("layers.0.self_attn.q_proj.scales")),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse",
    ),
    (
        "4bit-weight-dtype-F32",
        "tiny-llama-4bit",
        (edit_st(ST, set_tensor("layers.0.self_attn.q_proj.weight", dtype="F32")),),
        (M_ST, "model.layers.0.self_attn.q_proj"),
        "fuse",
    ),
    ("moe-experts-zero", "tiny-moe", (edit_json(CFG, num_experts=0),), ("num_experts",), "fuse"),
    ("moe-experts-string", "tiny-moe", (edit_json(CFG, num_experts="4"),), ("num_experts",), "fuse"),
    ("moe-topk-over-experts", "tiny-moe", (edit_json(CFG, num_experts_per_tok=99),), ("num_experts_per_tok",), "apply"),
    (
        "moe-switch-wrong-shape",
        "tiny-moe",
        (edit_st(ST, swap_shape("layers.0.mlp.switch_mlp.gate_proj")),),
        ("model.layers.0.mlp.switch_mlp.gate_proj",),
        "fuse",
    ),
]


# ── adapter directories ─────────────────────────────────────────────────────

ACFG = "adapters/adapter_config.json"
AST = "adapters/adapters.safetensors"
A_CFG, A_ST = "{adapters}/adapter_config.json", "{adapters}/adapters.safetensors"
ADAPTER_CMDS = "fuse export"

ADAPTER_BREAKS: list[tuple] = [
    # adapter_config.json, adapterspec's
    ("config-missing", (remove(ACFG),), (A_CFG, "adapter_config.json"), "fuse export importmlxlm"),
    ("config-list", (write_json(ACFG, []),), (A_CFG,), "fuse export importmlxlm"),
    ("config-null", (write_json(ACFG, None),), (A_CFG,), "fuse importmlxlm"),
    ("config-string", (write_json(ACFG, "lora"),), (A_CFG,), "fuse importmlxlm"),
    ("config-not-json", (write(ACFG, "{nope"),), (A_CFG,), "fuse export applyadapters importmlxlm"),
    ("config-empty", (write(ACFG, ""),), (A_CFG,), "fuse"),
    ("config-deep", (deep_json(ACFG),), (A_CFG,), "fuse importmlxlm"),
    ("config-is-dir", (replace_with_dir(ACFG),), (A_CFG,), "fuse importmlxlm"),
    ("config-fifo", (fifo(ACFG),), (A_CFG,), "fuse importmlxlm", {"timeout": FIFO_TIMEOUT}),
    ("block-list", (edit_json(ACFG, adapterspec=[]),), (A_CFG,), "fuse export"),
    ("block-format-99", (edit_json(ACFG, adapterspec__format=99),), (A_CFG,), "fuse"),
    ("block-spec-number", (edit_json(ACFG, adapterspec__spec=5),), (A_CFG,), "fuse"),
    (
        "block-spec-syntax-error",
        (edit_json(ACFG, adapterspec__spec="adapterspec 1\nq_proj lora(\n"),),
        (A_CFG,),
        "fuse",
        {"exit": (1, 2)},
    ),
    (
        "block-spec-other-rank",
        (edit_json(ACFG, adapterspec__spec="adapterspec 1\nlayers[*].self_attn.<q,k,v,o>_proj: lora(r=4)\n"),),
        (A_CFG,),
        "fuse export",
    ),
    ("block-plan-list", (edit_json(ACFG, adapterspec__plan=[]),), (A_CFG,), "fuse"),
    ("block-plan-modules-string", (edit_json(ACFG, adapterspec__plan={"modules": "all"}),), (A_CFG,), "fuse"),
    (
        "block-plan-rank-nan",
        (map_json(ACFG, lambda c: (c["adapterspec"]["plan"]["modules"][0].update(r=NAN), c)[1]),),
        (A_CFG,),
        "fuse",
    ),
    (
        "block-plan-scale-inf",
        (map_json(ACFG, lambda c: (c["adapterspec"]["plan"]["modules"][0].update(scale=INF), c)[1]),),
        (A_CFG,),
        "fuse",
    ),
    (
        "block-plan-path-dotdot",
        (map_json(ACFG, lambda c: (c["adapterspec"]["plan"]["modules"][0].update(path="../../x"), c)[1]),),
        (A_CFG,),
        "fuse export",
    ),
    # mlx-lm's adapter_config.json (adapterspec's block removed first)
    (
        "mlxlm-num-layers-string",
        (strip_adapterspec(), edit_json(ACFG, num_layers="x")),
        ("num_layers",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-num-layers-float",
        (strip_adapterspec(), edit_json(ACFG, num_layers=2.5)),
        ("num_layers",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-fine-tune-ia3",
        (strip_adapterspec(), edit_json(ACFG, fine_tune_type="ia3")),
        ("ia3",),
        "fuse export importmlxlm",
    ),
    (
        "mlxlm-lora-parameters-missing",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters=DELETE)),
        ("lora_parameters",),
        "fuse",
    ),
    (
        "mlxlm-lora-parameters-list",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters=[8, 20.0])),
        ("lora_parameters",),
        "fuse importmlxlm",
    ),
    ("mlxlm-rank-zero", (strip_adapterspec(), edit_json(ACFG, lora_parameters__rank=0)), ("rank",), "fuse importmlxlm"),
    (
        "mlxlm-rank-negative",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__rank=-8)),
        ("rank",),
        "fuse export importmlxlm",
    ),
    (
        "mlxlm-rank-string",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__rank="8")),
        ("rank",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-rank-nan",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__rank=NAN)),
        ("rank",),
        "fuse export importmlxlm",
    ),
    (
        "mlxlm-rank-float",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__rank=8.5)),
        ("rank",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-rank-missing",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__rank=DELETE)),
        ("rank",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-scale-inf",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__scale=INF)),
        ("scale",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-scale-nan",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__scale=NAN)),
        ("scale",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-dropout-nan",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__dropout=NAN)),
        ("dropout",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-keys-string",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__keys="self_attn.q_proj")),
        ("keys",),
        "fuse export importmlxlm",
    ),
    (
        "mlxlm-keys-numbers",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__keys=[1, 2])),
        ("keys",),
        "fuse importmlxlm",
    ),
    (
        "mlxlm-keys-newline",
        (strip_adapterspec(), edit_json(ACFG, lora_parameters__keys=["self_attn.q_proj\n/**: full"])),
        ("keys",),
        "fuse importmlxlm",
        {"forbid": ("/**: full",)},
    ),
    # adapters.safetensors
    ("weights-missing", (remove(AST),), (A_ST, "adapters.safetensors"), "fuse export"),
    ("weights-empty", (write(AST, b""),), (A_ST,), "fuse"),
    ("weights-truncated", (truncate(AST, 2000),), (A_ST,), "fuse export applyadapters"),
    ("weights-truncated-last-byte", (truncate(AST, -1),), (A_ST,), "fuse"),
    ("weights-header-not-json", (edit_st(AST, raw_header(b"{nope")),), (A_ST,), "fuse"),
    ("weights-header-len-past-end", (raw_st(AST, st_bytes(b"{}", b"", header_len=99)),), (A_ST,), "fuse"),
    ("weights-no-tensors", (raw_st(AST, st_bytes(b"{}", b"")),), (A_ST,), "fuse"),
    (
        "weights-missing-lora-b",
        (edit_st(AST, drop_tensor("layers.0.self_attn.q_proj.lora_b")),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse export",
    ),
    (
        "weights-missing-lora-a",
        (edit_st(AST, drop_tensor("layers.0.self_attn.q_proj.lora_a")),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse",
    ),
    (
        "weights-wrong-shape",
        (edit_st(AST, swap_shape("layers.0.self_attn.k_proj.lora_a")),),
        ("model.layers.0.self_attn.k_proj",),
        "fuse export applyadapters",
    ),
    (
        "weights-shape-offsets-mismatch",
        (edit_st(AST, set_tensor("layers.0.self_attn.q_proj.lora_a", shape=[64, 9])),),
        (A_ST,),
        "fuse",
    ),
    (
        "weights-nan-lora-b",
        (edit_st(AST, fill_tensor("layers.0.self_attn.q_proj.lora_b", NAN)),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse export applyadapters",
    ),
    (
        "weights-inf-lora-a",
        (edit_st(AST, fill_tensor("layers.0.self_attn.q_proj.lora_a", INF)),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse",
    ),
    (
        "weights-dtype-Q4_K",
        (edit_st(AST, set_tensor("layers.0.self_attn.q_proj.lora_a", dtype="Q4_K")),),
        (A_ST,),
        "fuse export",
    ),
    (
        "weights-dtype-I32",
        (edit_st(AST, set_tensor("layers.0.self_attn.q_proj.lora_a", dtype="I32")),),
        ("model.layers.0.self_attn.q_proj",),
        "fuse",
    ),
    (
        "weights-offsets-outside",
        (edit_st(AST, set_tensor("layers.0.self_attn.q_proj.lora_a", data_offsets=[0, 10**9])),),
        (A_ST,),
        "fuse",
    ),
    (
        "weights-offsets-overlap",
        (edit_st(AST, overlap("layers.0.self_attn.k_proj.lora_a", "layers.0.self_attn.q_proj.lora_a")),),
        (A_ST,),
        "fuse",
    ),
    (
        "weights-unplanned-module",
        (edit_st(AST, rename_tensor("layers.0.self_attn.q_proj.lora_a", "model.layers.0.mlp.gate_proj.lora_a")),),
        ("model.layers.0.mlp.gate_proj",),
        "fuse export",
    ),
    (
        "weights-name-dotdot",
        (edit_st(AST, rename_tensor("layers.0.self_attn.q_proj.lora_a", "../../x.lora_a")),),
        (A_ST,),
        "fuse export",
    ),
    ("weights-name-empty", (edit_st(AST, rename_tensor("layers.0.self_attn.q_proj.lora_a", "")),), (A_ST,), "fuse"),
    ("weights-is-dir", (replace_with_dir(AST),), (A_ST,), "fuse"),
    ("weights-fifo", (fifo(AST),), (A_ST,), "fuse", {"timeout": FIFO_TIMEOUT}),
    ("dir-missing", (remove("adapters"),), ("{adapters}",), "fuse"),
    ("dir-empty", (remove("adapters"), mkdir("adapters")), ("{adapters}",), "fuse"),
    ("dir-is-model", (remove("adapters"), model("tiny-llama", dest="adapters")), ("{adapters}",), "fuse export"),
    ("dir-for-other-model", (remove("adapters"), adapters("moe")), ("{adapters}",), "fuse export"),
]


# ── PEFT adapter directories (`import peft`) ─────────────────────────────────

PCFG = "peft/adapter_config.json"
PST = "peft/adapter_model.safetensors"
P_CFG, P_ST = "{peft}/adapter_config.json", "{peft}/adapter_model.safetensors"

PEFT_BREAKS: list[tuple] = [
    ("config-missing", (remove(PCFG),), (P_CFG, "adapter_config.json"), "importpeft"),
    ("config-list", (write_json(PCFG, []),), (P_CFG,), "importpeft"),
    ("config-null", (write_json(PCFG, None),), (P_CFG,), "importpeft"),
    ("config-not-json", (write(PCFG, "{"),), (P_CFG,), "importpeft"),
    ("config-deep", (deep_json(PCFG),), (P_CFG,), "importpeft"),
    ("config-fifo", (fifo(PCFG),), (P_CFG,), "importpeft", {"timeout": FIFO_TIMEOUT}),
    ("r-negative", (edit_json(PCFG, r=-8),), ("r",), "importpeft importpeftmodel"),
    ("r-zero", (edit_json(PCFG, r=0),), ("r",), "importpeft"),
    ("r-string", (edit_json(PCFG, r="8"),), ("r",), "importpeft"),
    ("r-float", (edit_json(PCFG, r=8.5),), ("r",), "importpeft"),
    ("r-nan", (edit_json(PCFG, r=NAN),), ("r",), "importpeft"),
    ("r-huge", (edit_json(PCFG, r=10**30),), ("r",), "importpeft"),
    ("lora-alpha-nan", (edit_json(PCFG, lora_alpha=NAN),), ("lora_alpha",), "importpeft"),
    ("lora-alpha-inf", (edit_json(PCFG, lora_alpha=INF),), ("lora_alpha",), "importpeft"),
    ("lora-alpha-string", (edit_json(PCFG, lora_alpha="x"),), ("lora_alpha",), "importpeft"),
    ("lora-dropout-two", (edit_json(PCFG, lora_dropout=2.0),), ("lora_dropout",), "importpeft"),
    ("lora-dropout-nan", (edit_json(PCFG, lora_dropout=NAN),), ("lora_dropout",), "importpeft"),
    ("target-modules-number", (edit_json(PCFG, target_modules=5),), ("target_modules",), "importpeft"),
    ("target-modules-numbers", (edit_json(PCFG, target_modules=[1, 2]),), ("target_modules",), "importpeft"),
    ("target-modules-object", (edit_json(PCFG, target_modules={"q_proj": 1}),), ("target_modules",), "importpeft"),
    ("target-modules-null", (edit_json(PCFG, target_modules=None),), ("target_modules",), "importpeft"),
    ("target-modules-empty-name", (edit_json(PCFG, target_modules=[""]),), ("target_modules",), "importpeft"),
    (
        "target-modules-newline",
        (edit_json(PCFG, target_modules=["q_proj\n/**: full"]),),
        ("target_modules",),
        "importpeft importpeftmodel",
        {"forbid": ("/**: full",)},
    ),
    (
        "exclude-modules-newline",
        (edit_json(PCFG, exclude_modules=["k_proj\n/**: full"]),),
        ("exclude_modules",),
        "importpeft",
        {"forbid": ("/**: full",)},
    ),
    ("peft-type-ia3", (edit_json(PCFG, peft_type="IA3"),), ("IA3",), "importpeft"),
    ("peft-type-number", (edit_json(PCFG, peft_type=3),), ("peft_type",), "importpeft"),
    ("rank-pattern-list", (edit_json(PCFG, rank_pattern=["q_proj"]),), ("rank_pattern",), "importpeft"),
    ("rank-pattern-negative", (edit_json(PCFG, rank_pattern={"q_proj": -1}),), ("rank_pattern",), "importpeft"),
    (
        "rank-pattern-key-newline",
        (edit_json(PCFG, rank_pattern={"q_proj\n/**: full": 4}),),
        ("rank_pattern",),
        "importpeft",
        {"forbid": ("/**: full",)},
    ),
    ("alpha-pattern-string", (edit_json(PCFG, alpha_pattern={"q_proj": "x"}),), ("alpha_pattern",), "importpeft"),
    ("layers-to-transform-string", (edit_json(PCFG, layers_to_transform="0"),), ("layers_to_transform",), "importpeft"),
    (
        "layers-to-transform-negative",
        (edit_json(PCFG, layers_to_transform=[-1]),),
        ("layers_to_transform",),
        "importpeft",
    ),
    (
        "layers-pattern-number",
        (edit_json(PCFG, layers_to_transform=[0], layers_pattern=5),),
        ("layers_pattern",),
        "importpeft",
    ),
    ("modules-to-save-number", (edit_json(PCFG, modules_to_save=5),), ("modules_to_save",), "importpeft"),
    (
        "modules-to-save-newline",
        (edit_json(PCFG, modules_to_save=["lm_head\n/**: full"]),),
        ("modules_to_save",),
        "importpeft",
        {"forbid": ("/**: full",)},
    ),
    ("use-dora-string", (edit_json(PCFG, use_dora="yes"),), ("use_dora",), "importpeft"),
    ("r-null", (edit_json(PCFG, r=None),), ("r",), "importpeft importpeftmodel"),
    ("lora-alpha-null", (edit_json(PCFG, lora_alpha=None),), ("lora_alpha",), "importpeft importpeftmodel"),
    ("lora-dropout-null", (edit_json(PCFG, lora_dropout=None),), ("lora_dropout",), "importpeft"),
    ("rank-pattern-null", (edit_json(PCFG, rank_pattern={"q_proj": None}),), ("rank_pattern",), "importpeft"),
    ("alpha-pattern-null", (edit_json(PCFG, alpha_pattern={"q_proj": None}),), ("alpha_pattern",), "importpeft"),
    (
        "layers-to-transform-all-linear",
        (edit_json(PCFG, target_modules="all-linear", layers_to_transform=[0]),),
        ("layers_to_transform",),
        "importpeft importpeftmodel",
    ),
    (
        "layers-pattern-regex-target",
        (edit_json(PCFG, target_modules=r".*\.q_proj", layers_pattern="layers"),),
        ("layers_pattern",),
        "importpeft",
    ),
    ("init-lora-weights-unknown", (edit_json(PCFG, init_lora_weights="bogus"),), ("init_lora_weights",), "importpeft"),
    ("init-lora-weights-number", (edit_json(PCFG, init_lora_weights=3),), ("init_lora_weights",), "importpeft"),
    ("bias-number", (edit_json(PCFG, bias=5),), ("bias",), "importpeft"),
    ("weights-missing", (remove(PST),), (P_ST, "adapter_model.safetensors"), "importpeftmodel"),
    ("weights-truncated", (truncate(PST, 1000),), (P_ST,), "importpeftmodel"),
    ("weights-header-not-json", (edit_st(PST, raw_header(b"{x")),), (P_ST,), "importpeftmodel"),
    (
        "weights-nan",
        (edit_st(PST, fill_tensor("layers.0.self_attn.q_proj.lora_B", NAN)),),
        ("q_proj",),
        "importpeftmodel",
    ),
    (
        "weights-wrong-shape",
        (edit_st(PST, swap_shape("layers.0.self_attn.k_proj.lora_A")),),
        ("k_proj",),
        "importpeftmodel",
    ),
    (
        "weights-missing-lora-b",
        (edit_st(PST, drop_tensor("layers.0.self_attn.q_proj.lora_B")),),
        ("q_proj",),
        "importpeftmodel",
    ),
    (
        "weights-dtype-Q4_K",
        (edit_st(PST, set_tensor("layers.0.self_attn.q_proj.lora_A", dtype="Q4_K")),),
        (P_ST,),
        "importpeftmodel",
    ),
    ("dir-missing", (remove("peft"),), ("{peft}",), "importpeft"),
    ("dir-is-file", (remove("peft"), write("peft", "x")), ("{peft}",), "importpeft"),
]


# ── mlx-lm configs (`import mlx-lm`) ────────────────────────────────────────

YAML = "lora.yaml"
Y = "{yaml}"
MLXLM_GOOD = "fine_tune_type: lora\nnum_layers: 2\nlora_parameters:\n  rank: 8\n  scale: 20.0\n  dropout: 0.0\n"

MLXLM_BREAKS: list[tuple] = [
    ("keys-newline", MLXLM_GOOD + '  keys: ["self_attn.q_proj\\n/**: full"]\n', ("keys",), {"forbid": ("/**: full",)}),
    (
        "keys-newline-model",
        MLXLM_GOOD + '  keys: ["self_attn.q_proj\\n/**: full"]\n',
        ("keys",),
        {"forbid": ("/**: full",), "model": True},
    ),
    (
        "keys-comment-injection",
        MLXLM_GOOD + '  keys: ["self_attn.q_proj: none # \\nembed_tokens: full"]\n',
        ("keys",),
        {"forbid": ("embed_tokens: full",)},
    ),
    ("keys-cr", MLXLM_GOOD + '  keys: ["self_attn.q_proj\\r/**: full"]\n', ("keys",), {"forbid": ("/**: full",)}),
    (
        "keys-selector-syntax",
        MLXLM_GOOD + '  keys: ["self_attn.q_proj: full"]\n',
        ("keys",),
        {"forbid": ("q_proj: full",)},
    ),
    ("keys-string", MLXLM_GOOD + "  keys: self_attn.q_proj\n", ("keys",), {}),
    ("keys-numbers", MLXLM_GOOD + "  keys: [1, 2]\n", ("keys",), {}),
    ("keys-nested", MLXLM_GOOD + "  keys: [[self_attn.q_proj]]\n", ("keys",), {}),
    ("num-layers-string", MLXLM_GOOD.replace("num_layers: 2", "num_layers: x"), ("num_layers",), {}),
    ("num-layers-float", MLXLM_GOOD.replace("num_layers: 2", "num_layers: 2.5"), ("num_layers",), {}),
    (
        "num-layers-huge",
        MLXLM_GOOD.replace("num_layers: 2", "num_layers: 100000000000000000000000"),
        ("num_layers",),
        {"exit": (0, 2)},
    ),
    ("rank-negative", MLXLM_GOOD.replace("rank: 8", "rank: -1"), ("rank",), {}),
    ("rank-zero", MLXLM_GOOD.replace("rank: 8", "rank: 0"), ("rank",), {}),
    ("rank-nan", MLXLM_GOOD.replace("rank: 8", "rank: .nan"), ("rank",), {}),
    ("rank-string", MLXLM_GOOD.replace("rank: 8", "rank: eight"), ("rank",), {}),
    ("scale-inf", MLXLM_GOOD.replace("scale: 20.0", "scale: .inf"), ("scale",), {}),
    ("scale-nan", MLXLM_GOOD.replace("scale: 20.0", "scale: .nan"), ("scale",), {}),
    ("dropout-two", MLXLM_GOOD.replace("dropout: 0.0", "dropout: 2.0"), ("dropout",), {}),
    ("fine-tune-ia3", MLXLM_GOOD.replace("fine_tune_type: lora", "fine_tune_type: ia3"), ("ia3",), {}),
    ("lora-parameters-string", "fine_tune_type: lora\nlora_parameters: yes\n", ("lora_parameters",), {}),
    (
        "lora-parameters-no-rank",
        "fine_tune_type: lora\nlora_parameters:\n  scale: 20.0\n  dropout: 0.0\n",
        ("rank",),
        {},
    ),
    ("yaml-broken", "fine_tune_type: [lora\n", (Y,), {}),
    ("yaml-list", "- a\n- b\n", (Y,), {}),
    ("yaml-scalar", "just words\n", (Y,), {}),
    ("yaml-empty", "", (Y,), {}),
    ("yaml-tabs", "fine_tune_type:\tlora\n\tnum_layers: 2\n", (Y,), {}),
    ("yaml-python-tag", '!!python/object/apply:os.system ["touch pwned"]\n', (Y,), {}),
    ("yaml-python-name", "fine_tune_type: !!python/name:os.system\n", (Y,), {}),
    (
        "yaml-alias-bomb",
        'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\nlora_parameters: *h\n",
        (Y,),
        {},
    ),
    ("yaml-deep", "[" * 100_000 + "]" * 100_000 + "\n", (Y,), {}),
    ("yaml-binary", b"\x00\x01\x02\xff\xfe" * 100, (Y,), {}),
    ("yaml-not-utf8", b"fine_tune_type: l\xe9ra\n", (Y,), {}),
    ("yaml-duplicate-keys", MLXLM_GOOD + "lora_parameters: 5\n", ("lora_parameters",), {"exit": (0, 2)}),
]

MLXLM_PATH_CASES: list[tuple] = [
    ("path-missing", (), "{ws}/nothing.yaml", ("nothing.yaml",)),
    ("path-empty-dir", (mkdir("emptydir"),), "{ws}/emptydir", ("emptydir",)),
    ("path-fifo", (fifo("pipe.yaml"),), "{ws}/pipe.yaml", ("pipe.yaml",)),
    ("path-dev-zero", (symlink("zero.yaml", "/dev/zero"),), "{ws}/zero.yaml", ("zero.yaml",)),
    ("path-huge", (write("huge.yaml", "# " + "x" * (64 << 20) + "\n"),), "{ws}/huge.yaml", ("huge.yaml",)),
]


# ── spec files ──────────────────────────────────────────────────────────────

S = "spec.aspec"
SPEC_CMDS = "speclint fmt plan explain"

SPEC_BREAKS: list[tuple] = [
    # (what, steps, names, commands, exit, extra)
    ("missing", (remove(S),), ("{spec}",), "speclint fmt plan explain", 2, {}),
    ("is-dir", (remove(S), user_dir(S, {"notes.txt": "x\n"})), ("{spec}",), "plan explain", 2, {}),
    ("dir-without-specs", (remove(S), user_dir(S, {"notes.txt": "x\n"})), ("{spec}",), "speclint fmt", 2, {}),
    ("fifo", (fifo(S),), ("{spec}",), "speclint fmt plan apply", 2, {"timeout": FIFO_TIMEOUT}),
    ("dev-zero", (symlink(S, "/dev/zero"),), ("{spec}",), "speclint plan", (1, 2), {"timeout": FIFO_TIMEOUT}),
    ("symlink-loop", (symlink(S, "spec.aspec"),), ("{spec}",), "speclint fmt plan", 2, {}),
    ("binary", (spec(bytes(range(256)) * 64),), ("{spec}", "AS100"), SPEC_CMDS + " apply", 1, {}),
    ("nul-bytes", (spec(b"adapterspec 1\nq_proj: lora\x00(r=8)\n"),), ("{spec}",), SPEC_CMDS, 1, {}),
    ("utf16", (spec("adapterspec 1\nq_proj: lora\n".encode("utf-16")),), ("{spec}", "AS100"), SPEC_CMDS, 1, {}),
    (
        "latin1",
        (spec("adapterspec 1\nq_proj: lora  # caf\xe9\n".encode("latin-1")),),
        ("{spec}", "AS100"),
        SPEC_CMDS,
        1,
        {},
    ),
    (
        "huge-10mb",
        (spec("adapterspec 1\n" + ("# " + "x" * 1000 + "\n") * 10_000),),
        ("{spec}", "AS105"),
        SPEC_CMDS + " train",
        1,
        {},
    ),
    ("huge-one-line", (spec("adapterspec 1\n" + "x" * (8 << 20)),), ("{spec}", "AS105"), "speclint fmt plan", 1, {}),
    (
        "long-line",
        (spec("adapterspec 1\n" + "q_proj: lora  # " + "x" * 5000 + "\n"),),
        ("{spec}", "AS105"),
        "speclint plan",
        1,
        {},
    ),
    ("100k-rules", (spec_lines("x: none\n", 100_000),), (), "speclint plan", (0, 1), {"timeout": 30}),
    (
        "100k-rules-over-limit",
        (spec_lines("layers[*].self_attn.q_proj: lora\n", 100_000),),
        ("{spec}", "AS105"),
        "speclint plan",
        1,
        {},
    ),
    (
        "deep-parens",
        (spec("adapterspec 1\nq_proj: lora" + "(" * 4000 + "\n"),),
        ("{spec}",),
        "speclint fmt plan",
        1,
        {},
    ),
    ("deep-angles", (spec("adapterspec 1\n" + "<" * 4000 + "q_proj: lora\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("deep-brackets", (spec("adapterspec 1\nlayers" + "[" * 4000 + ": lora\n"),), ("{spec}",), "speclint plan", 1, {}),
    (
        "huge-index",
        (spec("adapterspec 1\nlayers[99999999999999999999999999].self_attn.q_proj: lora\n"),),
        ("{spec}",),
        "speclint plan explain",
        (0, 1),
        {},
    ),
    (
        "slice-step-zero",
        (spec("adapterspec 1\nlayers[0:4:0].self_attn.q_proj: lora\n"),),
        ("{spec}",),
        "speclint plan",
        1,
        {},
    ),
    ("rank-zero", (spec("adapterspec 1\nq_proj: lora(r=0)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("rank-negative", (spec("adapterspec 1\nq_proj: lora(r=-8)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("rank-overflow", (spec("adapterspec 1\nq_proj: lora(r=1e400)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("rank-huge", (spec("adapterspec 1\nq_proj: lora(r=1000000000)\n"),), ("{spec}",), "plan apply", (1, 2), {}),
    ("rank-float", (spec("adapterspec 1\nq_proj: lora(r=8.5)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("scale-nan", (spec("adapterspec 1\nq_proj: lora(scale=nan)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("scale-inf", (spec("adapterspec 1\nq_proj: lora(scale=inf)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("alpha-huge", (spec("adapterspec 1\nq_proj: lora(alpha=1e309)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("dropout-over-one", (spec("adapterspec 1\nq_proj: lora(dropout=1.5)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("dropout-negative", (spec("adapterspec 1\nq_proj: lora(dropout=-0.1)\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("unknown-transform", (spec("adapterspec 1\nq_proj: ia3\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("version-99", (spec("adapterspec 99\nq_proj: lora\n"),), ("{spec}",), "speclint plan", 1, {}),
    ("quoted-value", (spec('adapterspec 1\nq_proj: lora(r="8")\n'),), ("{spec}",), "speclint plan", 1, {}),
    ("lone-cr", (spec(b"adapterspec 1\rq_proj: lora\r"),), ("{spec}",), "speclint plan", (0, 1), {}),
    (
        "dora-on-4bit-experts",
        (spec("adapterspec 1\nlayers[*].mlp.switch_mlp.*: dora\n"),),
        ("{spec}",),
        "speclint plan",
        (0, 1),
        {},
    ),
]


# ── training data and options (`train`) ─────────────────────────────────────

TRAIN = "data/train.jsonl"
VALID = "data/valid.jsonl"
D_TRAIN, D_VALID = "{data}/train.jsonl", "{data}/valid.jsonl"

DATA_BREAKS: list[tuple] = [
    ("dir-missing", (remove("data"),), ("{data}",)),
    ("train-empty", (write(TRAIN, ""),), (D_TRAIN,)),
    ("train-invalid-json", (write(TRAIN, '{"text": "a"}\n{"text": \n{"text": "b"}\n'),), (D_TRAIN,)),
    ("train-wrong-fields", (write(TRAIN, '{"input": "a", "output": "b"}\n' * 4),), (D_TRAIN,)),
    ("train-binary", (write(TRAIN, bytes(range(256)) * 8),), (D_TRAIN,)),
    ("train-fifo", (fifo(TRAIN),), (D_TRAIN,), {"timeout": FIFO_TIMEOUT}),
    # (no valid.jsonl is fine: mlx-lm and adapterspec then train without validation)
    ("valid-invalid-json", (write(VALID, '{"text": "a"}\n{"text"\n'),), (D_VALID, "valid.jsonl")),
    ("train-text-not-a-string", (write(TRAIN, '{"text": "a"}\n{"text": 5}\n' * 4),), (D_TRAIN + ":2", '"text"')),
    (
        "train-layouts-mixed",
        (write(TRAIN, '{"text": "a"}\n' * 3 + '{"prompt": "a", "completion": "b"}\n'),),
        (D_TRAIN + ":4", "line 1"),
    ),
    (
        "train-tools-not-a-schema",  # mlx-lm's chat template fails on it: an internal error at the first batch before
        (write(TRAIN, '\n{"messages": [{"role": "user", "content": "hi"}], "tools": "none"}\n' * 4),),
        (D_TRAIN + ": example 1 (line 2)",),
    ),
    ("train-text-empty", (write(TRAIN, '{"text": "a b"}\n{"text": ""}\n' * 4),), (D_TRAIN + ":2", '"text" is empty')),
    ("train-messages-not-a-list", (write(TRAIN, '{"messages": "hello"}\n' * 4),), (D_TRAIN + ":1", '"messages"')),
]

# (what, extra argv, names, exit)
TRAIN_OPTIONS: list[tuple] = [
    ("seed-negative", ("--seed", "-1"), ("--seed",), 2),
    ("seed-2-70", ("--seed", str(2**70)), ("--seed",), 2),
    ("seed-word", ("--seed", "abc"), ("--seed",), 2),
    ("learning-rate-nan", ("--learning-rate", "nan"), ("--learning-rate",), 2),
    ("iters-negative", ("--iters", "-3"), ("--iters",), 2),
    ("batch-size-zero", ("--batch-size", "0"), ("--batch-size",), 2),
    ("max-seq-length-one", ("--max-seq-length", "1"), ("--max-seq-length",), 2),  # no target: an internal error
    ("memory-limit-word", ("--memory-limit", "lots"), ("--memory-limit",), 2),
    ("memory-limit-negative", ("--memory-limit", "-1GB"), ("--memory-limit",), 2),
    ("clear-cache-threshold-exponent", ("--clear-cache-threshold", "1e9"), ("--clear-cache-threshold",), 2),
    ("config-missing", ("-c", "{ws}/none.yaml"), ("none.yaml",), 2),
    ("resume-nothing-to-resume", ("--resume",), ("{out}",), 2),
]

# (what, config text, names)
TRAIN_CONFIGS: list[tuple] = [
    ("config-python-tag", '!!python/object/apply:os.system ["touch pwned"]\n', ("train.yaml",)),
    (
        "optimizer-setting-a-string",
        "optimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: lots\n",
        ("optimizer_config.adamw.weight_decay",),
    ),
    ("optimizer-config-a-list", "optimizer_config: [1, 2]\n", ("optimizer_config",)),
    ("optimizer-a-number", "optimizer: 5\n", ("optimizer",)),  # an internal error before
    ("mask-prompt-quoted-no", "mask_prompt: 'no'\n", ("mask_prompt",)),  # read as true before
    ("optimizer-betas-nan", "optimizer_config:\n  adam:\n    betas: [0.9, .nan]\n", ("optimizer_config.adam.betas",)),
]


# ── output paths ────────────────────────────────────────────────────────────
# (what, command, argv-override for the destination, steps, names, exit)

BROKEN_CONFIG = remove(CFG)

OUTPUT_CASES: list[tuple] = []
for _cmd, _tmpl in [
    ("apply", ("apply", "{model}", "{spec}")),
    ("fuse", ("fuse", "{model}", "{adapters}", "--quiet")),
    ("export", ("export", "peft", "{model}", "{adapters}")),
    ("train", ("train", "{model}", "{spec}", "--data", "{data}", *TRAIN_SHORT)),
]:
    OUTPUT_CASES += [
        (_cmd, "out-inside-model", (*_tmpl, "-o", "{model}/out"), (), ("{model}",), 2),
        (_cmd, "out-is-model", (*_tmpl, "-o", "{model}", "--force"), (), ("{model}",), 2),
        (_cmd, "out-is-file", (*_tmpl, "-o", "{ws}/out.txt"), (write("out.txt", "user file\n"),), ("out.txt",), 2),
        (_cmd, "out-user-dir", (*_tmpl, "-o", "{out}"), (user_dir(),), ("{out}",), 2),
        (
            _cmd,
            "out-user-dir-force-bad-input",
            (*_tmpl, "-o", "{out}", "--force"),
            (user_dir(), BROKEN_CONFIG),
            ((M_CFG, "{out}"),),  # either refusal is right: the broken config, or the user's files in OUT
            2,
        ),
        (
            _cmd,
            "out-parent-is-file",
            (*_tmpl, "-o", "{ws}/plain.txt/out"),
            (write("plain.txt", "x\n"),),
            ("plain.txt",),
            2,
        ),
        (_cmd, "out-parent-readonly", (*_tmpl, "-o", "{ws}/ro/out"), (mkdir("ro"), chmod("ro", 0o555)), ("ro",), 2),
        (
            _cmd,
            "out-symlink-to-model",
            (*_tmpl, "-o", "{ws}/link", "--force"),
            (symlink("link", "model"),),
            ("link",),
            2,
        ),
    ]
# the costly commands (they load the model with mlx-lm) keep a few output cases each
OUTPUT_CASES = [
    c
    for c in OUTPUT_CASES
    if c[0] not in ("train", "apply") or c[1] in ("out-inside-model", "out-user-dir-force-bad-input", "out-is-file")
]
OUTPUT_CASES += [
    ("apply", "out-is-spec", ("apply", "{model}", "{spec}", "-o", "{spec}", "--force"), (), ("{spec}",), 2),
    ("apply", "out-is-spec-dir-parent", ("apply", "{model}", "{spec}", "-o", "{spec}/out"), (), ("{spec}",), 2),
    (
        "apply",
        "out-inside-adapters-input",
        ("apply", "{model}", "{spec}", "--adapters", "{adapters}", "-o", "{adapters}", "--force"),
        (),
        ("{adapters}",),
        2,
    ),
    ("apply", "out-dev-null-child", ("apply", "{model}", "{spec}", "-o", "/dev/null/out"), (), ("/dev/null",), 2),
    (
        "fuse",
        "out-is-adapters",
        ("fuse", "{model}", "{adapters}", "-o", "{adapters}", "--force", "--quiet"),
        (),
        ("{adapters}",),
        2,
    ),
    (
        "fuse",
        "out-inside-adapters",
        ("fuse", "{model}", "{adapters}", "-o", "{adapters}/fused", "--quiet"),
        (),
        ("{adapters}",),
        2,
    ),
    (
        "fuse",
        "out-dev-null-child",
        ("fuse", "{model}", "{adapters}", "-o", "/dev/null/out", "--quiet"),
        (),
        ("/dev/null",),
        2,
    ),
    (
        "fuse",
        "report-json-is-adapter-config",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", A_CFG, "--quiet"),
        (),
        ("adapter_config.json",),
        2,
    ),
    (
        "fuse",
        "report-json-is-model-config",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", M_CFG, "--quiet"),
        (),
        ("config.json",),
        2,
    ),
    (
        "fuse",
        "report-json-is-spec",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", "{spec}", "--quiet"),
        (),
        ("{spec}",),
        2,
    ),
    (
        "fuse",
        "report-json-missing-dir",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", "{ws}/nodir/report.json", "--quiet"),
        (),
        ("nodir",),
        2,
    ),
    (
        "fuse",
        "report-json-is-dir",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", "{ws}/rdir", "--quiet"),
        (user_dir("rdir"),),
        ("rdir",),
        2,
    ),
    (
        "fuse",
        "report-json-inside-model",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", "{model}/report.json", "--quiet"),
        (),
        ("{model}",),
        2,
    ),
    (
        "fuse",
        "report-json-is-output",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", "{out}", "--quiet"),
        (),
        ("{out}",),
        2,
    ),
    (
        "fuse",
        "report-json-fifo",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--report-json", "{ws}/r.fifo", "--quiet"),
        (fifo("r.fifo"),),
        ("r.fifo",),
        2,
    ),
    (
        "export",
        "out-is-peft-input",
        ("export", "peft", "{model}", "{adapters}", "-o", "{adapters}", "--force"),
        (),
        ("{adapters}",),
        2,
    ),
    (
        "importpeft",
        "out-is-input-config",
        ("import", "peft", "{peft}", "-o", P_CFG, "--force"),
        (),
        ("adapter_config.json",),
        2,
    ),
    ("importpeft", "out-inside-input", ("import", "peft", "{peft}", "-o", "{peft}/spec.aspec"), (), ("{peft}",), 2),
    (
        "importpeft",
        "out-existing-file",
        ("import", "peft", "{peft}", "-o", "{ws}/mine.aspec"),
        (write("mine.aspec", "# mine\n"),),
        ("mine.aspec",),
        2,
    ),
    ("importpeft", "out-is-dir", ("import", "peft", "{peft}", "-o", "{ws}/adir"), (user_dir("adir"),), ("adir",), 2),
    (
        "importpeft",
        "out-parent-missing",
        ("import", "peft", "{peft}", "-o", "{ws}/nodir/spec.aspec"),
        (),
        ("nodir",),
        2,
    ),
    (
        "importpeft",
        "adapters-out-is-model",
        ("import", "peft", "{peft}", "--model", "{model}", "-o", "{outspec}", "--adapters-out", "{model}", "--force"),
        (),
        ("{model}",),
        2,
    ),
    (
        "importpeft",
        "adapters-out-is-peft",
        ("import", "peft", "{peft}", "--model", "{model}", "-o", "{outspec}", "--adapters-out", "{peft}", "--force"),
        (),
        ("{peft}",),
        2,
    ),
    (
        "importpeft",
        "out-is-adapters-out",
        ("import", "peft", "{peft}", "--model", "{model}", "-o", "{out}", "--adapters-out", "{out}"),
        (),
        ("{out}",),
        2,
    ),
    (
        "importpeft",
        "out-inside-adapters-out",
        ("import", "peft", "{peft}", "--model", "{model}", "-o", "{out}/spec.aspec", "--adapters-out", "{out}"),
        (mkdir("out"),),
        ("{out}",),
        2,
    ),
    (
        "importpeft",
        "adapters-out-inside-out",
        ("import", "peft", "{peft}", "--model", "{model}", "-o", "{out}", "--adapters-out", "{out}/adapters"),
        (),
        ("{out}",),
        2,
    ),
    (
        "importpeft",
        "out-inside-input-named-by-config",
        ("import", "peft", P_CFG, "-o", "{peft}/spec.aspec"),
        (),
        ("{peft}",),
        2,
    ),
    (
        "importmlxlm",
        "out-is-input",
        ("import", "mlx-lm", Y, "-o", Y, "--force"),
        (write(YAML, MLXLM_GOOD),),
        ("lora.yaml",),
        2,
    ),
    (
        "importmlxlm",
        "out-existing-file",
        ("import", "mlx-lm", Y, "-o", "{ws}/mine.aspec"),
        (write(YAML, MLXLM_GOOD), write("mine.aspec", "# mine\n")),
        ("mine.aspec",),
        2,
    ),
    ("fmt", "spec-is-model-config", ("fmt", M_CFG), (), ("config.json",), (1, 2)),
]


# ── options and environment of single commands ──────────────────────────────

EXTRA: list[Case] = [
    Case(
        "apply-option-seed-negative", ("apply", "{model}", "{spec}", "-o", "{out}", "--seed", "-1"), names=("--seed",)
    ),
    Case(
        "apply-option-seed-2-70", ("apply", "{model}", "{spec}", "-o", "{out}", "--seed", str(2**70)), names=("--seed",)
    ),
    Case(
        "fuse-option-max-shard-size-zero",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--max-shard-size", "0"),
        names=("--max-shard-size",),
    ),
    Case(
        "fuse-option-max-shard-size-negative",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--max-shard-size", "-5GB"),
        names=("--max-shard-size",),
    ),
    Case(
        "fuse-option-max-shard-size-word",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--max-shard-size", "big"),
        names=("--max-shard-size",),
    ),
    Case(
        "fuse-option-max-shard-size-overflow",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--max-shard-size", "1e999GB"),
        names=("--max-shard-size",),
    ),
    Case(
        "fuse-option-max-shard-size-nan",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--max-shard-size", "nanGB"),
        names=("--max-shard-size",),
    ),
    Case(
        "fuse-option-keep-precision-unknown",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--keep-precision", "always"),
        names=("--keep-precision",),
    ),
    Case(
        "fuse-env-workers-abc",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
        env={"ADAPTERSPEC_FUSE_WORKERS": "abc"},
        names=("ADAPTERSPEC_FUSE_WORKERS",),
    ),
    Case(
        "fuse-env-workers-1000",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
        env={"ADAPTERSPEC_FUSE_WORKERS": "1000"},
        exit=(0, 2),
        timeout=30,
    ),
    Case(
        "fuse-env-workers-0",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
        env={"ADAPTERSPEC_FUSE_WORKERS": "0"},
        exit=(0, 2),
    ),
    Case(
        "fuse-env-workers-negative",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
        env={"ADAPTERSPEC_FUSE_WORKERS": "-2"},
        names=("ADAPTERSPEC_FUSE_WORKERS",),
    ),
    Case(
        "fuse-env-workers-float",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
        env={"ADAPTERSPEC_FUSE_WORKERS": "1.5"},
        names=("ADAPTERSPEC_FUSE_WORKERS",),
    ),
    Case(
        "fuse-env-workers-huge",
        ("fuse", "{model}", "{adapters}", "-o", "{out}", "--quiet"),
        env={"ADAPTERSPEC_FUSE_WORKERS": str(2**70)},
        names=("ADAPTERSPEC_FUSE_WORKERS",),
        timeout=30,
    ),
    *(
        Case(
            f"{command}-env-{variable.lower().replace('_', '-')}-unknown",
            COMMANDS[command],
            env={variable: "fastest"},
            names=(variable, "fastest"),
        )
        for command in ("apply", "train")
        for variable in ("ADAPTERSPEC_LORA_PATH", "ADAPTERSPEC_PACK_SIBLINGS")
    ),
    Case(
        "fuse-env-hf-cache-is-file",
        ("fuse", "nobody/no-such-model", "{adapters}", "-o", "{out}", "--quiet"),
        (write("hfcache", "x"),),
        env={"HF_HUB_CACHE": "{ws}/hfcache", "HF_HOME": "{ws}/hfcache"},
        names=("nobody/no-such-model",),
    ),
    Case("plan-model-repo-id-not-cached", ("plan", "nobody/no-such-model", "{spec}"), names=("nobody/no-such-model",)),
    Case("plan-model-repo-id-dotdot", ("plan", "../..", "{spec}"), (), names=("../..",), exit=2),
    Case(
        "apply-model-repo-id-not-cached",
        ("apply", "nobody/no-such-model", "{spec}", "-o", "{out}"),
        names=("nobody/no-such-model",),
    ),
    Case("tree-selector-syntax-error", ("tree", "{model}", "layers[0"), exit=(1, 2), names=("layers[0",)),
    Case(
        "tree-selector-huge", ("tree", "{model}", "<" + ",".join(f"m{i}" for i in range(20000)) + ">"), exit=(0, 1, 2)
    ),
    Case(
        "explain-selector-syntax-error",
        ("explain", "{spec}", "{model}", "layers[**"),
        exit=(1, 2),
        names=("layers[**",),
    ),
    Case("lint-option-format-xml", ("lint", "{spec}", "--format", "xml"), names=("--format",)),
    Case("lint-stdin-binary", ("lint", "-"), exit=1, names=("AS100",), stdin=bytes(range(256)) * 16),
    Case(
        "lint-spec-200-missing-files",
        ("lint", *(f"{{ws}}/missing{i}.aspec" for i in range(200))),
        names=("missing0.aspec",),
    ),
    Case("lint-model-is-a-spec-file", ("lint", "{spec}", "--model", "{spec}"), names=("{spec}",)),
    Case("plan-args-swapped", ("plan", "{spec}", "{model}"), names=("{spec}",)),
    Case("explain-args-swapped", ("explain", "{model}", "{spec}"), names=("{model}",)),
    Case("export-option-format-unknown", ("export", "onnx", "{model}", "{adapters}", "-o", "{out}"), names=("onnx",)),
    Case("import-option-format-unknown", ("import", "lora", "{peft}"), names=("lora",)),
    Case(
        "export-option-base-model-newline",
        ("export", "peft", "{model}", "{adapters}", "-o", "{out}", "--base-model", "a\nb"),
        exit=(0, 2),
    ),
    Case(
        "train-spec-errors",
        ("train", "{model}", "{spec}", "--data", "{data}", "-o", "{out}", *TRAIN_SHORT),
        (spec("adapterspec 1\nq_proj: lora(r=0)\n"),),
        exit=1,
        names=("{spec}",),
    ),
    Case(
        "train-checkpoint-broken",
        ("train", "{model}", "{spec}", "--data", "{data}", "-o", "{out}", *TRAIN_SHORT, "--resume"),
        (
            user_dir(
                "out",
                {
                    "checkpoints/0000001/trainer_state.json": "{broken",
                    "checkpoints/0000001/adapters.safetensors": "x",
                    "adapter_config.json": "{}",
                },
            ),
        ),
        names=("trainer_state.json",),
    ),
]


# ── building the list ───────────────────────────────────────────────────────


def _case(
    id: str,
    cmd: str,
    steps: tuple,
    names: tuple,
    exit: Any = 2,
    base: tuple = (),
    argv: tuple | None = None,
    **extra: Any,
) -> Case:
    extra.pop("model", None)
    return Case(
        id=id,
        argv=argv or COMMANDS[cmd],
        steps=tuple(steps),
        exit=extra.pop("exit", exit),
        names=names,
        base=base,
        **extra,
    )


def build_cases() -> list[Case]:
    cases: list[Case] = []
    for i, (what, steps, names, cmds, exit, extra) in enumerate(MODEL_BREAKS):
        for cmd in (CHEAP[i % len(CHEAP)], *cmds.split()):
            cases.append(_case(f"{cmd}-model-{what}", cmd, steps, names, exit, **extra))
    for i, (what, model_name, steps, names, cmds) in enumerate(OTHER_MODEL_BREAKS):
        adapter_name = {"tiny-llama-4bit": "4bit", "tiny-moe": "moe"}[model_name]
        for cmd in (CHEAP[i % len(CHEAP)], *cmds.split()):
            cases.append(
                _case(f"{cmd}-model-{what}", cmd, steps, names, 2, base=default_base(model_name, adapter_name))
            )
    for entry in ADAPTER_BREAKS:
        what, steps, names, cmds, extra = (*entry, {}) if len(entry) == 4 else entry
        for cmd in cmds.split():
            kind = "mlxconfig" if cmd == "importmlxlm" else "adapters"
            cases.append(_case(f"{cmd}-{kind}-{what}", cmd, steps, names, **extra))
    for entry in PEFT_BREAKS:
        what, steps, names, cmds, extra = (*entry, {}) if len(entry) == 4 else entry
        for cmd in cmds.split():
            cases.append(_case(f"{cmd}-peft-{what}", cmd, steps, names, **extra))
    for what, text, names, extra in MLXLM_BREAKS:
        argv = ("import", "mlx-lm", Y, "-o", "{outspec}") + (("--model", "{model}") if extra.get("model") else ())
        cases.append(
            _case(f"importmlxlm-mlxconfig-{what}", "importmlxlm", (write(YAML, text),), names, argv=argv, **extra)
        )
    for what, steps, path, names in MLXLM_PATH_CASES:
        timeout = FIFO_TIMEOUT if ("fifo" in what or "dev-zero" in what) else 60
        cases.append(
            _case(
                f"importmlxlm-mlxconfig-{what}",
                "importmlxlm",
                steps,
                names,
                argv=("import", "mlx-lm", path, "-o", "{outspec}"),
                timeout=timeout,
            )
        )
    for what, steps, names, cmds, exit, extra in SPEC_BREAKS:
        for cmd in cmds.split():
            label = "lint" if cmd == "speclint" else cmd
            cases.append(_case(f"{label}-spec-{what}", cmd, steps, names, exit, **extra))
    for entry in DATA_BREAKS:
        what, steps, names, extra = (*entry, {}) if len(entry) == 3 else entry
        cases.append(_case(f"train-data-{what}", "train", steps, names, **extra))
    for what, options, names, exit in TRAIN_OPTIONS:
        cases.append(_case(f"train-option-{what}", "train", (), names, exit, argv=COMMANDS["train"] + tuple(options)))
    for what, text, names in TRAIN_CONFIGS:
        cases.append(
            _case(
                f"train-trainconfig-{what}",
                "train",
                (write("train.yaml", text),),
                names,
                argv=COMMANDS["train"] + ("-c", "{ws}/train.yaml"),
            )
        )
    for cmd, what, argv, steps, names, exit in OUTPUT_CASES:
        cases.append(
            _case(f"{cmd}-output-{what}", cmd, steps, names, exit, argv=argv, root_skip=what == "out-parent-readonly")
        )
    cases.extend(EXTRA)
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"duplicate case ids: {sorted(duplicates)}"
    return cases


CASES = build_cases()
