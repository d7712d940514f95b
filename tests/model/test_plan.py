"""The planner on real mlx-lm models: last rule wins, containers, type filters, resolved arguments,
parameter counts checked against the applied model, and every AS3xx/AS4xx diagnostic with its span."""

from __future__ import annotations

import math

import mlx.nn as nn
import models as tiny
import pytest
from mlx.utils import tree_flatten

from adapterspec.adapters.install import apply
from adapterspec.language.diagnostics import Severity
from adapterspec.language.lint import parse_spec
from adapterspec.model.index import ModuleIndex
from adapterspec.model.kinds import KINDS
from adapterspec.model.plan import make_plan

BLOCKS = 4


class TwoTowers(nn.Module):
    """Two top-level towers, each with its own `layers`: an unanchored selector matches under both."""

    def __init__(self):
        super().__init__()
        self.language_model = tiny.build("llama", num_hidden_layers=BLOCKS)[0]
        self.vision_tower = tiny.build("llama", num_hidden_layers=2, seed=1)[0].model


@pytest.fixture(scope="module")
def index():
    """Indexes of tiny models, built once: index('llama'), index('llama', quantized=True), ..."""
    cache = {}

    def get(arch, quantized=False):
        if (arch, quantized) not in cache:
            model = TwoTowers() if arch == "towers" else build(arch, quantized)
            cache[arch, quantized] = ModuleIndex.from_module(model)
        return cache[arch, quantized]

    return get


def build(arch, quantized=False):
    blocks = {"llama": BLOCKS}.get(arch, 2)
    return tiny.build(arch, quantization=tiny.Q4 if quantized else None, num_hidden_layers=blocks)[0]


def plan(text, index):
    return make_plan(parse_spec(text, "spec.aspec"), index)


def entries(p):
    return {e.path: e for e in p.entries}


def codes(p):
    return [d.code for d in p.diagnostics]


def only(p, code):
    found = [d for d in p.diagnostics if d.code == code]
    assert len(found) == 1, p.diagnostics
    return found[0]


def column_of(text, line, token):
    return text.splitlines()[line - 1].index(token) + 1


def adaptable_under(index, path):
    return [m.path for m in index.descendants(path) if m.adaptable]


# ── which module gets what ───────────────────────────────────────────────────────────────


def test_last_matching_rule_wins(index):
    llama = index("llama")
    text = "layers[*]: lora(r=4)\nlayers[0]: none\nlayers[0].self_attn.q_proj: lora(r=2)\n"
    p = plan(text, llama)
    got = entries(p)
    expected = adaptable_under(llama, "model.layers")
    expected = [path for path in expected if not path.startswith("model.layers.0.")]
    expected.append("model.layers.0.self_attn.q_proj")
    assert sorted(got) == sorted(expected)
    assert got["model.layers.0.self_attn.q_proj"].r == 2
    assert got["model.layers.0.self_attn.q_proj"].rule_index == 2
    assert {e.r for path, e in got.items() if not path.startswith("model.layers.0.")} == {4}
    assert p.ok


def test_rule_order_matters(index):
    llama = index("llama")
    forward = plan("layers[0]: none\nlayers[*]: lora\n", llama)
    backward = plan("layers[*]: lora\nlayers[0]: none\n", llama)
    assert "model.layers.0.self_attn.q_proj" in entries(forward)
    assert "model.layers.0.self_attn.q_proj" not in entries(backward)
    assert len(forward.entries) == len(backward.entries) + len(adaptable_under(llama, "model.layers.0"))


def test_a_container_hands_the_transform_to_adaptable_modules_and_skips_norms_silently(index):
    llama = index("llama")
    p = plan("layers[1]: lora\n", llama)
    assert list(entries(p)) == adaptable_under(llama, "model.layers.1")
    assert "model.layers.1.input_layernorm" not in entries(p)
    assert p.diagnostics == []


def test_a_list_hands_the_transform_to_every_block(index):
    llama = index("llama")
    p = plan("/model.layers: lora\n", llama)
    assert list(entries(p)) == adaptable_under(llama, "model.layers")


def test_attention_container_skips_rope(index):
    llama = index("llama")
    p = plan("layers[0].self_attn: lora\n", llama)
    assert list(entries(p)) == [f"model.layers.0.self_attn.{n}_proj" for n in ("k", "o", "q", "v")]
    assert p.ok and p.diagnostics == []


def test_none_alone_plans_nothing(index):
    p = plan("layers[*]: none\n", index("llama"))
    assert p.entries == [] and p.ok and p.trainable_parameters == 0


def test_none_removes_a_module_from_an_earlier_rule(index):
    p = plan("**@linear: lora\nlm_head: none\n", index("llama"))
    assert "lm_head" not in entries(p)
    assert "model.layers.0.mlp.down_proj" in entries(p)


# ── type filters ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "arch, quantized, text, family, cls",
    [
        ("llama", False, "**@linear: lora\n", "linear", None),
        ("qwen2_moe", False, "**@switch: lora\n", "switch", None),
        ("qwen2_moe", False, "**@embedding: lora\n", "embedding", None),
        ("llama", True, "**@QuantizedLinear: lora\n", None, "QuantizedLinear"),
        ("llama", True, "**@QuantizedEmbedding: lora\n", None, "QuantizedEmbedding"),
        ("mixtral", True, "**@QuantizedSwitchLinear: lora\n", None, "QuantizedSwitchLinear"),
    ],
)
def test_type_filter_selects_exactly_its_family_or_class(index, arch, quantized, text, family, cls):
    idx = index(arch, quantized)
    p = plan(text, idx)
    expected = [m.path for m in idx if (m.family == family if family else m.cls == cls)]
    assert expected and list(entries(p)) == expected
    assert p.ok


def test_linear_filter_on_moe_blocks_leaves_out_experts_and_embeddings(index):
    moe = index("qwen2_moe")
    p = plan("layers[-1]@linear: lora\n", moe)
    got = entries(p)
    assert got and all(moe[path].family == "linear" for path in got)
    assert "model.layers.1.mlp.switch_mlp.up_proj" not in got
    assert "model.layers.1.mlp.shared_expert.up_proj" in got
    assert "model.layers.0.self_attn.q_proj" not in got


def test_switch_rule_on_moe_builds_switch_lora_for_each_expert_layer(index):
    moe = index("qwen2_moe")
    p = plan("layers[*].mlp.switch_mlp.*: lora(r=4)\n", moe)
    assert {e.adapter for e in p.entries} == {"switch-lora"}
    assert [e.path for e in p.entries] == [m.path for m in moe.by_family("switch")]
    assert p.ok


# ── full ─────────────────────────────────────────────────────────────────────────────────


def test_full_on_norms_trains_their_own_parameters(index):
    llama = index("llama")
    p = plan("**.*norm: full\n", llama)
    norms = [m for m in llama if m.path.rsplit(".", 1)[-1].endswith("norm")]
    assert [(e.path, e.adapter, e.trainable) for e in p.entries] == [(m.path, "full", m.num_params) for m in norms]
    assert all(e.r is None and e.scale is None for e in p.entries)


def test_full_on_a_container_trains_every_parameter_beneath_it(index):
    llama = index("llama")
    p = plan("layers[2]: full\n", llama)
    beneath = [m for m in llama.descendants("model.layers.2") if m.num_params]
    assert [e.path for e in p.entries] == [m.path for m in beneath]
    assert p.trainable_parameters == sum(m.num_params for m in beneath)
    assert "model.layers.2.self_attn.rope" not in entries(p)


# ── resolved arguments ───────────────────────────────────────────────────────────────────


def test_builtin_defaults_are_mlx_lms(index):
    (e, *_) = plan("q_proj: lora\n", index("llama")).entries
    assert (e.r, e.scale, e.dropout) == (8, 20.0, 0.0)


def test_alpha_in_defaults_resolves_to_a_scale_per_rule(index):
    text = (
        "defaults lora(r=4, alpha=16, dropout=0.05)\n"
        "q_proj: lora\n"
        "k_proj: lora(r=8)\n"
        "v_proj: lora(scale=2.5)\n"
        "o_proj: lora(alpha=9, r=9, rslora=true)\n"
        "down_proj: lora(dropout=0.0)\n"
    )
    got = {path.rsplit(".", 1)[-1]: e for path, e in entries(plan(text, index("llama"))).items()}
    assert (got["q_proj"].r, got["q_proj"].scale, got["q_proj"].dropout) == (4, 4.0, 0.05)
    assert (got["k_proj"].r, got["k_proj"].scale) == (8, 2.0)
    assert (got["v_proj"].r, got["v_proj"].scale) == (4, 2.5)
    assert (got["o_proj"].r, got["o_proj"].scale) == (9, 9 / math.sqrt(9))
    assert (got["down_proj"].dropout, got["down_proj"].scale) == (0.0, 4.0)


def test_scale_in_defaults_is_replaced_by_alpha_at_a_rule(index):
    text = "defaults lora(r=4, scale=3.0)\nq_proj: lora(alpha=2)\nk_proj: lora\n"
    got = {path.rsplit(".", 1)[-1]: e for path, e in entries(plan(text, index("llama"))).items()}
    assert got["q_proj"].scale == 0.5
    assert got["k_proj"].scale == 3.0


def test_dora_defaults_are_separate_from_lora_defaults(index):
    text = "defaults lora(r=2)\ndefaults dora(r=6, scale=1.0)\nq_proj: lora\nv_proj: dora\n"
    got = {path.rsplit(".", 1)[-1]: e for path, e in entries(plan(text, index("llama"))).items()}
    assert (got["q_proj"].adapter, got["q_proj"].r, got["q_proj"].scale) == ("lora", 2, 20.0)
    assert (got["v_proj"].adapter, got["v_proj"].r, got["v_proj"].scale) == ("dora", 6, 1.0)


def test_plan_json_shows_resolved_scale_and_the_rule_line(index):
    p = plan("# c\nq_proj: lora(r=4, alpha=8)\n", index("llama"))
    module = p.to_json()["modules"][0]
    assert (module["r"], module["scale"], module["rule"]["line"], module["rule"]["index"]) == (4, 2.0, 2, 0)
    assert p.to_json()["trainable_parameters"] == p.trainable_parameters


# ── parameter counts against the applied model ───────────────────────────────────────────


def trainable_by_module(model):
    return dict(tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize(
    "arch, quantized, text, kinds",
    [
        ("llama", False, "<q,v>_proj: lora(r=4)\n", {"lora"}),
        ("llama", True, "layers[-1]: lora(r=3)\n", {"lora"}),
        ("qwen2_moe", False, "switch_mlp.*: lora(r=2)\n", {"switch-lora"}),
        ("mixtral", True, "switch_mlp.*: lora(r=2)\n", {"switch-lora"}),
        ("qwen2_moe", False, "switch_mlp.*: dora(r=2)\n", {"switch-dora"}),
        ("mixtral", True, "switch_mlp.*: dora(r=2)\n", {"switch-dora"}),
        ("llama", False, "embed_tokens: lora(r=5)\n", {"embedding-lora"}),
        ("llama", True, "embed_tokens: lora(r=5)\n", {"embedding-lora"}),
        ("qwen2_moe", False, "layers[0]@linear: dora(r=4)\n", {"dora"}),
        ("llama", True, "mlp.*: dora(r=4)\n", {"dora"}),
        ("gemma", False, "embed_tokens: dora(r=2)\n", {"dora-embedding"}),
        ("llama", False, "**.*norm: full\nlayers[1]: full\n", {"full"}),
        ("qwen2_moe", False, "**: lora(r=2)\n**.*norm: full\nlayers[0].mlp.shared_expert: dora\n",
         {"lora", "switch-lora", "embedding-lora", "full", "dora"}),
    ],
)  # fmt: skip
def test_trainable_counts_equal_the_applied_models(arch, quantized, text, kinds):
    model = build(arch, quantized)
    p = plan(text, ModuleIndex.from_module(model))
    assert p.ok and {e.adapter for e in p.entries} == kinds
    apply(model, p)
    trainable = trainable_by_module(model)
    assert p.trainable_parameters == sum(v.size for v in trainable.values())
    for e in p.entries:
        own = sum(v.size for name, v in trainable.items() if name.rsplit(".", 1)[0] == e.path)
        assert own == e.trainable, e.path


def test_total_parameters_is_the_models(index):
    from mlx_lm.utils import get_total_parameters

    model = build("llama", quantized=True)
    assert plan("q_proj: lora\n", ModuleIndex.from_module(model)).total_parameters == get_total_parameters(model)


# ── diagnostics ──────────────────────────────────────────────────────────────────────────


def test_as301_selector_that_matches_nothing_suggests_a_name(index):
    text = "q_proj: lora\nlayers[*].self_attn.q_prj: lora\n"
    p = plan(text, index("llama"))
    d = only(p, "AS301")
    assert d.severity is Severity.ERROR
    assert (d.span.line, d.span.column) == (2, 1)
    assert "q_proj" in d.help
    assert d.filename == "spec.aspec"
    assert not p.ok


def test_as302_lora_on_norms_only(index):
    text = "q_proj: lora\n  **.*norm: lora\n"
    d = only(plan(text, index("llama")), "AS302")
    assert d.severity is Severity.ERROR
    assert (d.span.line, d.span.column) == (2, column_of(text, 2, "**.*norm"))
    assert "RMSNorm" in d.message


def test_as302_full_on_modules_without_parameters(index):
    text = "rope: full\n"
    d = only(plan(text, index("llama")), "AS302")
    assert (d.span.line, d.span.column) == (1, 1)
    assert "RoPE" in d.message


def test_dora_on_experts_plans_switch_dora_with_a_magnitude_per_expert_and_row(index):
    idx = index("qwen2_moe")
    p = plan("layers[-1].mlp: dora(r=4)\n", idx)
    assert p.ok, [d.message for d in p.diagnostics]
    kinds = {e.path: e.adapter for e in p.entries}
    experts = [path for path in kinds if idx[path].family == "switch"]
    assert experts and all(kinds[path] == "switch-dora" for path in experts)
    assert {kinds[path] for path in kinds if idx[path].family == "linear"} == {"dora"}
    info = idx[experts[0]]
    e, i, o = info.num_experts, info.input_dims, info.output_dims
    assert KINDS["switch-dora"].shapes(i, o, 4, e) == {"lora_a": (e, 4, i), "lora_b": (e, o, 4), "m": (e, o)}
    assert next(x for x in p.entries if x.path == experts[0]).trainable == e * (4 * i + o * 4 + o)


def test_as304_type_filter_excludes_everything(index):
    text = "q_proj: lora\nlayers[0].self_attn@switch: lora\n"
    d = only(plan(text, index("qwen2_moe")), "AS304")
    assert d.severity is Severity.ERROR
    assert (d.span.line, d.span.column) == (2, column_of(text, 2, "@switch"))


def test_as304_exact_class_on_a_quantized_model(index):
    text = "layers[0]@Linear: lora\n"
    d = only(plan(text, index("llama", quantized=True)), "AS304")
    assert "QuantizedLinear" in d.help


def test_as305_index_out_of_range(index):
    text = f"q_proj: lora\nlayers[{BLOCKS}].mlp: lora\n"
    p = plan(text, index("llama"))
    d = only(p, "AS305")
    assert d.severity is Severity.ERROR
    assert (d.span.line, d.span.column) == (2, 1)
    assert f"'model.layers' ({BLOCKS} elements)" in d.message
    assert "AS301" not in codes(p)


def test_as305_when_one_of_several_positions_is_out_of_range(index):
    p = plan(f"layers[0,{BLOCKS + 5}]: lora\n", index("llama"))
    assert codes(p) == ["AS305"]
    assert str(BLOCKS + 5) in only(p, "AS305").message


def test_as306_rank_not_below_the_smaller_dimension(index):
    text = "mlp.gate: lora(r=4)\n"
    p = plan(text, index("qwen2_moe"))
    d = only(p, "AS306")
    assert d.severity is Severity.WARNING
    assert (d.span.line, d.span.column) == (1, column_of(text, 1, "lora"))
    assert "min(in, out) = 4" in d.message
    assert p.ok
    assert "AS306" not in codes(plan("mlp.gate: lora(r=3)\n", index("qwen2_moe")))


def test_as307_one_selector_under_two_towers(index):
    text = "/language_model.lm_head: lora\nlayers[-1].self_attn.q_proj: lora\n"
    p = plan(text, index("towers"))
    d = only(p, "AS307")
    assert d.severity is Severity.WARNING
    assert (d.span.line, d.span.column) == (2, 1)
    assert "'language_model.model'" in d.message and "'vision_tower'" in d.message
    assert len(p.entries) == 3 and p.ok


@pytest.mark.parametrize(
    "text", ["/vision_tower.layers[-1].self_attn.q_proj: lora\n", "**.layers[*].self_attn.q_proj: lora\n"]
)
def test_as307_not_for_anchored_or_deep_selectors(index, text):
    assert "AS307" not in codes(plan(text, index("towers")))


def test_as307_not_on_a_single_tower(index):
    assert "AS307" not in codes(plan("embed_tokens: lora\n<q,v>_proj: lora\n", index("qwen2_moe")))


def test_as308_tied_embedding_is_info(index):
    text = "q_proj: lora\nembed_tokens: lora(r=4)\n"
    p = plan(text, index("gemma"))
    d = only(p, "AS308")
    assert d.severity is Severity.INFO
    assert (d.span.line, d.span.column) == (2, 1)
    assert p.ok


def test_as308_also_when_a_container_reaches_the_tied_embedding(index):
    assert "AS308" in codes(plan("/model: lora\n", index("gemma")))


def test_no_as308_on_an_untied_model(index):
    assert "AS308" not in codes(plan("embed_tokens: lora\n", index("llama")))


def test_as310_full_on_a_quantized_layer(index):
    text = "**.*norm: full\nlayers[0].self_attn: full\n"
    p = plan(text, index("llama", quantized=True))
    d = only(p, "AS310")
    assert d.severity is Severity.ERROR
    assert (d.span.line, d.span.column) == (2, column_of(text, 2, "full"))
    assert "QuantizedLinear" in d.message


def test_as401_rule_overridden_everywhere(index):
    text = "layers[0].self_attn.q_proj: lora\nq_proj: lora(r=4)\n"
    p = plan(text, index("llama"))
    d = only(p, "AS401")
    assert d.severity is Severity.WARNING
    assert (d.span.line, d.span.column) == (1, 1)
    assert "line 2" in d.message
    assert all(e.rule_index == 1 for e in p.entries)


def test_no_as401_when_a_rule_still_decides_something(index):
    p = plan("self_attn: lora\nq_proj: lora(r=4)\n", index("llama"))
    assert "AS401" not in codes(p)


def test_every_error_of_a_spec_is_reported_at_once(index):
    text = "q_prj: lora\n**.*norm: lora\nlayers[9]: lora\nlayers[0].mlp@switch: lora\n"
    p = plan(text, index("llama"))
    assert codes(p) == ["AS301", "AS302", "AS305", "AS304"]
    assert [d.span.line for d in p.diagnostics] == [1, 2, 3, 4]


# ── per-rule training settings and token rows ────────────────────────────────────────────


def test_training_settings_reach_each_entry_and_its_json(index):
    p = plan(
        "defaults lora(r=4, loraplus=16)\n"
        "self_attn.q_proj: lora(init=pissa, lr_scale=0.5)\n"
        "embed_tokens: tokens([5, 9:11])\n"
        "**.*norm: full(lr_scale=0.1, weight_decay=0)\n",
        index("llama"),
    )
    assert p.ok, p.diagnostics
    found = entries(p)
    q = found["model.layers.0.self_attn.q_proj"]
    assert (q.init, q.lr_scale, q.loraplus) == ("pissa", 0.5, 16.0)
    assert q.to_json()["init"] == "pissa" and "rows" not in q.to_json()
    tokens = found["model.embed_tokens"]
    info = index("llama")["model.embed_tokens"]
    assert (tokens.adapter, tokens.rows, tokens.trainable) == ("embedding-tokens", (5, 9, 10), 3 * info.output_dims)
    norm = found["model.norm"]
    assert norm.to_json()["lr_scale"] == 0.1 and norm.to_json()["weight_decay"] == 0.0
    plain = plan("self_attn.q_proj: lora\n", index("llama")).entries[0].to_json()
    assert not {"lr_scale", "loraplus", "weight_decay", "init", "rows"} & set(plain)


def test_token_rows_past_the_vocabulary_are_as312_at_the_list(index):
    rows = index("llama")["model.embed_tokens"].input_dims
    text = f"embed_tokens: tokens([1, {rows - 1}:{rows + 1}])\n"
    d = only(plan(text, index("llama")), "AS312")
    assert d.message == f"row {rows} is outside 'model.embed_tokens' ({rows} rows)"
    assert d.span.column == column_of(text, 1, "[")


def test_tokens_only_on_embeddings_and_rewrites_no_quantized_weights(index):
    assert "AS302" in codes(plan("self_attn.q_proj: tokens([1])\n", index("llama")))
    quantized = index("llama", quantized=True)
    assert only(plan("embed_tokens: tokens([1])\n", quantized), "AS313").message.startswith("tokens cannot rewrite")
    d = only(plan("self_attn.q_proj: lora(init=pissa)\n", quantized), "AS313")
    assert "init=pissa cannot rewrite the quantized weights" in d.message
    assert plan("self_attn.q_proj: lora(init=gaussian)\n", quantized).ok


def test_pissa_and_olora_only_initialise_lora_on_linear_layers(index):
    assert only(plan("embed_tokens: lora(init=olora)\n", index("llama")), "AS314").message == (
        "init=olora cannot initialise lora on 'model.embed_tokens' (Embedding)"
    )
    assert "AS314" in codes(plan("self_attn.q_proj: dora(init=pissa)\n", index("llama")))
    assert "AS314" in codes(plan("**@switch: lora(init=pissa)\n", index("mixtral")))
    assert (
        "needs a positive scale" in only(plan("q_proj: lora(scale=0, init=pissa)\n", index("llama")), "AS314").message
    )
