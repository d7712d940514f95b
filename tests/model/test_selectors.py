"""Selectors against real mlx-lm module trees: every form of the language, anchoring, order, list positions."""

from __future__ import annotations

import re

import mlx.nn as nn
import models as tiny
import pytest

from adapterspec.language.lint import parse_spec
from adapterspec.model.index import ModuleIndex
from adapterspec.model.selectors import SelectorMatcher

LLAMA_BLOCKS = 12
LANGUAGE_BLOCKS, VISION_BLOCKS = 4, 2


class TwoTowers(nn.Module):
    """A language model and a vision tower side by side, each with its own `layers` list."""

    def __init__(self):
        super().__init__()
        self.language_model = tiny.build("llama", num_hidden_layers=LANGUAGE_BLOCKS)[0]
        self.vision_tower = tiny.build("llama", num_hidden_layers=VISION_BLOCKS, seed=1)[0].model


@pytest.fixture(scope="module")
def llama():
    return ModuleIndex.from_module(tiny.build("llama", num_hidden_layers=LLAMA_BLOCKS)[0])


@pytest.fixture(scope="module")
def moe():
    return ModuleIndex.from_module(tiny.build("qwen2_moe")[0])


@pytest.fixture(scope="module")
def towers():
    return ModuleIndex.from_module(TwoTowers())


def selector(text: str):
    return parse_spec(f"{text}: none\n").rules[0].selector


def match(index: ModuleIndex, text: str) -> list[str]:
    return SelectorMatcher(selector(text)).match(index).paths


def ending(index: ModuleIndex, *names: str) -> list[str]:
    """Every path whose last segment is one of `names`, in the index's (natural) order."""
    return [p for p in index.modules if p.rsplit(".", 1)[-1] in names]


def blocks(*numbers: int, prefix: str = "model.layers") -> list[str]:
    return [f"{prefix}.{n}" for n in numbers]


# ── a reference matcher: selectors read as plain text, tried at every start position ──────────

SEGMENT = re.compile(r"^(?P<name>[^\[]+)(?:\[(?P<index>[^\]]*)\])?$")


def _name_regex(name: str) -> re.Pattern:
    out = ""
    for token in re.finditer(r"<([^>]*)>|\*|[^<*]+", name):
        text = token.group(0)
        if text == "*":
            out += "[^.]*"
        elif text.startswith("<"):
            out += "(?:" + "|".join(re.escape(o) for o in token.group(1).split(",")) + ")"
        else:
            out += re.escape(text)
    return re.compile(out)


def _positions(index_text: str, length: int) -> set[int]:
    if index_text == "*":
        return set(range(length))
    if ":" in index_text:
        parts = [int(p) if p.strip() else None for p in index_text.split(":")]
        return set(range(length)[slice(*parts)])
    values = [int(v) for v in index_text.split(",")]
    return {v + length if v < 0 else v for v in values}


def reference(index: ModuleIndex, text: str) -> list[str]:
    """What the language says a selector matches, computed path by path from LANGUAGE.md's table."""
    anchored = text.startswith("/")
    segments = []
    for raw in text.lstrip("/").split("."):
        if raw == "**":
            segments.append(("deep", None, None))
        else:
            parts = SEGMENT.match(raw)
            segments.append(("name", _name_regex(parts["name"]), parts["index"]))

    def fits(k: int, parts: list[str], i: int) -> bool:
        if k == len(segments):
            return i == len(parts)
        kind, regex, index_text = segments[k]
        if kind == "deep":
            return any(fits(k + 1, parts, j) for j in range(i, len(parts) + 1))
        if i >= len(parts) or not regex.fullmatch(parts[i]):
            return False
        if index_text is None:
            return fits(k + 1, parts, i + 1)
        list_path = ".".join(parts[: i + 1])
        if index[list_path].family != "list" or i + 1 >= len(parts):
            return False
        length = index.list_length(list_path)
        return int(parts[i + 1]) in _positions(index_text, length) and fits(k + 1, parts, i + 2)

    out = []
    for path in index.modules:
        parts = path.split(".")
        starts = [0] if anchored else range(len(parts))
        if any(fits(0, parts, s) for s in starts):
            out.append(path)
    return out


CROSS_CHECKED = [
    "q_proj", "*_proj", "*norm", "<q,v>_proj", "self_attn.<q,k>_proj", "*", "/*", "**", "/**", "**.q_proj",
    "/model.**.q_proj", "mlp.**", "layers[*]", "layers[3]", "layers[-1]", "layers[0:8]", "layers[-4:]",
    "layers[::2]", "layers[1:-1:3]", "layers[0,5,9]", "layers[-1,0]", "layers[*].self_attn.*",
    "/model.layers[-2:].mlp", "layers[1].**", "*.*_proj", "<self_attn,mlp>.*", "switch_mlp.<gate,up>_proj",
    "mlp.gate", "shared_expert.*", "/lm_head", "embed_tokens", "/model.layers.0.self_attn.q_proj",
    "layers.*.self_attn", "**.layers[-1].**.<q,o>_proj",
]  # fmt: skip


@pytest.mark.parametrize("text", CROSS_CHECKED)
@pytest.mark.parametrize("which", ["llama", "moe", "towers"])
def test_matcher_agrees_with_the_reference_reading(request, which, text):
    index = request.getfixturevalue(which)
    assert match(index, text) == reference(index, text)


# ── names ────────────────────────────────────────────────────────────────────────────────


def test_exact_name_matches_that_last_segment_everywhere(llama):
    assert match(llama, "q_proj") == ending(llama, "q_proj")
    assert len(match(llama, "q_proj")) == LLAMA_BLOCKS


def test_a_name_only_matches_whole_segments(llama):
    assert match(llama, "proj") == []
    assert match(llama, "_proj") == []
    assert match(llama, "q_pro") == []
    assert match(llama, "attn.q_proj") == []


def test_star_inside_a_segment_stays_within_that_segment(llama):
    assert match(llama, "*_proj") == [p for p in llama.modules if p.rsplit(".", 1)[-1].endswith("_proj")]
    assert match(llama, "*norm") == ending(llama, "input_layernorm", "post_attention_layernorm", "norm")
    assert match(llama, "self*") == ending(llama, "self_attn")


def test_alternation_is_any_of_its_options(llama):
    assert match(llama, "<q,v>_proj") == ending(llama, "q_proj", "v_proj")
    assert match(llama, "<gate,up>_proj") == ending(llama, "gate_proj", "up_proj")


def test_single_star_is_exactly_one_segment(llama):
    children = [p for p in llama.modules if p.rsplit(".", 1)[0].endswith("self_attn")]
    assert match(llama, "self_attn.*") == children
    assert "model.layers.0.self_attn.rope" in children
    assert match(llama, "/*") == ["lm_head", "model"]
    assert match(llama, "*") == list(llama.modules)


def test_double_star_is_zero_or_more_segments(llama):
    assert match(llama, "/**") == list(llama.modules)
    assert match(llama, "**.q_proj") == ending(llama, "q_proj")
    assert match(llama, "/model.**.embed_tokens") == ["model.embed_tokens"]
    block = match(llama, "layers[1].**")
    assert block == ["model.layers.1"] + [m.path for m in llama.descendants("model.layers.1")]


# ── lists ────────────────────────────────────────────────────────────────────────────────


def test_star_index_consumes_the_list_and_its_integer_child(llama):
    assert match(llama, "layers[*]") == blocks(*range(LLAMA_BLOCKS))
    assert match(llama, "layers[*].self_attn") == [f"{b}.self_attn" for b in blocks(*range(LLAMA_BLOCKS))]
    assert match(llama, "layers") == ["model.layers"]


def test_single_positions_count_negative_ones_from_the_end(llama):
    assert match(llama, "layers[3]") == blocks(3)
    assert match(llama, "layers[-1]") == blocks(LLAMA_BLOCKS - 1)
    assert match(llama, f"layers[-{LLAMA_BLOCKS}]") == blocks(0)


@pytest.mark.parametrize(
    "index_text, positions",
    [("0:8", slice(0, 8)), ("-4:", slice(-4, None)), ("::2", slice(None, None, 2)), ("1:-1:3", slice(1, -1, 3)),
     ("5:2", slice(5, 2)), (":100", slice(None, 100))],
)  # fmt: skip
def test_slices_follow_python_slice_semantics(llama, index_text, positions):
    assert match(llama, f"layers[{index_text}]") == blocks(*list(range(LLAMA_BLOCKS))[positions])


def test_position_lists_come_out_in_natural_order(llama):
    assert match(llama, "layers[0,5,9]") == blocks(0, 5, 9)
    assert match(llama, "layers[9,-1,0]") == blocks(0, 9, 11)


def test_results_are_in_natural_order_not_text_order(llama):
    found = match(llama, "layers[*].self_attn.q_proj")
    numbers = [int(p.split(".")[2]) for p in found]
    assert numbers == list(range(LLAMA_BLOCKS))
    assert found.index("model.layers.2.self_attn.q_proj") < found.index("model.layers.10.self_attn.q_proj")


def test_an_index_needs_a_list(llama):
    assert match(llama, "self_attn[0]") == []
    assert match(llama, "layers[*]") != []


def test_negative_positions_resolve_per_concrete_list(towers):
    assert match(towers, "layers[-1]") == [
        f"language_model.model.layers.{LANGUAGE_BLOCKS - 1}",
        f"vision_tower.layers.{VISION_BLOCKS - 1}",
    ]
    assert match(towers, "layers[-2:].self_attn.q_proj") == [
        "language_model.model.layers.2.self_attn.q_proj",
        "language_model.model.layers.3.self_attn.q_proj",
        "vision_tower.layers.0.self_attn.q_proj",
        "vision_tower.layers.1.self_attn.q_proj",
    ]


def test_positions_outside_the_list_are_reported(llama):
    result = SelectorMatcher(selector(f"layers[{LLAMA_BLOCKS}]")).match(llama)
    assert result.paths == []
    assert result.out_of_range == [(LLAMA_BLOCKS, "model.layers", LLAMA_BLOCKS)]
    result = SelectorMatcher(selector(f"layers[0,-{LLAMA_BLOCKS + 1}]")).match(llama)
    assert result.paths == blocks(0)
    assert result.out_of_range == [(-(LLAMA_BLOCKS + 1), "model.layers", LLAMA_BLOCKS)]


def test_a_position_inside_one_of_two_lists_is_not_out_of_range(towers):
    result = SelectorMatcher(selector(f"layers[{LANGUAGE_BLOCKS - 1}]")).match(towers)
    assert result.paths == [f"language_model.model.layers.{LANGUAGE_BLOCKS - 1}"]
    assert result.out_of_range == []


def test_slices_are_never_out_of_range(llama):
    result = SelectorMatcher(selector("layers[5:100]")).match(llama)
    assert result.paths == blocks(*range(5, LLAMA_BLOCKS))
    assert result.out_of_range == []


# ── anchoring ────────────────────────────────────────────────────────────────────────────


def test_leading_slash_anchors_at_the_root(llama):
    assert match(llama, "/lm_head") == ["lm_head"]
    assert match(llama, "/embed_tokens") == []
    assert match(llama, "embed_tokens") == ["model.embed_tokens"]
    assert match(llama, "/model.embed_tokens") == ["model.embed_tokens"]
    assert match(llama, "/layers[0]") == []
    assert match(llama, "/model.layers[0]") == blocks(0)


def test_unanchored_selectors_match_any_suffix_at_a_segment_boundary(moe):
    assert match(moe, "mlp.gate") == [f"model.layers.{n}.mlp.gate" for n in range(2)]
    assert match(moe, "switch_mlp.gate_proj") == [f"model.layers.{n}.mlp.switch_mlp.gate_proj" for n in range(2)]
    assert match(moe, "gate_proj") == ending(moe, "gate_proj")
    assert len(match(moe, "gate_proj")) == 2 * 2  # the shared expert's and the experts' in each block
    assert match(moe, "expert.gate_proj") == []


def test_prefixes_name_where_each_match_starts(towers):
    result = SelectorMatcher(selector("layers[-1].self_attn.q_proj")).match(towers)
    assert result.prefixes == {
        f"language_model.model.layers.{LANGUAGE_BLOCKS - 1}.self_attn.q_proj": "language_model.model",
        f"vision_tower.layers.{VISION_BLOCKS - 1}.self_attn.q_proj": "vision_tower",
    }
    anchored = SelectorMatcher(selector("/vision_tower.layers[0]")).match(towers)
    assert anchored.prefixes == {"vision_tower.layers.0": ""}


def test_a_matcher_can_be_reused_on_other_models(llama, moe):
    matcher = SelectorMatcher(selector("layers[-1].self_attn.q_proj"))
    assert matcher.match(llama).paths == [f"model.layers.{LLAMA_BLOCKS - 1}.self_attn.q_proj"]
    assert matcher.match(moe).paths == ["model.layers.1.self_attn.q_proj"]
