"""`python ordered_fuse.py ARGS...`: `adapterspec ARGS...`, then a JSON line on stdout telling in which order the fuse
started the spec check, wrote its shards and took the check's answer, and which spec-language and adapter-layer
modules it loaded (the recording lives here, not in the product)."""

import json
import sys

from adapterspec import cli
from adapterspec.fuse import adapter_source, stream

SPEC_LANGUAGE = (
    "adapterspec.model.plan",
    "adapterspec.language.spec",
    "adapterspec.language.parse",
    "pydantic",
    "lark",
)
# the layers a model is adapted with; a fuse merges with `fusemath` alone
ADAPTER_LAYERS = (
    "mlx.nn",
    *(f"adapterspec.adapters.{m}" for m in ("lora", "dora", "switch", "switch_dora", "embedding")),
)
EVENTS: list[str] = []


def recorded(owner, name: str, before: str, after: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        EVENTS.append(before)
        try:
            return original(*args, **kwargs)
        finally:
            EVENTS.append(after)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    recorded(adapter_source.SpecCheck, "__init__", "check starting", "check started")
    recorded(adapter_source.SpecCheck, "entries", "check waited for", "check answered")
    recorded(stream, "write_shards", "writing", "written")
    code = cli.main(sys.argv[1:])
    loaded = sorted(name for name in SPEC_LANGUAGE if name in sys.modules)
    layers = sorted(name for name in ADAPTER_LAYERS if name in sys.modules)
    print(json.dumps({"code": code, "events": EVENTS, "spec_language_loaded": loaded, "adapter_layers_loaded": layers}))
