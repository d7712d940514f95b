"""PEFT adapter tensors ↔ adapterspec adapter tensors (imports mlx).

PEFT keeps `lora_A.weight` (r, in) and `lora_B.weight` (out, r) per linear module, `lora_embedding_A`
(r, num) and `lora_embedding_B` (dims, r) per embedding, one module per expert, and DoRA magnitudes in
`lora_magnitude_vector`. adapterspec (like mlx-lm) keeps `lora_a` (in, r) and `lora_b` (r, out) for
linear and DoRA, `lora_a` (num, r) / `lora_b` (r, dims) for embeddings, `lora_a` (E, r, in) /
`lora_b` (E, out, r) for switch layers, and `m` for DoRA. The scale (alpha / r) lives in the plan.
"""

from __future__ import annotations

import io
import re
from array import array
from collections import defaultdict
from typing import Optional, Sequence

import mlx.core as mx

from ..errors import UserError
from ..model.index import ModuleIndex
from ..model.kinds import EMBEDDING_KINDS, KINDS, LINEAR_KINDS, TOKEN_KINDS
from ..model.plan import Plan, PlanEntry
from .fused_experts import FusedParam, RouterParam, fused_params, nesting_keys, router_params
from .hf_names import expert_prefix, hf_expert_name, mlx_module
from .peft_config import PREFIX
from .peft_training import PEFT_SUFFIX, peft_token_key

FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(\.[A-Za-z0-9_-]+)?(\.weight)?$"
)


def read_peft_weights(file) -> dict[str, mx.array]:
    """The tensors of a PEFT adapter_model.safetensors, float64 ones as float32 (mlx reads no float64), each finite."""
    from ..adapters.weights import UNREADABLE_HELP, check_finite, read_weights
    from ..model.safetensors import read_safetensors_header

    header = read_safetensors_header(file)
    if not any(info.dtype == "F64" for info in header.values()):
        return read_weights(file)
    try:
        weights = mx.load(io.BytesIO(_float64_as_float32(file, header)), format="safetensors")
    except (RuntimeError, ValueError) as error:
        raise UserError(f"{file}: not a readable safetensors file ({error})", help=UNREADABLE_HELP) from None
    check_finite(weights, file)
    return weights


def _float64_as_float32(file, header: dict) -> bytes:
    """The safetensors file's bytes with every F64 tensor rewritten as F32 (the others copied as they are)."""
    from ..model.safetensors import encode_header

    with open(file, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start)
        data = f.read()
    entries, payload = [], []
    for name, info in sorted(header.items(), key=lambda item: item[1].offsets):
        raw = data[info.offsets[0] : info.offsets[1]]
        if info.dtype == "F64":
            raw = array("f", array("d", raw)).tobytes()
        entries.append((name, "float32" if info.dtype == "F64" else info.dtype_name, info.shape))
        payload.append(raw)
    return encode_header(entries, {}) + b"".join(payload)


def _hf_key(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


class _Collected:
    def __init__(self):
        self.factors: dict[str, dict[Optional[int], dict[str, mx.array]]] = defaultdict(lambda: defaultdict(dict))
        self.full: dict[str, mx.array] = {}
        self.base_copies: dict[str, mx.array] = {}
        self.token_rows: dict[str, mx.array] = {}
        self.problems: list[str] = []
        self.fused: dict[str, dict[str, mx.array]] = defaultdict(dict)
        self.head_copies: dict[str, mx.array] = {}


def _collect(
    tensors: dict[str, mx.array], plan: Plan, index: ModuleIndex, fused_containers: set, tied_head: Optional[str]
) -> _Collected:
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
        if factor["module"] == "lm_head" and tied_head:
            out.head_copies[factor["part"]] = value
            continue
        if factor["module"].split(".base_layer")[0] in fused_containers:
            out.fused[factor["module"]][factor["part"]] = value
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
    fused: Sequence[FusedParam] = (),
    tied_head: Optional[str] = None,
    routers: Sequence[RouterParam] = (),
) -> dict[str, mx.array]:
    """adapterspec adapter tensors (full paths, float32 factors) for PEFT's tensors on the plan's modules. With
    `tied_head` (ensure_weight_tying), the output head's saved factors must be the embedding's, transposed."""
    collected = _collect(tensors, plan, index, {p.container for p in [*fused, *routers]}, tied_head)
    problems = collected.problems
    if tied_head:
        problems += _head_copy_problems(collected, tied_head)
    weights: dict[str, mx.array] = {}
    try:
        weights.update(_from_fused(collected.fused, fused, routers))
    except ValueError as error:
        problems.append(str(error))
    fused_paths = {path for param in fused for path in param.mlx_paths} | {r.mlx_path for r in routers}
    for entry in plan.entries:
        if entry.adapter == "full" or entry.path in fused_paths:
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


def _head_copy_problems(collected: _Collected, embedding: str) -> list[str]:
    """The tied head's copy of the embedding LoRA (PEFT saves lora_A = Bᵀ, lora_B = Aᵀ) must be that LoRA."""
    own = collected.factors.get(embedding, {}).get(None, {})
    pairs = (("lora_A", "lora_embedding_B"), ("lora_B", "lora_embedding_A"))
    for head_part, own_part in pairs:
        copy, source = collected.head_copies.get(head_part), own.get(own_part)
        if copy is None or source is None:
            continue
        if copy.shape != source.T.shape or not mx.array_equal(copy, source.T).item():
            return [f"the tied output head's {head_part} is not the transposed {own_part} of '{embedding}'"]
    return []


def _from_fused(
    factors: dict[str, dict[str, mx.array]], fused: Sequence[FusedParam], routers: Sequence[RouterParam] = ()
) -> dict[str, mx.array]:
    """switch-LoRA factors from PEFT's ParamWrapper factors (see fused_experts): A (E·r, in) → (E, r, in),
    B (out, r·E) → (E, out, r), gate_up's B split by rows into gate_proj and up_proj (which share A); a router's
    2-D ParamWrapper is a plain LoRA."""
    out: dict[str, mx.array] = {}
    for router in routers:
        factor = factors.get(router.container, {})
        a, b = _need(factor, "lora_A", router.key), _need(factor, "lora_B", router.key)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{router.key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit")
        out[f"{router.mlx_path}.lora_a"] = a.astype(mx.float32).T
        out[f"{router.mlx_path}.lora_b"] = b.astype(mx.float32).T
    by_container: dict[str, list[FusedParam]] = defaultdict(list)
    for param in fused:
        by_container[param.container].append(param)
    used = {router.container for router in routers}
    for container, params in by_container.items():
        keys = nesting_keys(container, [p.name for p in params])
        for param in params:
            key = keys[param.name]
            used.add(key)
            factor = factors.get(key, {})
            a, b = _need(factor, "lora_A", param.key), _need(factor, "lora_B", param.key)
            experts, total = param.experts, sum(param.output_dims)
            if a.ndim != 2 or a.shape[0] % experts or a.shape[1] != param.input_dims:
                raise ValueError(f"{param.key} lora_A has shape {tuple(a.shape)}, expected (E·r, {param.input_dims})")
            r = a.shape[0] // experts
            b = _expect(b, (total, r * experts), f"{param.key} lora_B")
            a_stacked = a.astype(mx.float32).reshape(experts, r, param.input_dims)
            b_stacked = b.reshape(total, r, experts).transpose(2, 0, 1)
            start = 0
            for path, rows in zip(param.mlx_paths, param.output_dims):
                out[f"{path}.lora_a"] = a_stacked
                out[f"{path}.lora_b"] = b_stacked[:, start : start + rows, :]
                start += rows
    extra = sorted(set(factors) - used)
    if extra:
        raise ValueError(f"'{PREFIX}{extra[0]}' has factors for a parameter the config does not target")
    return out


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


def adapters_to_peft(
    weights: dict[str, mx.array], plan: Plan, index: ModuleIndex, layout: str = "per-expert"
) -> dict[str, mx.array]:
    """PEFT tensors (`base_model.model.` keys) for an adapterspec adapter file on the plan's modules; with the
    `target-parameters` layout, the switch modules go through fused_to_peft instead."""
    out: dict[str, mx.array] = {}
    for entry in plan.entries:
        path = entry.path
        if layout == "target-parameters" and index[path].family == "switch":
            continue
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
    if index[path].family == "embedding" and index.tied_embeddings and "lm_head" not in index:
        # PEFT (ensure_weight_tying) saves the tied head's copy of a trained embedding too, and reads it back
        return {f"{PREFIX}{path}.{param}": value, f"{PREFIX}lm_head.{param}": value}
    if index[path].family != "switch":
        return {f"{PREFIX}{path}.{param}": value}
    return {f"{PREFIX}{name}.{param}": value[e] for e, name in enumerate(hf_names_of(path, index))}


def fused_to_peft(
    weights: dict[str, mx.array], plan: Plan, index: ModuleIndex
) -> tuple[dict[str, mx.array], dict[str, tuple[int, float]]]:
    """PEFT ParamWrapper tensors for the plan's switch-LoRA on transformers 5's fused experts, and each targeted
    parameter's (r, scale). gate_proj and up_proj become one `gate_up_proj` LoRA: of their rank when they share A and
    the scale, else of the sum of their ranks, A stacked and B block-diagonal (each B rescaled to the common scale)."""
    entries = {e.path: e for e in plan.entries}
    tensors: dict[str, mx.array] = {}
    ranks: dict[str, tuple[int, float]] = {}
    adapted: dict[str, list[FusedParam]] = defaultdict(list)
    for param in fused_params(index):
        if any(path in entries for path in param.mlx_paths):
            adapted[param.container].append(param)
    for container, params in adapted.items():
        keys = nesting_keys(container, [p.name for p in params])
        for param in params:
            a, b, scale = _fused_factors(param, entries, weights)
            experts, r = a.shape[0], a.shape[1]
            tensors[f"{PREFIX}{keys[param.name]}.lora_A.weight"] = a.reshape(experts * r, param.input_dims)
            tensors[f"{PREFIX}{keys[param.name]}.lora_B.weight"] = b.transpose(1, 2, 0).reshape(-1, r * experts)
            ranks[param.key] = (r, scale)
    for router in router_params(index):
        entry = entries.get(router.mlx_path)
        if entry is None:
            continue
        tensors[f"{PREFIX}{router.container}.lora_A.weight"] = weights[f"{entry.path}.lora_a"].T
        tensors[f"{PREFIX}{router.container}.lora_B.weight"] = weights[f"{entry.path}.lora_b"].T
        ranks[router.key] = (entry.r, float(entry.scale))
    return {k: mx.contiguous(v) for k, v in tensors.items()}, ranks


def _fused_factors(param: FusedParam, entries: dict, weights: dict) -> tuple[mx.array, mx.array, float]:
    """(A (E, R, in), B (E, out, R), scale) of one fused parameter from the switch-LoRA of its MLX parts."""
    parts = []
    for path, rows in zip(param.mlx_paths, param.output_dims):
        entry = entries.get(path)
        if entry is None:
            parts.append((None, None, None, rows))
            continue
        if entry.adapter != "switch-lora":
            raise UserError(
                f"'{path}' has a {entry.adapter} adapter; transformers 5 keeps these experts as the fused parameter "
                f"'{param.key}', which PEFT adapts only with LoRA (target_parameters)",
                help="export with --peft-layout per-expert for transformers 4, or use switch-lora on the experts",
            )
        a = weights[f"{path}.lora_a"].astype(mx.float32)
        b = weights[f"{path}.lora_b"].astype(mx.float32)
        parts.append((a, b, float(entry.scale), rows))
    present = [p for p in parts if p[0] is not None]
    scale = present[0][2]
    first_a = present[0][0]
    shared = len(present) == len(parts) and all(
        p[2] == scale and p[0].shape == first_a.shape and mx.array_equal(p[0], first_a).item() for p in present
    )
    if shared:
        return first_a, mx.concatenate([p[1] for p in parts], axis=1), scale
    experts = first_a.shape[0]
    total_r = sum(p[0].shape[1] for p in present)
    a_rows, b_blocks, offset = [], [], 0
    for a, b, s, rows in parts:
        block = mx.zeros((experts, rows, total_r))
        if a is not None:
            r = a.shape[1]
            a_rows.append(a)
            block[:, :, offset : offset + r] = b * (s / scale)
            offset += r
        b_blocks.append(block)
    return mx.concatenate(a_rows, axis=1), mx.concatenate(b_blocks, axis=1), scale
