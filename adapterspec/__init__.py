"""adapterspec: a declarative adapter-spec compiler for MLX (LoRA, switch-LoRA, embedding-LoRA, DoRA)."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "parse_spec": ("language.lint", "parse_spec"),
    "load_spec": ("language.lint", "load_spec"),
    "lint_text": ("language.lint", "lint_text"),
    "Spec": ("language.spec", "Spec"),
    "Diagnostic": ("language.diagnostics", "Diagnostic"),
    "SpecError": ("language.diagnostics", "SpecError"),
    "Severity": ("language.diagnostics", "Severity"),
    "ModuleIndex": ("model.index", "ModuleIndex"),
    "Plan": ("model.plan", "Plan"),
    "make_plan": ("model.plan", "make_plan"),
    "apply": ("adapters.install", "apply"),
    "load_adapters": ("adapters.weights", "load_adapters"),
    "save_adapters": ("adapters.weights", "save_adapters"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'adapterspec' has no attribute {name!r}")
    from importlib import import_module

    module_name, attribute = _LAZY[name]
    value = getattr(import_module(f".{module_name}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
