"""Hugging Face mixture-of-experts checkpoints seen as mlx-lm's sanitize loads them: experts stacked. Pure Python.

mlx-lm loads a Hugging Face MoE directory as it is, and its `Model.sanitize` stacks the per-expert
Linear weights (`model.layers.0.mlp.experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`)
into one SwitchLinear weight (`mlp.switch_mlp.gate_proj.weight`, shape (experts, out, in)). The tables here say
what each model type's sanitize does to the module tree, read off mlx-lm's code (tests/model/test_hf_moe.py
holds them to it): `EXPERT_STACKING` (where the experts live, how their projections are renamed, which
parameters are stacked, the config key of their number, whether a tied `lm_head` is dropped),
`FUSED_EXPERT_SPLITS` (transformers 5's fused `experts.gate_up_proj` split in halves) and `SANITIZE_DROPS`.
`sanitized_tensors` applies them to a directory's headers, so every command that reads the directory sees the
module tree the live model has; each stacked tensor's `parts` say where its experts' bytes are, for the fuse.

Expert layouts mlx-lm's sanitize for the model type does not read (fused experts where it stacks per-expert
ones, experts missing or counted differently from config.json) are refused with a UserError: mlx-lm would
fail on them too. Fused experts of other model types, which mlx-lm splits with more changes than these
tables know, are refused with the advice to convert the model first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Optional

from ..errors import UserError
from .config import mlx_lm_model_source
from .safetensors import TensorInfo

W123 = MappingProxyType({"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"})
GATE_UP_DOWN = MappingProxyType({"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})
STACKED_PARAMS = ("weight", "scales", "biases")
CONVERT_HELP = "convert the model with `mlx_lm.convert` (or use a checkpoint in the per-expert layout)"


@dataclass(frozen=True)
class ExpertStacking:
    """How mlx-lm's sanitize stacks one model type's experts: `{block}.{container}.experts.{e}.{hf}.{param}` →
    `{block}.{container}.{switch}.{renames[hf]}.{param}` for every param of `params`, experts 0..count-1."""

    container: str
    count_key: str
    renames: Mapping[str, str] = field(default_factory=lambda: GATE_UP_DOWN)
    switch: str = "switch_mlp"
    params: tuple[str, ...] = STACKED_PARAMS
    drops_tied_head: bool = False


# model type → its stacking, as the `sanitize` of mlx-lm's model module does it
EXPERT_STACKING: Mapping[str, ExpertStacking] = MappingProxyType(
    {
        "mixtral": ExpertStacking("block_sparse_moe", "num_local_experts", W123, drops_tied_head=True),
        "phimoe": ExpertStacking("block_sparse_moe", "num_local_experts", W123),
        "minimax": ExpertStacking("block_sparse_moe", "num_local_experts", W123, params=("weight",)),
        "qwen2_moe": ExpertStacking("mlp", "num_experts"),
        "qwen3_moe": ExpertStacking("mlp", "num_experts", params=("weight",), drops_tied_head=True),
        "olmoe": ExpertStacking("mlp", "num_experts"),
        "hunyuan": ExpertStacking("mlp", "num_experts"),
        "deepseek": ExpertStacking("mlp", "n_routed_experts"),
        "deepseek_v2": ExpertStacking("mlp", "n_routed_experts"),
        "glm4_moe": ExpertStacking("mlp", "n_routed_experts"),
        "mellum": ExpertStacking("mlp", "num_experts", params=("weight",), drops_tied_head=True),
        "Klear": ExpertStacking("mlp", "num_experts", switch="experts", params=("weight",)),
        "ernie4_5_moe": ExpertStacking("mlp", "moe_num_experts", params=("weight",)),
        "dots1": ExpertStacking("mlp", "n_routed_experts", switch="experts", drops_tied_head=True),
        "afmoe": ExpertStacking("mlp", "num_experts", switch="experts", drops_tied_head=True),
    }
)


@dataclass(frozen=True)
class FusedExperts:
    """transformers 5's fused experts as mlx-lm's sanitize splits them: `{owner}.experts.gate_up_proj` (E, 2·I, H)
    into gate (each expert's first I rows) and up (its last I rows), `{owner}.experts.down_proj` (E, H, I) renamed;
    the SwitchLinears go under `{owner}.{switch}`."""

    switch: str


# model type → its split of fused experts, where mlx-lm's sanitize reads that layout (and no other sanitize effect
# of the type changes the module tree beyond what SANITIZE_DROPS says)
FUSED_EXPERT_SPLITS: Mapping[str, FusedExperts] = MappingProxyType({"gemma4_text": FusedExperts("experts.switch_glu")})
PER_EXPERT = re.compile(r"^(?P<owner>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.(?P<param>[^.]+)$")
# what a sanitize method that stacks per-expert tensors says in mlx-lm's source
MLX_LM_STACKS = re.compile(r"experts\.\{e\}|experts\.0\.")
# transformers 5's fused experts: `mlp.experts.gate_up_proj` (E, 2·I, H) and `mlp.experts.down_proj` (E, H, I)
FUSED_EXPERTS = re.compile(
    r"^(?P<owner>.+)\.experts\.(?P<name>gate_up_proj|down_proj)(?P<suffix>_bias|_blocks|_scales)?$"
)


def _gemma4_text_drops(name: str, config: dict) -> bool:
    """gemma4_text's sanitize: rotary and clipping buffers go, and the KV-shared layers' k/v projections and k_norm."""
    if any(s in name for s in ("self_attn.rotary_emb", "input_max", "input_min", "output_max", "output_min")):
        return True
    after = name.split("layers.", 1)[1].split(".", 1)[0] if "layers." in name else ""
    if (
        not any(s in name for s in (".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.k_norm"))
        or not after.isdigit()
    ):
        return False
    layers, shared = config.get("num_hidden_layers"), config.get("num_kv_shared_layers", 20)  # mlx-lm's default
    return isinstance(layers, int) and isinstance(shared, int) and int(after) >= layers - shared


def _glm4_moe_drops(name: str, config: dict) -> bool:
    """glm4_moe's sanitize: the multi-token-prediction layer after the last block goes (matched as it matches it)."""
    layers = config.get("num_hidden_layers")
    return isinstance(layers, int) and name.startswith(f"model.layers.{layers}")


# model type → which stored tensors its sanitize removes (beyond a tied lm_head, which ExpertStacking says)
SANITIZE_DROPS: Mapping[str, Callable[[str, dict], bool]] = MappingProxyType(
    {"gemma4_text": _gemma4_text_drops, "glm4_moe": _glm4_moe_drops}
)


@dataclass(frozen=True)
class Part:
    """`length` bytes of a stored tensor's data from byte `start`: one expert of a stacked tensor."""

    tensor: str
    start: int
    length: int


@dataclass(frozen=True)
class StackedTensor:
    """A tensor mlx-lm's sanitize makes of experts stored apart (or fused): its name, one part per expert, its header."""

    name: str
    parts: tuple[Part, ...]
    info: TensorInfo


@dataclass
class SanitizedTensors:
    """A directory's tensors as mlx-lm's sanitize leaves them: `tensors` by name (stacked ones included),
    `stacked` (what each stacked tensor is made of), `dropped` (tensors sanitize removes)."""

    tensors: dict[str, TensorInfo]
    stacked: dict[str, StackedTensor] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()

    def source_of(self, name: str) -> str:
        """The stored tensor a sanitized tensor's file position comes from (a stacked tensor's first expert)."""
        stacked = self.stacked.get(name)
        return stacked.parts[0].tensor if stacked else name


def expert_stacking(model_type: Optional[str]) -> Optional[ExpertStacking]:
    return EXPERT_STACKING.get(model_type or "")


def expert_renames(model_type: Optional[str]) -> Mapping[str, str]:
    """Hugging Face expert projection name → the SwitchLinear's name in mlx-lm, for this model type."""
    stacking = expert_stacking(model_type)
    return {hf: mlx for hf, mlx in stacking.renames.items() if hf != mlx} if stacking else {}


def switch_containers() -> frozenset[str]:
    """The names mlx-lm gives the module holding a mixture's stacked SwitchLinears."""
    return frozenset(s.switch for s in EXPERT_STACKING.values())


def sanitized_tensors(tensors: Mapping[str, TensorInfo], config: dict, where: str = "") -> SanitizedTensors:
    """The tensors of a model directory as mlx-lm's sanitize leaves them for its model type (config.json's).

    Raises UserError for an expert layout mlx-lm's sanitize does not read."""
    model_type = config.get("model_type")
    prefix = f"{where}: " if where else ""
    drops = SANITIZE_DROPS.get(model_type or "")
    dropped = tuple(name for name in tensors if drops(name, config)) if drops else ()
    kept = {name: info for name, info in tensors.items() if name not in dropped} if dropped else dict(tensors)
    split = FUSED_EXPERT_SPLITS.get(model_type or "")
    if split is not None:
        result = _split_fused(kept, split, prefix)
    else:
        _refuse_fused(kept, model_type, prefix)
        result = _stack_experts(kept, config, prefix)
    result.dropped += dropped
    return result


def _refuse_fused(tensors: Mapping[str, TensorInfo], model_type: Optional[str], prefix: str) -> None:
    fused = min((name for name in tensors if FUSED_EXPERTS.match(name)), key=_natural, default=None)
    if fused is None:
        return
    if expert_stacking(model_type) is not None:
        reads = (
            f"mlx-lm's {model_type} does not read (its sanitize stacks per-expert tensors only); "
            "mlx_lm.load would fail on this directory too"
        )
        help = (
            "use the per-expert checkpoint as the model's Hugging Face repo stores it "
            "(`mlx_lm.convert` of that writes mlx-lm's stacked layout)"
        )
    else:
        reads, help = "adapterspec does not read yet for this model type", CONVERT_HELP
    raise UserError(f"{prefix}'{fused}' is transformers' fused expert layout, which {reads}", help=help)


def _split_fused(tensors: Mapping[str, TensorInfo], split: FusedExperts, prefix: str) -> SanitizedTensors:
    """gate_up_proj split in two halves of each expert's rows, down_proj renamed, as parts of the stored tensors."""
    out = dict(tensors)
    stacked: dict[str, StackedTensor] = {}
    for name, info in tensors.items():
        match = FUSED_EXPERTS.match(name)
        if match is None:
            continue
        if match["suffix"] or len(info.shape) != 3 or (match["name"] == "gate_up_proj" and info.shape[1] % 2):
            raise UserError(
                f"{prefix}'{name}' ({info.dtype} {list(info.shape)}) is a fused expert tensor adapterspec does not "
                "read: it splits unquantized (experts, 2·intermediate, hidden) gate_up_proj and down_proj tensors",
                help=CONVERT_HELP,
            )
        experts = info.shape[0]
        per_expert = (info.offsets[1] - info.offsets[0]) // max(experts, 1)
        owner = f"{match['owner']}.{split.switch}"
        if match["name"] == "down_proj":
            halves = {"down_proj": (0, per_expert, info.shape[1:])}
        else:
            rows = info.shape[1] // 2
            shape = (rows, info.shape[2])
            halves = {"gate_proj": (0, per_expert // 2, shape), "up_proj": (per_expert // 2, per_expert // 2, shape)}
        for proj, (start, length, shape) in halves.items():
            target = f"{owner}.{proj}.weight"
            parts = tuple(Part(name, e * per_expert + start, length) for e in range(experts))
            stacked[target] = StackedTensor(
                target, parts, TensorInfo(info.dtype, (experts,) + tuple(shape), (0, length * experts))
            )
            out[target] = stacked[target].info
        del out[name]
    return SanitizedTensors(out, stacked)


def _stack_experts(tensors: Mapping[str, TensorInfo], config: dict, prefix: str) -> SanitizedTensors:
    """Per-expert tensors stacked as the model type's ExpertStacking says; the tied head dropped where it drops it."""
    model_type = config.get("model_type")
    stacking = expert_stacking(model_type)
    if stacking is None:
        _refuse_unknown_stacking(tensors, model_type, prefix)
        return SanitizedTensors(dict(tensors))
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for name in tensors:
        match = PER_EXPERT.match(name)
        if match is None or match["param"] not in stacking.params:
            continue
        owner, proj = match["owner"], match["proj"]
        if not owner.endswith("." + stacking.container) or proj not in stacking.renames:
            continue
        groups.setdefault((owner, proj, match["param"]), {})[int(match["expert"])] = name
    if not groups:
        return _drop_tied_head(SanitizedTensors(dict(tensors)), stacking, config)
    count = config.get(stacking.count_key)
    if not isinstance(count, int) or isinstance(count, bool):
        raise UserError(
            f"{prefix}the weights hold per-expert tensors but config.json has no '{stacking.count_key}', "
            f"which mlx-lm's {model_type} stacks them by",
            help="add the number of experts to config.json, or convert the model with `mlx_lm.convert`",
        )
    out = dict(tensors)
    stacked: dict[str, StackedTensor] = {}
    for (owner, proj, param), experts in sorted(groups.items()):
        names = _expert_parts(owner, proj, param, experts, count, tensors, stacking, prefix)
        name = f"{owner}.{stacking.switch}.{stacking.renames[proj]}.{param}"
        parts = tuple(Part(n, 0, tensors[n].offsets[1] - tensors[n].offsets[0]) for n in names)
        first = tensors[names[0]]
        info = TensorInfo(first.dtype, (count,) + first.shape, (0, sum(p.length for p in parts)))
        stacked[name] = StackedTensor(name, parts, info)
        for part in names:
            del out[part]
        out[name] = info
    return _drop_tied_head(SanitizedTensors(out, stacked), stacking, config)


def _refuse_unknown_stacking(tensors: Mapping[str, TensorInfo], model_type: Optional[str], prefix: str) -> None:
    """Per-expert tensors of a model type whose mlx-lm sanitize stacks them by a rule the table does not hold."""
    expert = min((name for name in tensors if PER_EXPERT.match(name)), key=_natural, default=None)
    if expert is None or not isinstance(model_type, str):
        return
    source = mlx_lm_model_source(model_type)
    if source is not None and MLX_LM_STACKS.search(source):
        raise UserError(
            f"{prefix}'{expert}' is a per-expert tensor, which mlx-lm's {model_type} stacks when it loads the model "
            "by a rule adapterspec does not know yet: the module tree would not be the one mlx-lm builds",
            help="convert the model with `mlx_lm.convert`, which writes the stacked layout",
        )


def _expert_parts(
    owner, proj, param, experts: dict[int, str], count: int, tensors, stacking, prefix
) -> tuple[str, ...]:
    """The names of experts 0..count-1 of one projection, checked to be all there, alike, and no more."""
    first_name = f"{owner}.experts.{{e}}.{proj}.{param}"
    missing = [e for e in range(count) if e not in experts]
    extra = sorted(e for e in experts if e >= count)
    if missing or extra:
        what = (
            f"'{first_name.format(e=missing[0])}' is missing"
            if missing
            else f"'{first_name.format(e=extra[0])}' is beyond the {count} experts of '{stacking.count_key}'"
        )
        raise UserError(
            f"{prefix}{what}: mlx-lm stacks experts 0 to {count - 1} of every mixture",
            help="the checkpoint is incomplete or config.json does not belong to it; download or convert it again",
        )
    parts = tuple(experts[e] for e in range(count))
    shape, dtype = tensors[parts[0]].shape, tensors[parts[0]].dtype
    for part in parts[1:]:
        if (tensors[part].shape, tensors[part].dtype) != (shape, dtype):
            raise UserError(
                f"{prefix}'{part}' is {tensors[part].dtype} {list(tensors[part].shape)} but '{parts[0]}' is "
                f"{dtype} {list(shape)}: experts stacked into one tensor must be alike",
                help="the checkpoint is damaged; download or convert it again",
            )
    return parts


def _natural(name: str) -> list[tuple[int, int, str]]:
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in name.split(".")]


def _drop_tied_head(result: SanitizedTensors, stacking: ExpertStacking, config: dict) -> SanitizedTensors:
    if stacking.drops_tied_head and config.get("tie_word_embeddings") and "lm_head.weight" in result.tensors:
        del result.tensors["lm_head.weight"]
        result.dropped += ("lm_head.weight",)
    return result
