"""Conformance of adapterspec on every text architecture of the installed mlx-lm (see zoo.py).

One test per architecture and check: (a) index from the directory = index of the live model,
(b) plans equal on both, (c) apply → save → load reproduces the logits (and mlx-lm's loader when the
adapter config says it fits), (d) the fused model's logits equal the adapted model's, (e) the role filters
(@experts, @router, …) resolve alike on both indexes and AS309 warns of experts left out, (f) adapter directories as
mlx_lm.lora writes them load and fuse to mlx-lm's logits; (a)-(c)
again on 4-bit quantized variants of a subset.
"""

from __future__ import annotations

import pytest

from . import zoo

CONFIGS = zoo.load_configs()


def _params(archs):
    return [
        pytest.param(arch, id=arch, marks=[pytest.mark.zoo] + ([pytest.mark.zoo_fast] if arch in zoo.FAST else []))
        for arch in archs
    ]


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


_SUBJECTS: dict = {}


def subject(arch: str, root, quantization=None) -> zoo.Subject:
    key = (arch, bool(quantization))
    if key not in _SUBJECTS:
        _SUBJECTS[key] = zoo.Subject(arch, CONFIGS[arch], root, quantization)
    found = _SUBJECTS[key]
    built = found.built()
    if not built:
        pytest.skip(f"mlx-lm cannot build or load {arch}: {built.detail}")
    return found


def _check(name: str, arch: str, root, quantization=None):
    result = zoo.CHECKS[name](subject(arch, root, quantization))
    assert result.ok, result.detail


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_builds(arch, zoo_root):
    """mlx-lm builds, saves and loads the tiny model (a skip says why not: not adapterspec's to fix)."""
    subject(arch, zoo_root)


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_index_matches_live_model(arch, zoo_root):
    _check("index", arch, zoo_root)


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_plan_matches_live_model(arch, zoo_root):
    _check("plan", arch, zoo_root)


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_adapters_round_trip(arch, zoo_root):
    _check("round_trip", arch, zoo_root)


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_fuse_matches_adapted_model(arch, zoo_root):
    _check("fuse", arch, zoo_root)


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_roles_resolve(arch, zoo_root):
    _check("roles", arch, zoo_root)


@pytest.mark.parametrize("arch", _params(CONFIGS))
def test_mlx_lm_adapter_directories(arch, zoo_root):
    _check("mlx_lm_dirs", arch, zoo_root)


@pytest.mark.parametrize("arch", _params(zoo.QUANTIZED))
@pytest.mark.parametrize("check", zoo.QUANTIZED_CHECKS)
def test_quantized(check, arch, zoo_root):
    """(a)-(c) on the 4-bit variant (nn.quantize through mlx-lm's quantize_model, group 32)."""
    _check(check, arch, zoo_root, zoo.Q4)
