"""adapterspec: a declarative adapter-spec compiler for MLX (LoRA, switch-LoRA, embedding-LoRA, DoRA)."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "parse_spec": ("lint", "parse_spec"),
    "load_spec": ("lint", "load_spec"),
    "lint_text": ("lint", "lint_text"),
    "Spec": ("spec", "Spec"),
    "Diagnostic": ("diagnostics", "Diagnostic"),
    "SpecError": ("diagnostics", "SpecError"),
    "Severity": ("diagnostics", "Severity"),
    "ModuleIndex": ("modules", "ModuleIndex"),
    "Plan": ("plan", "Plan"),
    "make_plan": ("plan", "make_plan"),
    "apply": ("apply", "apply"),
    "load_adapters": ("adapter_dir", "load_adapters"),
    "save_adapters": ("adapter_dir", "save_adapters"),
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
