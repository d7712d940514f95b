"""PEFT's module matching, re-implemented in pure Python with its exact semantics (tested against PEFT itself).

* `target_modules` as a list: a module is targeted when its name equals an entry or ends with
  `.` + entry; `layers_to_transform` (with `layers_pattern`) then keeps only some blocks. As a string:
  a regular expression that must match the whole name (`re.fullmatch`).
* `exclude_modules` (list: same suffix rule; string: full-match regex) and `modules_to_save` (anything
  at or under such a module) are never targeted.
* `rank_pattern` / `alpha_pattern`: the first key (in the config's order) for which
  `(.*\\.)?(KEY)$` matches the name decides.
* `modules_to_save` wraps every module whose name ends with an entry (plain string suffix).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

ALL_LINEAR = "all-linear"


def is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def is_excluded(config: dict, key: str) -> bool:
    """Whether `exclude_modules` or `modules_to_save` keep the module `key` from getting an adapter."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return True
    saved = config.get("modules_to_save")
    return bool(saved) and any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in saved)


def layer_index(key: str, layers_pattern) -> Optional[int]:
    """The block number PEFT reads from a module name: the first `PATTERN.N.` (or any `NAME.N.` after the first segment)."""
    match = None
    if layers_pattern is None or len(layers_pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def is_targeted(config: dict, key: str) -> bool:
    """PEFT's `check_target_module_exists` for a LoRA config (`all-linear` already expanded to names)."""
    if is_excluded(config, key):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{name}") for name in targets)
    layers = config.get("layers_to_transform")
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if not (using_layers and found):
        return found
    index = layer_index(key, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_key(pattern_keys: Iterable[str], key: str) -> Optional[str]:
    """PEFT's `get_pattern_key`: the first pattern key matching the end of `key` at a dot, or None."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def rank_and_alpha(config: dict, key: str) -> tuple[int, float]:
    """The (r, lora_alpha) PEFT gives the targeted module `key`."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(ranks, key), pattern_key(alphas, key)
    r = ranks[r_key] if r_key is not None else config.get("r", 8)
    alpha = alphas[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return int(r), float(alpha)


def is_saved(config: dict, key: str) -> bool:
    """Whether `modules_to_save` wraps the module `key` (its parameters are trained and saved whole)."""
    return any(key.endswith(name) for name in config.get("modules_to_save") or ())


def expand_all_linear(config: dict, linear_keys: Sequence[str], output_key: Optional[str]) -> dict:
    """The config with `all-linear` replaced by the model's linear module names, the output head left out."""
    if not is_all_linear(config.get("target_modules")):
        return config
    names = {k for k in linear_keys if k != output_key}
    return {**config, "target_modules": names}


TIED_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES


def names_tied_layer(target_modules) -> bool:
    """PEFT's test (in `_check_tied_modules`) of whether `target_modules` name an embedding or the output head, which
    with `ensure_weight_tying` makes it tie the head's adapter to the input embedding's."""
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, name) for name in TIED_NAMES)
    return any(str(name).split(".")[-1] in TIED_NAMES for name in target_modules or ())
