"""PEFT round trips on a tiny Hugging Face llama built locally: PEFT's own adapters imported into adapterspec give
PEFT's logits, and adapters exported back load into PEFT with the same logits; specs choose what PEFT chooses."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("mlx.core")

from adapterspec.cli import main  # noqa: E402
from adapterspec.interop.peft import export_peft, import_peft, write_imported_adapters  # noqa: E402
from adapterspec.interop.peft_import import translate  # noqa: E402
from adapterspec.model.index import ModuleIndex  # noqa: E402

# Both sides compute in float32 on the CPU; logits are O(1).
LOGITS_ATOL = 1e-5
TOKENS = [[1, 5, 7, 9, 300, 2, 4, 100, 63, 17]]


def tiny_llama_config(tied: bool = False):
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved as safetensors + config.json (mlx-lm loads it as it is)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path)
    return path


def hf_model(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()


def logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def mlx_logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def make_peft(hf_dir, out, perturb=None, **config):
    """A PEFT adapter with random A and B (and, via `perturb`, changed magnitudes or saved modules), saved to `out`."""
    torch.manual_seed(1)
    model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    if perturb:
        with torch.no_grad():
            perturb(model)
    model.save_pretrained(out)
    return model


def bump_saved_head(model):
    model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)


def bump_magnitudes(model):
    for name, parameter in model.named_parameters():
        if "lora_magnitude_vector" in name:
            parameter.mul_(1.1)


ROUND_TRIPS = {
    "lora-patterns-embedding-saved-head": dict(
        config=dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            modules_to_save=["lm_head"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 32},
        ),
        perturb=bump_saved_head,
    ),
    "dora-rslora-some-layers": dict(
        config=dict(
            r=4,
            lora_alpha=6,
            use_dora=True,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
            layers_to_transform=[0, 2],
            layers_pattern="layers",
        ),
        perturb=bump_magnitudes,
    ),
    "all-linear-exclude": dict(
        config=dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"])
    ),
    "regex-target": dict(
        config=dict(r=3, lora_alpha=9, target_modules=r"model\.layers\.[12]\.(self_attn\.v_proj|mlp\.up_proj)")
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_import_then_export_round_trip(hf_dir, tmp_path, case):
    import mlx.core as mx

    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import load_adapters

    setup = ROUND_TRIPS[case]
    peft_model = make_peft(hf_dir, tmp_path / "peft", setup.get("perturb"), **setup["config"])
    want = logits(peft_model)
    assert np.abs(want - logits(hf_model(hf_dir))).max() > 1e-3  # the adapter changes the outputs

    imported = import_peft(tmp_path / "peft", str(hf_dir), need_model=True)
    assert not [f for f in imported.findings if f.lossy]
    write_imported_adapters(imported, tmp_path / "peft", tmp_path / "ours")
    model, _ = load_model(hf_dir)
    load_adapters(model, tmp_path / "ours")
    mx.eval(model.parameters())
    np.testing.assert_allclose(mlx_logits(model), want, atol=LOGITS_ATOL, rtol=0)

    export_peft(str(hf_dir), tmp_path / "ours", tmp_path / "exported")
    reloaded = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "exported").eval()
    np.testing.assert_allclose(logits(reloaded), want, atol=LOGITS_ATOL, rtol=0)


def test_cli_import_and_export(hf_dir, tmp_path):
    make_peft(hf_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    spec = tmp_path / "spec.aspec"
    code = main(
        [
            "import",
            "peft",
            str(tmp_path / "peft"),
            "-o",
            str(spec),
            "--adapters-out",
            str(tmp_path / "ours"),
            "--model",
            str(hf_dir),
        ]
    )
    assert code == 0
    text = spec.read_text()
    assert "defaults lora(r=4, alpha=16)" in text and "q_proj: lora" in text and "v_proj: lora" in text
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]  # mlx-lm reads it too
    assert main(["export", "peft", str(hf_dir), str(tmp_path / "ours"), "-o", str(tmp_path / "back")]) == 0
    exported = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert exported["target_modules"] == ["q_proj", "v_proj"] and exported["r"] == 4 and exported["lora_alpha"] == 16


def as_float64(weights_file) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.double() for k, v in load_file(weights_file).items()}, weights_file)


def test_float64_weights_import_with_peft_logits(hf_dir, tmp_path):
    import mlx.core as mx

    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import load_adapters

    want = logits(make_peft(hf_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    as_float64(tmp_path / "peft" / "adapter_model.safetensors")
    args = ["import", "peft", str(tmp_path / "peft"), "--model", str(hf_dir), "--adapters-out", str(tmp_path / "ours")]
    assert main(args) == 0
    assert {v.dtype for v in mx.load(str(tmp_path / "ours" / "adapters.safetensors")).values()} == {mx.float32}
    model, _ = load_model(hf_dir)
    load_adapters(model, tmp_path / "ours")
    np.testing.assert_allclose(mlx_logits(model), want, atol=LOGITS_ATOL, rtol=0)


def test_a_named_config_file_and_dash_for_stdout(hf_dir, tmp_path, capsys, monkeypatch):
    make_peft(hf_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj"])
    monkeypatch.chdir(tmp_path)
    args = ["import", "peft", str(tmp_path / "peft" / "adapter_config.json"), "--model", str(hf_dir), "-o", "-"]
    assert main(args + ["--adapters-out", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adapterspec 1\n# imported from the PEFT LoRA config peft/adapter_config.json\n")
    assert "q_proj: lora" in out and not (tmp_path / "-").exists()
    assert (tmp_path / "ours" / "adapters.safetensors").is_file()


OVERLAPPING_OUTPUTS = [("out", "out", False), ("out/spec.aspec", "out", True), ("out", "out/adapters", False)]


@pytest.mark.parametrize("spec, adapters, out_exists", OVERLAPPING_OUTPUTS)
def test_spec_and_adapter_directory_must_not_overlap(hf_dir, tmp_path, capsys, spec, adapters, out_exists):
    make_peft(hf_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj"])
    if out_exists:
        (tmp_path / "out").mkdir()
    args = ["import", "peft", str(tmp_path / "peft"), "--model", str(hf_dir)]
    assert main(args + ["-o", str(tmp_path / spec), "--adapters-out", str(tmp_path / adapters)]) == 2
    assert "overlap" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "peft"] if out_exists else ["peft"])
    assert not out_exists or list((tmp_path / "out").iterdir()) == []


def test_weights_need_a_model(hf_dir, tmp_path, capsys):
    make_peft(hf_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj"])
    config_file = tmp_path / "peft" / "adapter_config.json"
    assert json.loads(config_file.read_text())["base_model_name_or_path"] == str(hf_dir)
    args = ["import", "peft", str(tmp_path / "peft"), "--adapters-out", str(tmp_path / "ours")]
    assert main(args) == 0  # the config's base model is found locally
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "nobody/no-such-model"
    config_file.write_text(json.dumps(config))
    assert main(args + ["--force"]) == 2
    assert "needs the base model" in capsys.readouterr().err


def test_lossy_configs_are_refused_unless_allowed(hf_dir, tmp_path, capsys):
    make_peft(hf_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj"], lora_bias=True)
    args = ["import", "peft", str(tmp_path / "peft"), "--model", str(hf_dir), "-o", str(tmp_path / "s.aspec")]
    assert main(args) == 2
    assert "lora_bias=true" in capsys.readouterr().err
    assert not (tmp_path / "s.aspec").exists()
    assert main(args + ["--allow-lossy"]) == 0
    assert "# warning: lora_bias=true" in (tmp_path / "s.aspec").read_text()


# ── the spec's plan equals PEFT's choice, case by case ──────────────────────

CHOICE_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "dotted-name": dict(target_modules=["self_attn.q_proj", "mlp.up_proj"]),
    "full-name": dict(target_modules=["model.layers.1.self_attn.k_proj"]),
    "layers-pattern": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "layers-no-pattern": dict(target_modules=["o_proj"], layers_to_transform=[0, 2]),
    "layers-int": dict(target_modules=["o_proj"], layers_to_transform=2, layers_pattern="layers"),
    "rank-pattern-order": dict(
        r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"model.layers.0.self_attn.q_proj": 8, "q_proj": 2}
    ),
    "alpha-pattern-anchored": dict(
        target_modules=["q_proj", "v_proj"], alpha_pattern={"^model.layers.2.self_attn.v_proj": 3}
    ),
    "patterns-same-keys": dict(
        target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5}
    ),
    "regex-pattern-key": dict(
        target_modules=["q_proj", "k_proj"], rank_pattern={r"layers\.[01]\.self_attn\.k_proj": 6}
    ),
    "all-linear": dict(target_modules="all-linear"),
    "all-linear-patterns": dict(
        target_modules="all-linear", rank_pattern={"mlp.down_proj": 2}, alpha_pattern={"mlp.down_proj": 3}
    ),
    "regex": dict(target_modules=r".*layers\.(0|2)\..*_proj"),
    "exclude-list": dict(
        target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["model.layers.1.self_attn.k_proj", "v_proj"]
    ),
    "exclude-regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"),
    "saved": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "input_layernorm"]),
    "saved-by-suffix": dict(target_modules=["q_proj"], modules_to_save=["norm"]),
    "exclude-containers": dict(
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["self_attn", "layers.0", "model.layers.1.self_attn.v_proj"],
    ),
    "all-linear-exclude-container": dict(target_modules="all-linear", exclude_modules=["self_attn", "layers.0"]),
    "embedding-and-head": dict(target_modules=["embed_tokens", "lm_head"]),
    "rslora-dropout": dict(r=8, lora_alpha=4, use_rslora=True, lora_dropout=0.1, target_modules=["up_proj"]),
}


def peft_modules_chosen(model) -> dict:
    """PEFT's own decision: LoRA layer path → (r, scaling), and saved module path → 'full'."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    prefix = "base_model.model."
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            out[name[len(prefix) :]] = (module.r["default"], pytest.approx(module.scaling["default"]))
        elif isinstance(module, ModulesToSaveWrapper):
            out[name[len(prefix) :]] = "full"
    return out


def saved_config(model) -> dict:
    """The adapter_config.json PEFT would write for the model's adapter."""

    def plain(value):
        return sorted(value) if isinstance(value, set) else getattr(value, "value", str(value))

    return json.loads(json.dumps(model.peft_config["default"].to_dict(), default=plain))


def plan_modules(plan) -> dict:
    out = {}
    for entry in plan.entries:
        out[entry.path] = "full" if entry.adapter == "full" else (entry.r, entry.scale)
    full_owners = {p for p, v in out.items() if v == "full"}
    return {p: v for p, v in out.items() if v != "full" or p.rpartition(".")[0] not in full_owners}


@pytest.mark.parametrize("case", sorted(CHOICE_CASES))
def test_spec_chooses_what_peft_chooses(hf_dir, case):
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.plan import make_plan

    config = CHOICE_CASES[case]
    model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(**config))
    wanted = peft_modules_chosen(model)
    index = ModuleIndex.from_model_dir(hf_dir)
    for given in (config, saved_config(model)):  # as written by a user, and as PEFT saves it
        translation = translate(given, index, model="tiny")
        plan = make_plan(parse_spec(translation.text), index)
        assert plan.ok, translation.text
        assert plan_modules(plan) == wanted, translation.text
    dropouts = {e.dropout for e in plan.entries if e.adapter != "full"}
    assert dropouts == {config.get("lora_dropout", 0.0)}


@pytest.mark.parametrize(
    "case",
    [
        "list",
        "dotted-name",
        "layers-pattern",
        "patterns-same-keys",
        "exclude-list",
        "exclude-containers",
        "saved",
        "saved-by-suffix",
        "rslora-dropout",
        "all-linear",
        "all-linear-patterns",
    ],
)
def test_translation_without_a_model_plans_like_peft(hf_dir, case):
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.plan import make_plan

    config = CHOICE_CASES[case]
    model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(**config))
    for given in (config, saved_config(model)):
        translation = translate(given)
        plan = make_plan(parse_spec(translation.text), ModuleIndex.from_model_dir(hf_dir))
        assert plan.ok, translation.text
        assert plan_modules(plan) == peft_modules_chosen(model), translation.text


def test_all_linear_exclusions_without_a_model_are_lossy(hf_dir):
    """PEFT excludes only linear layers named by the entry, never what is beneath a container of that name: all 21
    linears stay adapted. Without the model the spec cannot say so; with it the import is exact."""
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.plan import make_plan

    config = CHOICE_CASES["all-linear-exclude-container"]
    model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(**config))
    assert len(peft_modules_chosen(model)) == 21
    lossy = [f.message for f in translate(config).lossy]
    assert len(lossy) == 2 and all("--model" in message for message in lossy)
    assert "exclude_modules 'layers.0' with all-linear" in lossy[0] and "'self_attn'" in lossy[1]
    index = ModuleIndex.from_model_dir(hf_dir)
    translation = translate(config, index, model="tiny")
    assert not translation.lossy
    assert plan_modules(make_plan(parse_spec(translation.text), index)) == peft_modules_chosen(model)


def test_regex_without_a_model_is_reported():
    from adapterspec.errors import UserError

    with pytest.raises(UserError, match="regular expression"):
        translate({"r": 4, "lora_alpha": 8, "target_modules": r".*\.q_proj"})


def test_tied_embeddings_are_reported(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tied"
    transformers.LlamaForCausalLM(tiny_llama_config(tied=True)).save_pretrained(path)
    index = ModuleIndex.from_model_dir(path)
    lossy = translate({"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "lm_head"]}, index).lossy
    messages = " ".join(f.message for f in lossy)
    assert "tied to the output head" in messages and "'lm_head'" in messages
