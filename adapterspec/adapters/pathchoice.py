"""Which low-rank path a layer takes, measured: the candidates timed once per key, the fastest kept.

Like cuDNN's benchmark mode. The first call of an adapter layer at a new key (device, layer kind,
base shapes and dtypes, quantization, input shape and dtype, training or eval) runs every candidate
path on synthetic arrays of the same shapes and dtypes (never the layer's own, which may be tracers
inside `mx.compile`), and the fastest is kept for the process, and in a JSON file when
`cache_file` (or the environment variable ADAPTERSPEC_PATH_CACHE) names one. Every candidate
computes the same function; only the time differs.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

WARMUP = 1
REPEATS = 5

# name, thunk -> seconds of one call; replaceable (tests inject one that needs no clock)
Timer = Callable[[str, Callable[[], object]], float]


def wall_timer(name: str, run: Callable[[], object]) -> float:
    """Seconds one evaluated call of `run` takes, the device synchronized on both sides."""
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(run())
    mx.synchronize()
    return time.perf_counter() - start


timer: Timer = wall_timer
cache_file: Optional[Path] = (
    Path(os.environ["ADAPTERSPEC_PATH_CACHE"]) if os.environ.get("ADAPTERSPEC_PATH_CACHE") else None
)
choices: dict[str, str] = {}
timings: dict[str, dict[str, float]] = {}
_loaded_from: Optional[Path] = None


@dataclass(frozen=True)
class Candidates:
    """A key and, per path name, a function building that path's thunk on synthetic arrays."""

    key: tuple
    build: Callable[[], dict[str, Callable[[], object]]]


_seeds = itertools.count()


def random_like(a: mx.array, high: int = 1 << 30) -> mx.array:
    """Random data of a's shape and dtype (integers in [0, high)), drawn with a key of its own: the global
    random state, which a compiled step traces, is left alone. Never zeros (they can run faster)."""
    key = mx.random.key(next(_seeds))
    if mx.issubdtype(a.dtype, mx.integer):
        return mx.random.randint(0, high, a.shape, key=key).astype(a.dtype)
    return (0.02 * mx.random.normal(a.shape, key=key)).astype(a.dtype)


def random_twin(module):
    """A copy of the module tree holding random arrays of its arrays' shapes and dtypes (the module is untouched)."""
    twin = copy.copy(module)
    for name, value in module.items():
        if isinstance(value, mx.array):
            twin[name] = random_like(value)
        elif hasattr(value, "items") and hasattr(value, "_no_grad"):
            twin[name] = random_twin(value)
    return twin


def signature(module) -> tuple:
    """The module's class and every array's name, shape and dtype, with its quantization settings."""
    from mlx.utils import tree_flatten

    arrays = tuple((name, tuple(v.shape), str(v.dtype)) for name, v in tree_flatten(module.parameters()))
    settings = tuple((k, getattr(module, k)) for k in ("group_size", "bits", "mode") if hasattr(module, k))
    return (type(module).__name__, arrays, settings)


def step(fn: Callable, primals: list, training: bool) -> Callable[[], object]:
    """A thunk running fn forward (eval) or forward and backward against random cotangents (training); fn returns
    an array or a list of them."""
    if not training:
        return lambda: fn(*primals)
    outputs = fn(*primals)  # the outputs' shapes and dtypes; the graph is never evaluated
    cotangents = [random_like(o) for o in outputs] if isinstance(outputs, list) else [random_like(outputs)]
    return lambda: mx.vjp(fn, primals, cotangents)


def low_rank_candidates(
    layer, kind: str, base, x: mx.array, paths: tuple[str, str], extra_key: tuple = (), extra_args=tuple
) -> Candidates:
    """A low-rank layer's two paths (`paths`: the names of its separate and merged methods), timed on a random
    twin of the layer with this call's shapes; `extra_args()` gives the methods' arguments after x."""
    key = (kind, signature(base), tuple(x.shape), str(x.dtype), *extra_key, layer.lora_a.shape[1], layer.training)

    def build():
        twin = random_twin(layer)
        args = extra_args()
        primals = [random_like(x), twin.lora_a, twin.lora_b]

        def on(name: str):
            method = getattr(twin, name)

            def fn(x, a, b):
                twin.lora_a, twin.lora_b = a, b
                return method(x, *args)

            return step(fn, primals, layer.training)

        return {"separate": on(paths[0]), "merged": on(paths[1])}

    return Candidates(key, build)


def device_key() -> str:
    """The default device with its model name, so that one cache file can serve several machines."""
    device = mx.default_device()
    try:
        name = mx.device_info().get("device_name", "")
    except Exception:  # a backend without device_info
        name = ""
    return f"{device}:{name}"


def key_text(key: tuple) -> str:
    return json.dumps([device_key(), *key], default=str)


def choose(candidates: Candidates) -> str:
    """The fastest path for this key: from the cache, or measured now (and remembered)."""
    _load()
    text = key_text(candidates.key)
    if text not in choices:
        choices[text] = measure(text, candidates.build())
        _save()
    return choices[text]


def measure(text: str, thunks: dict[str, Callable[[], object]]) -> str:
    """Warm every thunk up, time them in alternating rounds (so drifting load spreads over all), keep the fastest
    median; a tie keeps the first-named candidate."""
    for run in thunks.values():
        for _ in range(WARMUP):
            mx.eval(run())
    seconds = {name: [] for name in thunks}
    for _ in range(REPEATS):
        for name, run in thunks.items():
            seconds[name].append(timer(name, run))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    timings[text] = medians
    return min(medians, key=lambda name: (medians[name], list(thunks).index(name)))


def forget() -> None:
    """Drop every choice held in this process (the cache file stays)."""
    global _loaded_from
    choices.clear()
    timings.clear()
    _loaded_from = None


def _load() -> None:
    global _loaded_from
    if cache_file is None or _loaded_from == cache_file:
        return
    _loaded_from = cache_file
    try:
        stored = json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        choices.update({k: v for k, v in stored.items() if isinstance(v, str) and k not in choices})


def _save() -> None:
    if cache_file is None:
        return
    from ..outputs import write_json_atomic

    try:
        write_json_atomic(cache_file, dict(sorted(choices.items())), indent=1)
    except OSError:
        pass  # a cache that cannot be written is measured again next time
