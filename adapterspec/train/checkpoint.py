"""Checkpoints of a training run: adapter directories that also hold the trainer's state, written atomically."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..adapters.weights import save_adapters
from ..errors import UserError
from ..model.adapter_format import ADAPTER_CONFIG, ADAPTER_DIR_FILES, ADAPTER_WEIGHTS
from ..outputs import copy_file_atomic

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_ARRAYS = "trainer_state.safetensors"
STATE_FORMAT = 1
STEP_NAME = re.compile(r"^[0-9]{7,}$")
OPTIMIZER_PREFIX = "optimizer."
GRAD_PREFIX = "grad_accum."
RNG_KEY = "rng_key"
GRAD_TOKENS = "grad_accum_tokens"


@dataclass
class Checkpoint:
    """A checkpoint read back: its step, trainer_state.json, adapter weights and trainer arrays."""

    path: Path
    step: int
    info: dict
    weights: dict
    arrays: dict

    def optimizer_state(self) -> dict:
        return {k[len(OPTIMIZER_PREFIX) :]: v for k, v in self.arrays.items() if k.startswith(OPTIMIZER_PREFIX)}

    def grad_accum(self) -> Optional[dict]:
        grads = {k[len(GRAD_PREFIX) :]: v for k, v in self.arrays.items() if k.startswith(GRAD_PREFIX)}
        return grads or None


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"{step:07d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under out/checkpoints, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(p.name), p) for p in root.iterdir() if STEP_NAME.match(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found)


def trainer_arrays(optimizer, rng_key, grad_accum: Optional[dict], accum_tokens) -> dict:
    """The arrays of the trainer's state: optimizer state, RNG key, and the gradient accumulated so far."""
    from mlx.utils import tree_flatten

    arrays = {OPTIMIZER_PREFIX + k: v for k, v in tree_flatten(optimizer.state)}
    arrays[RNG_KEY] = rng_key
    if grad_accum is not None:
        arrays.update({GRAD_PREFIX + k: v for k, v in tree_flatten(grad_accum)})
        arrays[GRAD_TOKENS] = accum_tokens
    return arrays


def save_checkpoint(
    model, plan, out: Path, step: int, info: dict, arrays: dict, extra_config: Optional[dict] = None
) -> Path:
    """Write out/checkpoints/NNNNNNN: the adapter directory plus trainer_state.{json,safetensors}, atomically."""
    import mlx.core as mx

    from ..outputs import atomic_output_dir

    dest = checkpoint_dir(out, step)
    with atomic_output_dir(dest, force=True, produces=(*ADAPTER_DIR_FILES, STATE_JSON, STATE_ARRAYS)) as tmp:
        save_adapters(model, plan, tmp, force=True, extra_config=extra_config)
        mx.save_safetensors(str(tmp / STATE_ARRAYS), arrays)
        state = {"format": STATE_FORMAT, **info, "step": step}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return dest


def publish(checkpoint: Path, out: Path) -> None:
    """Make out/ an adapter directory holding the checkpoint's adapters: weights first, config last,
    each replaced atomically (the config is what marks a directory as holding adapters)."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        copy_file_atomic(checkpoint / name, Path(out) / name)


def prune(out: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints (keep = 0: keep all); returns the removed paths."""
    if keep <= 0:
        return []
    old = [path for _, path in list_checkpoints(out)[:-keep]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def remove_leftovers(out: Path) -> None:
    """Remove half-written temporary directories and files a killed run left behind."""
    for folder in (Path(out), Path(out) / CHECKPOINTS):
        if folder.is_dir():
            for path in folder.iterdir():
                if not (path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name)):
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory read back; each damaged file is a UserError naming it."""
    from ..adapters.weights import read_weights
    from ..model.adapter_format import read_config_json
    from ..model.names import shown

    path = Path(path)
    help = "remove this checkpoint directory to resume from the one before"
    try:
        info = read_config_json(path / STATE_JSON)
        weights = read_weights(path / ADAPTER_WEIGHTS)
        arrays = read_weights(path / STATE_ARRAYS)
    except UserError as error:
        raise UserError(f"cannot read the checkpoint: {error.message}", help=help) from None
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        found = info.get("format") if isinstance(info, dict) else info
        raise UserError(f"{path / STATE_JSON}: checkpoint format {shown(found)} is not {STATE_FORMAT}", help=help)
    if not isinstance(info.get("step"), int) or isinstance(info.get("step"), bool) or info["step"] < 0:
        raise UserError(f"{path / STATE_JSON}: 'step' is not a step number", help=help)
    return Checkpoint(path, info["step"], info, weights, arrays)


def latest_checkpoint(out: Path) -> Checkpoint:
    found = list_checkpoints(out)
    if not found:
        raise UserError(
            f"{out}: no checkpoint to resume from (looked in {Path(out) / CHECKPOINTS})",
            help="start the run without --resume; checkpoints are written every --save-every steps",
        )
    return read_checkpoint(found[-1][1])


def differences(saved: dict, current: dict) -> list[str]:
    """'name: saved → now' for each entry whose value changed."""
    return [
        f"{key}: {saved.get(key)!r} → {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
