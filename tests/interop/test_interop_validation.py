"""Broken PEFT and mlx-lm configs end in a UserError naming the field; imported text never becomes rules; export
refuses adapters PEFT could not load exactly."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("mlx.core")

import mlx.core as mx  # noqa: E402
import models  # noqa: E402

from adapterspec.cli import main  # noqa: E402
from adapterspec.errors import UserError  # noqa: E402
from adapterspec.interop.findings import as_comments, note  # noqa: E402
from adapterspec.interop.mlxlm_import import translate as translate_mlx_lm  # noqa: E402
from adapterspec.interop.peft import export_peft, import_peft  # noqa: E402
from adapterspec.interop.peft_config import read_peft_config  # noqa: E402
from adapterspec.interop.spec_writer import require_lint_clean  # noqa: E402
from adapterspec.language.lint import lint_text  # noqa: E402
from adapterspec.model.adapter_format import ADAPTER_WEIGHTS  # noqa: E402

INJECTED = "/**: full"
GOOD_PEFT = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
GOOD_MLX_LM = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}}


def write_peft(tmp_path, **changes):
    directory = tmp_path / "peft"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({**GOOD_PEFT, **changes}))
    return directory


BAD_PEFT = {
    "r-string": ({"r": "8"}, "r is a string, not a whole number"),
    "r-negative": ({"r": -8}, "r is -8, not a positive whole number"),
    "r-huge": ({"r": 10**30}, "r is 1000000000000000000000000000000, more than the largest rank"),
    "alpha-nan": ({"lora_alpha": math.nan}, "lora_alpha is the number NaN"),
    "dropout-two": ({"lora_dropout": 2.0}, r"lora_dropout is 2.0, not in \[0, 1\)"),
    "dora-yes": ({"use_dora": "yes"}, "use_dora is a string, not true or false"),
    "targets-number": ({"target_modules": 5}, "target_modules is the number 5"),
    "targets-bad-regex": ({"target_modules": ".*(q_proj"}, "target_modules is not a valid regular expression"),
    "targets-newline": ({"target_modules": ["q_proj\n" + INJECTED]}, r"target_modules\[0\] has a line break"),
    "exclude-newline": ({"exclude_modules": ["k_proj\n" + INJECTED]}, r"exclude_modules\[0\] has a line break"),
    "saved-newline": ({"modules_to_save": ["lm_head\n" + INJECTED]}, r"modules_to_save\[0\] has a line break"),
    "rank-pattern-key-newline": ({"rank_pattern": {"q_proj\n" + INJECTED: 4}}, "rank_pattern has a key that"),
    "rank-pattern-negative": ({"rank_pattern": {"q_proj": -1}}, "rank_pattern gives 'q_proj' a value that is -1"),
    "layers-string": ({"layers_to_transform": "0"}, "layers_to_transform is a string"),
    "layers-negative": ({"layers_to_transform": [-1]}, r"layers_to_transform\[0\] is -1"),
    "peft-type-number": ({"peft_type": 3}, "peft_type is the number 3"),
    "r-null": ({"r": None}, "r is null, not a whole number"),
    "alpha-null": ({"lora_alpha": None}, "lora_alpha is null, not a finite number"),
    "dropout-null": ({"lora_dropout": None}, "lora_dropout is null, not a finite number"),
    "rank-pattern-null": ({"rank_pattern": {"q_proj": None}}, "rank_pattern gives 'q_proj' a value that is null"),
    "alpha-pattern-null": ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern gives 'q_proj' a value that is null"),
    "layers-with-all-linear": (
        {"target_modules": "all-linear", "layers_to_transform": [0]},
        "`layers_to_transform` cannot be used when `target_modules` is a str",
    ),
    "layers-with-regex": (
        {"target_modules": r".*\.q_proj", "layers_to_transform": 1},
        "`layers_to_transform` cannot be used when `target_modules` is a str",
    ),
    "layers-pattern-with-regex": (
        {"target_modules": r".*\.q_proj", "layers_pattern": "layers"},
        "`layers_pattern` cannot be used when `target_modules` is a str",
    ),
    "layers-pattern-alone": ({"layers_pattern": "layers"}, "`layers_to_transform` must be set too"),
    "init-unknown": ({"init_lora_weights": "bogus"}, "init_lora_weights is 'bogus', not one of PEFT's"),
    "init-number": ({"init_lora_weights": 3}, "init_lora_weights is the number 3, not one of PEFT's"),
    "init-pissa-niter-word": ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights is 'pissa_niter_x'"),
}


@pytest.mark.parametrize("name", BAD_PEFT)
def test_a_peft_field_of_the_wrong_type_is_refused_by_name(tmp_path, name):
    changes, match = BAD_PEFT[name]
    directory = write_peft(tmp_path, **changes)
    with pytest.raises(UserError, match=match) as error:
        read_peft_config(directory)
    assert "adapter_config.json" in error.value.message and INJECTED not in error.value.message


PEFT_INITS = [True, False, "gaussian", "Gaussian", "eva", "olora", "pissa", "pissa_niter_4", "corda", "loftq",
              "orthogonal", "mica", "lora_ga"]  # fmt: skip


@pytest.mark.parametrize("init", PEFT_INITS)
def test_every_initialisation_peft_knows_is_read(tmp_path, init):
    assert read_peft_config(write_peft(tmp_path, init_lora_weights=init))["init_lora_weights"] == init


def test_unknown_initialisations_are_what_peft_refuses(tmp_path):
    """PEFT's own layer raises on the values refused here and takes the values read here."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    def peft_takes(init) -> bool:
        layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
        try:
            peft.get_peft_model(layer, peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=init))
        except (ValueError, AttributeError):
            return False
        return True

    for init in ("bogus", 3, "pissa_niter_x", True, "gaussian", "olora", "pissa_niter_2", "orthogonal"):
        directory = write_peft(tmp_path, init_lora_weights=init)
        try:
            read_peft_config(directory)
            ours = True
        except UserError:
            ours = False
        assert ours == peft_takes(init), init


def test_a_good_peft_config_imports_to_a_spec_lint_passes(tmp_path):
    result = import_peft(write_peft(tmp_path))
    assert not [d for d in lint_text(result.text) if d.is_error]


BAD_MLX_LM = {
    "rank-zero": ({"rank": 0}, "lora_parameters.rank is 0, not a positive whole number"),
    "rank-float": ({"rank": 8.5}, "lora_parameters.rank is the number 8.5"),
    "scale-inf": ({"scale": math.inf}, "lora_parameters.scale is the number Infinity"),
    "dropout-nan": ({"dropout": math.nan}, "lora_parameters.dropout is the number NaN"),
    "keys-string": ({"keys": "self_attn.q_proj"}, "lora_parameters.keys is a string, not a list"),
    "keys-newline": (
        {"keys": ["self_attn.q_proj\n" + INJECTED]},
        r"keys\[0\] has a line break after 'self_attn.q_proj'",
    ),
    "keys-cr": ({"keys": ["self_attn.q_proj\r" + INJECTED]}, r"keys\[0\] has a carriage return"),
    "keys-selector": ({"keys": ["self_attn.q_proj: full"]}, r"keys\[0\] has ':' after 'self_attn.q_proj'"),
    "keys-comment": ({"keys": ["q_proj # \nembed_tokens: full"]}, r"keys\[0\] has ' ' after 'q_proj'"),
}


@pytest.mark.parametrize("name", BAD_MLX_LM)
def test_a_bad_mlx_lm_setting_is_refused_by_name_without_echoing_rules(name):
    changes, match = BAD_MLX_LM[name]
    config = {**GOOD_MLX_LM, "lora_parameters": {**GOOD_MLX_LM["lora_parameters"], **changes}}
    with pytest.raises(UserError, match=match) as error:
        translate_mlx_lm(config, source="lora.yaml")
    assert error.value.message.startswith("lora.yaml: ")
    for word in (INJECTED, "q_proj: full", "embed_tokens: full"):
        assert word not in error.value.message


@pytest.mark.parametrize("changes, match", [({"num_layers": 2.5}, "num_layers is the number 2.5"),
                                            ({"fine_tune_type": "ia3"}, "fine_tune_type 'ia3' is not one mlx-lm trains"),
                                            ({"lora_parameters": [8, 20.0]}, "lora_parameters is a list")])  # fmt: skip
def test_bad_mlx_lm_settings_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        translate_mlx_lm({**GOOD_MLX_LM, **changes})


def test_comments_keep_line_breaks_escaped():
    (line,) = as_comments([note("target_modules is the regular expression 'q\n" + INJECTED + "'")])
    assert "\n" not in line and "\\u000a" in line


def test_text_that_does_not_lint_is_never_written():
    with pytest.raises(UserError, match="would not pass lint"):
        require_lint_clean("adapterspec 1\nq_proj: lora(r=0)\n", "lora.yaml")


# ── export peft ─────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    spec = root / "spec.aspec"
    spec.write_text("adapterspec 1\nlayers[*].self_attn.<q,v>_proj: lora(r=4)\n")
    assert main(["apply", str(models.example_model_dir("tiny-llama")), str(spec), "-o", str(root / "a")]) == 0
    return root / "a"


def broken_copy(adapters, tmp_path, change):
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(adapters, copy)
    weights = mx.load(str(copy / ADAPTER_WEIGHTS))
    change(weights)
    mx.save_safetensors(str(copy / ADAPTER_WEIGHTS), weights)
    return copy


Q_A = "model.layers.0.self_attn.q_proj.lora_a"
BAD_WEIGHTS = {
    "transposed": (lambda w: w.update({Q_A: w[Q_A].T}), f"'{Q_A}' has shape"),
    "wrong-rank": (lambda w: w.update({Q_A: w[Q_A].reshape(-1)}), f"'{Q_A}' has shape"),
    "nan": (lambda w: w.update({Q_A: mx.full(w[Q_A].shape, math.nan)}), f"'{Q_A}' holds NaN"),
    "missing": (lambda w: w.pop(Q_A), f"'{Q_A}' is missing"),
}


@pytest.mark.parametrize("name", BAD_WEIGHTS)
def test_export_refuses_what_peft_could_not_load_exactly(adapters, tmp_path, name):
    change, match = BAD_WEIGHTS[name]
    copy = broken_copy(adapters, tmp_path, change)
    with pytest.raises(UserError, match=match):
        export_peft(str(models.example_model_dir("tiny-llama")), copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
