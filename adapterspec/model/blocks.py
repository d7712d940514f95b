"""Which list of modules is the model's block list — what mlx-lm's `model.layers` property returns — when
only the module tree is known (a model directory: config.json and safetensors headers). Pure Python.

Live, `ModuleIndex.from_module` asks the model itself (`model.layers`); these rules give the same answer
from the tree for every mlx-lm architecture: a list of blocks, named `layers`, `h` or `blocks`, outside any
vision or audio tower, the shallowest and then the one holding the most parameters.
"""

from __future__ import annotations

import re
import weakref
from typing import Iterable

# the names mlx-lm's architectures give their block list, best first
BLOCK_LIST_NAMES = ("layers", "h", "blocks")
# path segments of towers beside the language model (their blocks are not `model.layers`)
TOWER_WORDS = re.compile(r"vision|visual|audio|image|encoder|mtp|speech|vit", re.IGNORECASE)
# the selector segment that means the block list whatever its name
BLOCKS_ALIAS = "layers"


def guess_block_list(infos: Iterable) -> str | None:
    """The path of the block list among ModuleInfos (None when there is no candidate)."""
    infos = list(infos)
    lists = {m.path for m in infos if m.family == "list" and m.name in BLOCK_LIST_NAMES}
    if not lists:
        return None
    params: dict[str, int] = dict.fromkeys(lists, 0)
    has_blocks: set[str] = set()
    for m in infos:
        parent = m.parent
        if parent in lists and m.name.isdigit() and m.family in ("container", "list"):
            has_blocks.add(parent)
        for candidate in lists:
            if m.path.startswith(candidate + "."):
                params[candidate] += m.num_params
    candidates = [p for p in lists if p in has_blocks] or list(lists)

    def rank(path: str) -> tuple:
        prefix = path.rsplit(".", 1)[0] if "." in path else ""
        return (
            bool(TOWER_WORDS.search(prefix)),
            path.count("."),
            BLOCK_LIST_NAMES.index(path.rsplit(".", 1)[-1]),
            -params[path],
            path,
        )

    return min(candidates, key=rank)


_BLOCK_LISTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def block_lists(index) -> frozenset[str]:
    """Every list the selector segment `layers` matches: the model's block list, and in a vision-language model
    (a `language_model` beside other towers) the block list of each other tower (`vision_tower.blocks`,
    `vision_tower.vision_model.encoder.layers`); once per index."""
    found = _BLOCK_LISTS.get(index)
    if found is None:
        paths = {index.block_list} if index.block_list else set()
        roots = [info for info in index.children("") if info.family == "container"]
        if any(root.name == "language_model" for root in roots):
            for root in roots:
                if root.name != "language_model" and not (index.block_list or "").startswith(root.path + "."):
                    tower = guess_block_list(index.descendants(root.path))
                    if tower:
                        paths.add(tower)
        found = _BLOCK_LISTS[index] = frozenset(paths)
    return found


def _live_layers(model) -> list | None:
    """What `model.layers` returns on a live mlx-lm model, when it is a non-empty list of blocks."""
    try:
        layers = getattr(model, "layers", None)
    except Exception:  # noqa: BLE001 — a property that fails means no block list to report
        return None
    return list(layers) if isinstance(layers, (list, tuple)) and layers else None


def live_block_list(model, paths_by_id: dict[int, str], list_paths: set[str]) -> str | None:
    """The path of the list `model.layers` returns on a live mlx-lm model (None when it has none)."""
    for block in _live_layers(model) or ():
        path = paths_by_id.get(id(block))
        if path and "." in path:
            parent = path.rsplit(".", 1)[0]
            if parent in list_paths:
                return parent
    return None


def live_blocks(model, paths_by_id: dict[int, str]) -> tuple[str, ...] | None:
    """The paths of the blocks `model.layers` returns on a live mlx-lm model, in its order (None when unknown)."""
    layers = _live_layers(model)
    paths = tuple(paths_by_id.get(id(block)) for block in layers or ())
    return None if not paths or None in paths else paths
