"""Interop with the real clients, never silently wrong: PEFT adapters made by real PEFT on transformers 5 models and
imported (through `adapterspec fuse` and `load_adapters`) give PEFT's logits and those of PEFT's merge_and_unload;
adapters exported to PEFT give ours in PEFT; every adapter directory written for mlx-lm loads in mlx-lm with the same
logits; whatever cannot be exact is refused with the reason. The matrix of errors is printed at the end (-s)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("mlx_lm")

import real_clients as rc  # noqa: E402

# float32 on the CPU on both sides; logits are O(1). A routing flip or a wrong factor gives errors of 1e-2 or more.
ATOL = 1e-4
MATRIX: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-clients")
    return {kind: rc.build_pair(kind, root) for kind in rc.MODEL_KINDS}


@pytest.fixture(scope="module", autouse=True)
def print_matrix():
    yield
    groups: dict[str, list[str]] = {}
    for path in sorted({path for path, _ in MATRIX}):
        groups.setdefault(path.split(" ")[0].rstrip(":"), []).append(path)
    for paths in groups.values():
        cases = sorted({case for path, case in MATRIX if path in paths})
        lines = ["| model, adapter | " + " | ".join(paths) + " |", "| --- |" + " --- |" * len(paths)]
        for case in cases:
            lines.append(f"| {case} | " + " | ".join(MATRIX.get((p, case), "") for p in paths) + " |")
        print("\n\n" + "\n".join(lines))


def record(path: str, case: str, error: float) -> float:
    MATRIX[(path, case)] = f"{error:.1e}"
    return error


def test_the_two_sides_hold_the_same_base_model(pairs):
    for kind, (hf_dir, mlx_dir) in pairs.items():
        want = rc.hf_logits(rc.hf_model(hf_dir))
        assert record("base: transformers vs mlx-lm", kind, rc.max_error(want, rc.mlx_lm_logits(mlx_dir))) < ATOL


IMPORTS = {
    "llama lora+embedding+patterns": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2}),
    ),
    "llama bias=lora_only (no biases)": (
        "llama",
        dict(r=2, lora_alpha=4, target_modules="all-linear", bias="lora_only"),
    ),
    "llama-tied embedding lora, ensure_weight_tying": (
        "llama-tied",
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
    ),
    "llama-tied regex reaching lm_head, ensure_weight_tying": (
        "llama-tied",
        dict(r=2, lora_alpha=4, target_modules=r".*(q_proj|lm_head)", ensure_weight_tying=True),
    ),
    "qwen2_moe target_parameters + q_proj": (
        "qwen2_moe",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            rank_pattern={"down_proj": 3},
        ),
    ),
    "qwen2_moe all-linear (neither experts nor router on transformers 5)": (
        "qwen2_moe",
        dict(r=2, lora_alpha=4, target_modules="all-linear"),
    ),
    "qwen2_moe shared expert only (target_modules)": (
        "qwen2_moe",
        dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
    ),
    "qwen3_moe-tied target_parameters gate_up, rslora": (
        "qwen3_moe-tied",
        dict(r=3, lora_alpha=4, use_rslora=True, target_modules=[], target_parameters=["experts.gate_up_proj"]),
    ),
    "qwen2_moe target_parameters router + experts": (
        "qwen2_moe",
        dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.gate.weight", "experts.down_proj"]),
    ),
    "qwen2_moe target_parameters, layers_to_transform (not applied to parameters)": (
        "qwen2_moe",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=["experts.down_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    ),
    "qwen3_moe-tied target_parameters + embedding, ensure_weight_tying": (
        "qwen3_moe-tied",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["embed_tokens"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            ensure_weight_tying=True,
        ),
    ),
    "mixtral target_parameters": (
        "mixtral",
        dict(
            r=2,
            lora_alpha=6,
            target_modules=["o_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        ),
    ),
}
# PEFT's merge_and_unload adds a tied embedding's delta to the shared weight twice (once for the embedding, once for
# the head): PEFT warns about it; its unmerged model is the reference there.
MERGE_DOUBLES_TIED = {
    "llama-tied embedding lora, ensure_weight_tying",
    "qwen3_moe-tied target_parameters + embedding, ensure_weight_tying",
    "llama-tied regex reaching lm_head, ensure_weight_tying",
}


@pytest.mark.parametrize("case", sorted(IMPORTS))
def test_imported_peft_adapters_compute_what_peft_computes(pairs, tmp_path, case):
    kind, config = IMPORTS[case]
    hf_dir, mlx_dir = pairs[kind]
    model = rc.make_peft(hf_dir, tmp_path / "peft", **config)
    want = rc.hf_logits(model)
    ours = tmp_path / "ours"
    code, err = rc.cli("import", "peft", tmp_path / "peft", "--model", mlx_dir, "-o", tmp_path / "s.aspec", "--adapters-out", ours)  # fmt: skip
    assert code == 0, err
    assert "warning:" not in err
    if "shared expert" in case:
        assert "target_modules does not reach" in err and "target_parameters" in err
    if "bias" in case:
        assert "changes nothing" in err

    assert record("import: load_adapters vs PEFT", case, rc.max_error(want, rc.ours_logits(mlx_dir, ours))) < ATOL
    if rc.config_of(ours).get("fine_tune_type"):  # written in mlx-lm's format where the plan fits it
        assert record("import: mlx_lm.load(adapter_path) vs PEFT", case, rc.max_error(want, rc.mlx_lm_logits(mlx_dir, ours))) < ATOL  # fmt: skip
    else:
        assert not rc.config_of(ours)["adapterspec"]["mlx_lm_compatible"]
        MATRIX[("import: mlx_lm.load(adapter_path) vs PEFT", case)] = "not mlx-lm's format (per-module ranks)"
    code, err = rc.cli("fuse", mlx_dir, ours, "-o", tmp_path / "fused")
    assert code == 0, err
    assert record("import: fuse → mlx_lm.load vs PEFT", case, rc.max_error(want, rc.mlx_lm_logits(tmp_path / "fused"))) < ATOL  # fmt: skip
    if case not in MERGE_DOUBLES_TIED:
        merged = rc.hf_logits(model.merge_and_unload())
        assert record("import: load_adapters vs PEFT merge_and_unload", case, rc.max_error(merged, rc.ours_logits(mlx_dir, ours))) < ATOL  # fmt: skip
    else:
        MATRIX[("import: load_adapters vs PEFT merge_and_unload", case)] = "n/a (PEFT merges tied twice)"


IMPORT_REFUSALS = {
    "qwen2_moe modules_to_save on the fused experts": (
        "qwen2_moe",
        dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["experts"]),
        "transformers 5's fused experts",
    ),
    "llama-tied embedding lora without ensure_weight_tying": (
        "llama-tied",
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]),
        "tied to the output head",
    ),
    "qwen2_moe bias=all (biased attention)": (
        "qwen2_moe",
        dict(r=2, lora_alpha=4, target_modules=["q_proj"], bias="all"),
        "bias",
    ),
}


@pytest.mark.parametrize("case", sorted(IMPORT_REFUSALS))
def test_imports_that_cannot_be_exact_are_refused(pairs, tmp_path, case):
    kind, config, reason = IMPORT_REFUSALS[case]
    hf_dir, mlx_dir = pairs[kind]
    rc.make_peft(hf_dir, tmp_path / "peft", **config)
    code, err = rc.cli("import", "peft", tmp_path / "peft", "--model", mlx_dir, "-o", tmp_path / "s.aspec", "--adapters-out", tmp_path / "ours")  # fmt: skip
    assert code == 2 and reason in err, err
    assert not (tmp_path / "ours").exists() and not (tmp_path / "s.aspec").exists()
    MATRIX[("import: load_adapters vs PEFT", case)] = "refused (exit 2)"


EXPORTS = {
    "llama lora+embedding, ranks differ": (
        "llama",
        "self_attn.<q,v>_proj: lora(r=4, scale=2.0)\nlayers[1].mlp.down_proj: lora(r=2)\nembed_tokens: lora(r=4)",
    ),
    "llama dora": ("llama", "<q,k>_proj: dora(r=4, scale=2.0)"),
    "llama-tied embedding lora": ("llama-tied", "embed_tokens: lora(r=4, scale=2.0)\nq_proj: lora(r=2)"),
    "llama-tied embedding full": ("llama-tied", "embed_tokens: full\nq_proj: lora(r=2)"),
    "qwen2_moe switch-lora + shared expert": (
        "qwen2_moe",
        "switch_mlp.<gate,up,down>_proj: lora(r=4, scale=2.0)\nshared_expert.up_proj: lora(r=2)\nq_proj: lora(r=2)",
    ),
    "qwen3_moe-tied gate/up of other ranks": (
        "qwen3_moe-tied",
        "switch_mlp.gate_proj: lora(r=4, scale=2.0)\nlayers[1].mlp.switch_mlp.up_proj: lora(r=2, scale=3.0)",
    ),
    "qwen3_moe-tied experts + embedding lora": (
        "qwen3_moe-tied",
        "switch_mlp.<gate,up,down>_proj: lora(r=2, scale=2.0)\nembed_tokens: lora(r=2, scale=2.0)",
    ),
    "mixtral switch-lora": ("mixtral", "switch_mlp.<gate,up,down>_proj: lora(r=2, scale=4.0)"),
    "qwen2_moe every block module (mlx-lm's default keys, router too)": (
        "qwen2_moe",
        "layers[*].**@linear: lora(r=2, scale=4.0)\nlayers[*].**@switch: lora(r=2, scale=4.0)",
    ),
    "mixtral router + experts": ("mixtral", "<gate,w1,w2,w3>: lora(r=2)\nswitch_mlp.<gate,up,down>_proj: lora(r=2)"),
}
MERGE_DOUBLES_TIED_EXPORT = {"llama-tied embedding lora", "qwen3_moe-tied experts + embedding lora"}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_exported_adapters_compute_in_peft_what_they_compute_here(pairs, tmp_path, case):
    kind, spec = EXPORTS[case]
    hf_dir, mlx_dir = pairs[kind]
    ours = rc.write_our_adapters(mlx_dir, tmp_path / "ours", spec)
    want = rc.ours_logits(mlx_dir, ours)
    code, err = rc.cli("export", "peft", mlx_dir, ours, "-o", tmp_path / "peft")
    assert code == 0, err
    model = rc.peft_loaded(hf_dir, tmp_path / "peft")
    assert record("export: PeftModel.from_pretrained vs ours", case, rc.max_error(want, rc.hf_logits(model))) < ATOL
    if case in MERGE_DOUBLES_TIED_EXPORT:
        MATRIX[("export: PEFT merge_and_unload vs ours", case)] = "n/a (PEFT merges tied twice)"
    else:
        merged = rc.hf_logits(model.merge_and_unload())
        assert record("export: PEFT merge_and_unload vs ours", case, rc.max_error(want, merged)) < ATOL
    if rc.config_of(ours).get("fine_tune_type"):
        error = rc.max_error(want, rc.mlx_lm_logits(mlx_dir, ours))
        assert record("export: ours → mlx_lm.load(adapter_path) vs ours", case, error) < ATOL


def test_export_refuses_a_router_dora_for_transformers_5(pairs, tmp_path):
    _, mlx_dir = pairs["qwen2_moe"]
    ours = rc.write_our_adapters(mlx_dir, tmp_path / "ours", "layers[*].mlp.gate: dora(r=2)")
    code, err = rc.cli("export", "peft", mlx_dir, ours, "-o", tmp_path / "peft")
    assert code == 2 and "router" in err and "only with LoRA" in err, err
    assert not (tmp_path / "peft").exists()
    MATRIX[("export: PeftModel.from_pretrained vs ours", "qwen2_moe router dora")] = "refused (exit 2)"


def test_per_expert_layout_is_written_on_request(pairs, tmp_path):
    """transformers 4's one module per expert (PEFT's target_modules on experts.N.w1); transformers 5.25 ships no
    MoE class with per-expert modules to load it onto, so the names are checked, and loading it into transformers 5
    fails loudly in PEFT instead of computing something else."""
    import peft

    hf_dir, mlx_dir = pairs["mixtral"]
    ours = rc.write_our_adapters(mlx_dir, tmp_path / "ours", "switch_mlp.gate_proj: lora(r=2)")
    code, err = rc.cli("export", "peft", mlx_dir, ours, "-o", tmp_path / "peft", "--peft-layout", "per-expert")
    assert code == 0, err
    config = rc.config_of(tmp_path / "peft")
    assert config["target_modules"] == ["w1"] and not config.get("target_parameters")
    with pytest.raises(ValueError, match="w1"):
        peft.PeftModel.from_pretrained(rc.hf_model(hf_dir), str(tmp_path / "peft"))
    MATRIX[("export: PeftModel.from_pretrained vs ours", "mixtral --peft-layout per-expert on transformers 5")] = (
        "PEFT refuses (no experts.N.w1)"
    )


def test_fused_experts_round_trip_to_the_same_peft_tensors(pairs, tmp_path):
    """import then export gives PEFT's own tensors back: gate_proj and up_proj share A, so gate_up_proj keeps rank r."""
    from safetensors.numpy import load_file

    hf_dir, mlx_dir = pairs["mixtral"]
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # fmt: skip
    rc.make_peft(hf_dir, tmp_path / "peft", **config)
    code, err = rc.cli("import", "peft", tmp_path / "peft", "--model", mlx_dir, "--adapters-out", tmp_path / "ours")
    assert code == 0, err
    code, err = rc.cli("export", "peft", mlx_dir, tmp_path / "ours", "-o", tmp_path / "back")
    assert code == 0, err
    back = rc.config_of(tmp_path / "back")
    assert (back["r"], back["lora_alpha"], back["rank_pattern"]) == (2, 4.0, {})
    assert sorted(back["target_parameters"]) == sorted(config["target_parameters"])
    original = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        assert rc.max_error(value, written[key]) == 0.0, key
