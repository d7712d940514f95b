"""PEFT adapter tensors ↔ adapterspec adapter tensors (imports mlx).

PEFT keeps `lora_A.weight` (r, in) and `lora_B.weight` (out, r) per linear module, `lora_embedding_A`
(r, num) and `lora_embedding_B` (dims, r) per embedding, one module per expert, and DoRA magnitudes in
`lora_magnitude_vector`. adapterspec (like mlx-lm) keeps `lora_a` (in, r) and `lora_b` (r, out) for
linear and DoRA, `lora_a` (num, r) / `lora_b` (r, dims) for embeddings, `lora_a` (E, r, in) /
`lora_b` (E, out, r) for switch layers, and `m` for DoRA. The scale (alpha / r) lives in the plan.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import mlx.core as mx

from ..errors import UserError
from ..model.index import ModuleIndex
from ..model.kinds import EMBEDDING_KINDS, KINDS, LINEAR_KINDS, TOKEN_KINDS
from ..model.plan import Plan, PlanEntry
from .hf_names import expert_prefix, hf_expert_name, mlx_module
from .peft_config import PREFIX
from .peft_training import PEFT_SUFFIX, peft_token_key

FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(\.[A-Za-z0-9_-]+)?(\.weight)?$"
)


def _hf_key(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


class _Collected:
    def __init__(self):
        self.factors: dict[str, dict[Optional[int], dict[str, mx.array]]] = defaultdict(lambda: defaultdict(dict))
        self.full: dict[str, mx.array] = {}
        self.base_copies: dict[str, mx.array] = {}
        self.token_rows: dict[str, mx.array] = {}
        self.problems: list[str] = []


def _collect(tensors: dict[str, mx.array], plan: Plan, index: ModuleIndex) -> _Collected:
    entries = {e.path: e for e in plan.entries}
    full_paths = [e.path for e in plan.entries if e.adapter == "full"]
    out = _Collected()
    for key, value in tensors.items():
        hf = _hf_key(key)
        if re.search(r"\.lora_[AB](\.[A-Za-z0-9_-]+)?\.bias$", hf):
            out.problems.append(f"'{key}' is a LoRA bias (lora_bias), which adapterspec's LoRA has not")
            continue
        factor = FACTOR.match(hf)
        if peft_token_key(hf) is not None and peft_token_key(hf) in entries:
            out.token_rows[peft_token_key(hf)] = value
            continue
        if factor is None:
            if hf.endswith(".base_layer.weight"):
                out.base_copies[hf[: -len(".base_layer.weight")]] = value
            elif any(hf.startswith(path + ".") for path in full_paths):
                out.full[hf] = value
            else:
                out.problems.append(f"'{key}' belongs to no module the spec adapts or trains")
            continue
        located = mlx_module(factor["module"], index)
        if located is None or located[0] not in entries:
            out.problems.append(f"'{key}' belongs to no module the spec adapts")
            continue
        path, expert = located
        out.factors[path][expert][factor["part"]] = value
    return out


def peft_to_adapters(
    tensors: dict[str, mx.array],
    plan: Plan,
    index: ModuleIndex,
    expert_factors: Optional[dict[str, dict[int, float]]] = None,
) -> dict[str, mx.array]:
    """adapterspec adapter tensors (full paths, float32 factors) for PEFT's tensors on the plan's modules."""
    collected = _collect(tensors, plan, index)
    problems = collected.problems
    weights: dict[str, mx.array] = {}
    for entry in plan.entries:
        if entry.adapter == "full":
            continue
        if entry.adapter in TOKEN_KINDS:
            rows = collected.token_rows.get(entry.path)
            if rows is None or tuple(rows.shape) != (len(entry.rows), index[entry.path].output_dims):
                problems.append(
                    f"the PEFT adapter has no trainable_tokens_delta of {len(entry.rows)} rows for '{entry.path}'"
                )
            else:
                weights[f"{entry.path}.token_rows"] = rows.astype(mx.float32)
            continue
        parts = collected.factors.get(entry.path)
        if not parts:
            problems.append(f"the PEFT adapter has no weights for '{entry.path}'")
            continue
        try:
            weights.update(_convert(entry, parts, index, (expert_factors or {}).get(entry.path)))
        except ValueError as error:
            problems.append(str(error))
    weights.update(collected.full)
    if problems:
        raise UserError(
            "the PEFT weights do not fit the spec on this model: "
            + "; ".join(problems[:4])
            + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""),
            help="import the adapter with the base model it was trained on",
        )
    return weights


def _expect(array: mx.array, shape: tuple, what: str) -> mx.array:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array.astype(mx.float32)


def _convert(entry: PlanEntry, parts: dict, index: ModuleIndex, factors: Optional[dict[int, float]]) -> dict:
    info, r, path = index[entry.path], entry.r, entry.path
    if entry.adapter in LINEAR_KINDS:
        factor = parts.get(None, {})
        a = _expect(_need(factor, "lora_A", path), (r, info.input_dims), f"{path} lora_A")
        b = _expect(_need(factor, "lora_B", path), (info.output_dims, r), f"{path} lora_B")
        out = {f"{path}.lora_a": a.T, f"{path}.lora_b": b.T}
        if entry.adapter == "dora":
            out[f"{path}.m"] = _expect(
                _need(factor, "lora_magnitude_vector", path), (info.output_dims,), f"{path} magnitude"
            )
        return out
    if entry.adapter in EMBEDDING_KINDS:
        factor = parts.get(None, {})
        a = _expect(_need(factor, "lora_embedding_A", path), (r, info.input_dims), f"{path} lora_embedding_A")
        b = _expect(_need(factor, "lora_embedding_B", path), (info.output_dims, r), f"{path} lora_embedding_B")
        if entry.adapter == "dora-embedding":
            raise ValueError(f"{path}: PEFT's DoRA embedding normalises columns, adapterspec's normalises rows")
        return {f"{path}.lora_a": a.T, f"{path}.lora_b": b.T}
    if entry.adapter == "switch-lora":
        return _stack_experts(entry, parts, info, factors)
    raise ValueError(f"{path}: no PEFT form for the adapter kind {entry.adapter}")


def _need(factor: dict, part: str, path: str) -> mx.array:
    if part not in factor:
        raise ValueError(f"{path}: the PEFT adapter has no {part}")
    return factor[part]


def _stack_experts(entry: PlanEntry, parts: dict, info, factors: Optional[dict[int, float]]) -> dict:
    """Per-expert A (r_e, in) and B (out, r_e) stacked into (E, r, in) and (E, out, r); missing experts stay zero."""
    experts, r = info.num_experts, entry.r
    a = mx.zeros((experts, r, info.input_dims))
    b = mx.zeros((experts, info.output_dims, r))
    for expert, factor in parts.items():
        if expert is None:
            raise ValueError(f"{entry.path}: PEFT weights for a whole switch layer, expected one module per expert")
        a_e, b_e = _need(factor, "lora_A", entry.path), _need(factor, "lora_B", entry.path)
        rank = a_e.shape[0]
        if rank > r:
            raise ValueError(f"{entry.path}: expert {expert} has rank {rank}, the plan has {r}")
        a_e = _expect(a_e, (rank, info.input_dims), f"{entry.path} expert {expert} lora_A")
        b_e = _expect(b_e, (info.output_dims, rank), f"{entry.path} expert {expert} lora_B")
        scale = (factors or {}).get(expert, 1.0)
        a[expert, :rank, :] = a_e
        b[expert, :, :rank] = b_e * scale
    return {f"{entry.path}.lora_a": a, f"{entry.path}.lora_b": b}


# ── adapterspec → PEFT ──────────────────────────────────────────────────────


def hf_names_of(entry_path: str, index: ModuleIndex) -> list[str]:
    """The Hugging Face module names of one MLX module (one per expert for a switch layer)."""
    info = index[entry_path]
    if info.family != "switch":
        return [entry_path]
    prefix, name = expert_prefix(info), hf_expert_name(info.name, index.model_type)
    return [f"{prefix}.{e}.{name}" for e in range(info.num_experts or 0)]


def check_adapter_tensors(weights: dict[str, mx.array], plan: Plan, index: ModuleIndex, file) -> None:
    """Refuse adapter tensors PEFT could not load exactly: missing, of the wrong shape (a transposed factor, another
    rank), or belonging to no module of the plan."""
    expected: dict[str, tuple] = {}
    full_paths = [e.path for e in plan.entries if e.adapter == "full"]
    for entry in plan.entries:
        if entry.adapter == "full":
            continue
        info = index[entry.path]
        inner = len(entry.rows) if entry.rows is not None else entry.r
        shapes = KINDS[entry.adapter].shapes(info.input_dims, info.output_dims, inner, info.num_experts)
        expected.update({f"{entry.path}.{param}": tuple(shape) for param, shape in shapes.items()})
    problems = []
    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"'{name}' is missing")
        elif tuple(weights[name].shape) != shape:
            problems.append(f"'{name}' has shape {tuple(weights[name].shape)}, the plan needs {shape}")
        elif not mx.issubdtype(weights[name].dtype, mx.floating):
            problems.append(f"'{name}' is {weights[name].dtype}, not a floating-point tensor")
    for name in sorted(set(weights) - set(expected)):
        if not any(name.startswith(path + ".") for path in full_paths):
            problems.append(f"'{name}' belongs to no module the plan adapts")
    if problems:
        raise UserError(
            f"{file} does not fit the adapter plan on this model: " + "; ".join(problems[:3]),
            help="export the adapters with the model they were trained for",
        )


def adapters_to_peft(weights: dict[str, mx.array], plan: Plan, index: ModuleIndex) -> dict[str, mx.array]:
    """PEFT tensors (`base_model.model.` keys) for an adapterspec adapter file on the plan's modules."""
    out: dict[str, mx.array] = {}
    for entry in plan.entries:
        path = entry.path
        if entry.adapter == "full":
            for key, value in weights.items():
                if key.startswith(path + ".") and "." not in key[len(path) + 1 :]:
                    out.update(_full_to_peft(path, key[len(path) + 1 :], value, index))
            continue
        if entry.adapter in TOKEN_KINDS:
            out[f"{PREFIX}{path}{PEFT_SUFFIX}"] = weights[f"{path}.token_rows"]
            continue
        a, b = weights[f"{path}.lora_a"], weights[f"{path}.lora_b"]
        if entry.adapter in LINEAR_KINDS:
            out[f"{PREFIX}{path}.lora_A.weight"] = a.T
            out[f"{PREFIX}{path}.lora_B.weight"] = b.T
            if entry.adapter == "dora":
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = weights[f"{path}.m"]
        elif entry.adapter == "embedding-lora":
            out[f"{PREFIX}{path}.lora_embedding_A"] = a.T
            out[f"{PREFIX}{path}.lora_embedding_B"] = b.T
        elif entry.adapter == "switch-lora":
            for expert, name in enumerate(hf_names_of(path, index)):
                out[f"{PREFIX}{name}.lora_A.weight"] = a[expert]
                out[f"{PREFIX}{name}.lora_B.weight"] = b[expert]
        else:
            raise UserError(
                f"'{path}' has a {entry.adapter} adapter, which PEFT has no equivalent for",
                help="PEFT's DoRA embedding normalises columns, adapterspec's rows",
            )
    return {k: mx.contiguous(v) for k, v in out.items()}


def _full_to_peft(path: str, param: str, value: mx.array, index: ModuleIndex) -> dict[str, mx.array]:
    if index[path].family != "switch":
        return {f"{PREFIX}{path}.{param}": value}
    return {f"{PREFIX}{name}.{param}": value[e] for e, name in enumerate(hf_names_of(path, index))}
