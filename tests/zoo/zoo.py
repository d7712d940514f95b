"""The zoo: tiny models of every mlx-lm text architecture, and the conformance checks run on each.

Each check returns a `Result` (ok, detail) rather than asserting, so the pytest tests and the
script `run_zoo.py` share them. adapterspec is reached only through `harness`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS_PATH = HERE / "configs.json"

# The default (fast) subset: dense and MoE, several block-list names and heads.
FAST = ("llama", "mixtral", "qwen2_moe", "deepseek_v3", "gpt2", "phi3", "gemma", "olmoe")
# Architectures also checked 4-bit quantized (a)-(c).
QUANTIZED = ("llama", "mixtral", "qwen2_moe", "deepseek_v3", "gpt2", "phi3", "gemma", "olmoe")
Q4 = {"group_size": 32, "bits": 4, "mode": "affine"}

TOKENS = [[1, 5, 7, 3, 9, 2]]
ADAPTABLE = ("linear", "switch", "embedding")
INDEX_FIELDS = ("family", "input_dims", "output_dims", "num_experts", "bits", "group_size", "mode")
# Specs whose plans must not depend on where the index came from.
PLAN_SPECS = (
    "**@linear: lora(r=4)",
    "layers[-1:].**: lora(r=2)",
    "**@switch: lora(r=2)",
    "**@embedding: lora(r=2)",
    "**: lora(r=2)",
)
LAST_BLOCK_SPEC = "layers[-1:].**: lora(r=2)"
ROUND_TRIP_ATOL = 1e-5  # times max(1, max |logit|): another loader may round differently, not more
FUSE_RTOL = 1e-4


def load_configs() -> dict[str, dict]:
    return json.loads(CONFIGS_PATH.read_text(encoding="utf-8"))


@dataclass
class Result:
    ok: bool
    detail: str = ""
    data: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


# ── models ──────────────────────────────────────────────────────────────────


def build(arch: str, config: dict, seed: int = 0, quantization: dict | None = None):
    """(model, config): mlx-lm's class for `config`, random weights, float32; quantized as mlx-lm converts."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    config = dict(config)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float32)
    _randomize_zeros(model, seed)
    mx.eval(model.parameters())
    if quantization:
        from mlx_lm.utils import quantize_model

        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(
                model, config, quantization["group_size"], quantization["bits"], mode=quantization.get("mode", "affine")
            )
    return model, config


def _randomize_zeros(model, seed: int) -> None:
    """Weights some architectures initialise to zeros (gates, output projections) get small random
    values, so that every module changes the logits."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed + 1)
    updates = []
    for name, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and value.size > 1 and not mx.any(value).item():
            updates.append((name, 0.02 * mx.random.normal(value.shape)))
    if updates:
        model.update(tree_unflatten(updates))


def save_dir(model, config: dict, path: Path) -> Path:
    """mlx-lm's layout: weights flattened from model.parameters() (sharded with an index), config.json."""
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    return path


def load_dir(path: Path):
    """(model, config) through mlx-lm's own loader (sanitize, quantization from config.json)."""
    from mlx_lm.utils import load_model

    return load_model(Path(path))


def logits(model, tokens=TOKENS):
    import mlx.core as mx

    out = model(mx.array(tokens))
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.astype(mx.float32)
    mx.eval(out)
    return out


def compare(a, b, rtol: float, atol: float) -> Result:
    import mlx.core as mx

    if a.shape != b.shape:
        return Result(False, f"shapes differ: {a.shape} vs {b.shape}")
    diff = mx.abs(a - b)
    scale = mx.max(mx.abs(a)).item()
    worst = mx.max(diff).item()
    ok = bool(mx.all(diff <= atol + rtol * mx.abs(a)).item())
    return Result(ok, f"max |diff| {worst:.3g} (max |logit| {scale:.3g})", {"max_diff": worst, "max_abs": scale})


def mx_max_abs(a) -> float:
    import mlx.core as mx

    return mx.max(mx.abs(a)).item()


def randomize_lora_b(model, seed: int = 1) -> int:
    """Give every lora_b (and DoRA's magnitudes stay) random nonzero values; returns how many were set."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    updates = [
        (name, 0.05 * mx.random.normal(value.shape).astype(value.dtype))
        for name, value in tree_flatten(model.parameters())
        if name.endswith("lora_b")
    ]
    model.update(tree_unflatten(updates))
    mx.eval(model.parameters())
    return len(updates)


# ── one architecture's fixture ──────────────────────────────────────────────


class Subject:
    """One architecture (maybe quantized) written to a directory, built lazily once."""

    def __init__(self, arch: str, config: dict, root: Path, quantization: dict | None = None):
        self.arch, self.config, self.quantization = arch, config, quantization
        self.root = Path(root) / (arch + ("-q4" if quantization else ""))
        self._built: Result | None = None

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def built(self) -> Result:
        """Build, save and load back with mlx-lm, in a child process (some architectures abort the
        interpreter on this backend); the reason when mlx-lm cannot."""
        if self._built is None:
            import subprocess
            import sys

            argv = [
                sys.executable,
                "-m",
                "tests.zoo.zoo",
                self.arch,
                str(self.model_dir),
                json.dumps(self.quantization or {}),
            ]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=HERE.parent.parent)
            except subprocess.TimeoutExpired:
                self._built = Result(False, "timed out building the model")
                return self._built
            last = (done.stdout.strip().splitlines() or [""])[-1]
            if done.returncode == 0 and last == "built":
                self._built = Result(True)
            else:
                tail = " / ".join((last if last.startswith("FAILED") else done.stderr.strip()).splitlines()[-2:])
                self._built = Result(False, f"exit {done.returncode}: {tail[:300]}")
        return self._built

    def build_here(self) -> None:
        model, config = build(self.arch, self.config, quantization=self.quantization)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        save_dir(model, config, self.model_dir)
        loaded, _ = load_dir(self.model_dir)
        logits(loaded)

    def load(self):
        return load_dir(self.model_dir)[0]

    def scratch(self, name: str) -> Path:
        path = self.root / name
        if path.exists():
            shutil.rmtree(path)
        return path


# ── checks ──────────────────────────────────────────────────────────────────


def _infos(index) -> dict[str, Any]:
    return {info.path: info for info in index}


def check_index(subject: Subject) -> Result:
    """(a) The index from config.json + headers equals the index of the loaded model, for adaptable modules
    (a module adaptable in either index is compared)."""
    from .harness import ModuleIndex

    live_index, disk_index = ModuleIndex.from_module(subject.load()), ModuleIndex.from_model_dir(subject.model_dir)
    live, disk = _infos(live_index), _infos(disk_index)
    paths = sorted({p for infos in (live, disk) for p, i in infos.items() if i.family in ADAPTABLE})
    differing = {}
    for name in ("block_list", "tied_embeddings"):
        a, b = getattr(live_index, name), getattr(disk_index, name)
        if a != b:
            differing[f"({name})"] = f"live {a!r} dir {b!r}"
    for path in paths:
        a, b = live.get(path), disk.get(path)
        if a is None or b is None:
            differing[path] = (
                "only in the "
                + ("directory" if a is None else "live")
                + " index"
                + f" ({(a or b).cls}, {(a or b).family})"
            )
            continue
        fields = {f: (getattr(a, f), getattr(b, f)) for f in INDEX_FIELDS if getattr(a, f) != getattr(b, f)}
        if fields:
            differing[path] = (
                ", ".join(f"{f}: live {x!r} dir {y!r}" for f, (x, y) in fields.items())
                + f" (live {a.cls}, dir {b.cls})"
            )
    if not differing:
        return Result(True, f"{len(paths)} adaptable modules")
    lines = [f"{p}: {why}" for p, why in list(differing.items())[:12]]
    more = f" (+{len(differing) - 12} more)" if len(differing) > 12 else ""
    return Result(
        False,
        f"{len(differing)} of {len(paths)} adaptable paths differ{more}: " + "; ".join(lines),
        {"differing": differing},
    )


def _plan_summary(plan) -> dict:
    return {
        "ok": plan.ok,
        # the base's class name is left out: a directory cannot know a model's own class names (FusedLinear)
        "entries": sorted((e.path, e.adapter, e.r, e.scale) for e in plan.entries),
        "diagnostics": sorted(f"{d.code} {d.message}" for d in plan.diagnostics),
    }


def check_plans(subject: Subject, specs=PLAN_SPECS) -> Result:
    """(b) Plans on the directory's index equal plans on the live model's index."""
    from .harness import ModuleIndex, make_plan, parse_spec

    live = ModuleIndex.from_module(subject.load())
    disk = ModuleIndex.from_model_dir(subject.model_dir)
    problems = []
    for text in specs:
        spec = parse_spec(text)
        a, b = _plan_summary(make_plan(spec, live)), _plan_summary(make_plan(spec, disk))
        if a != b:
            only_live = sorted(set(a["entries"]) - set(b["entries"]))
            only_disk = sorted(set(b["entries"]) - set(a["entries"]))
            parts = [f"`{text}`:"]
            if a["ok"] != b["ok"]:
                parts.append(f"ok live {a['ok']} dir {b['ok']}")
            if only_live:
                parts.append(f"{len(only_live)} entries only live, e.g. {only_live[0]}")
            if only_disk:
                parts.append(f"{len(only_disk)} entries only dir, e.g. {only_disk[0]}")
            diag = sorted(set(a["diagnostics"]) ^ set(b["diagnostics"]))
            if diag:
                parts.append(f"diagnostics differ, e.g. {diag[0][:160]}")
            problems.append(" ".join(parts))
    return Result(not problems, "; ".join(problems) or f"{len(specs)} specs")


def full_spec(index) -> str:
    """A rule per adaptable family the model has: every linear, switch and embedding layer gets LoRA."""
    families = {info.family for info in index}
    rules = [f"**@{family}: lora(r={4 if family == 'linear' else 2})" for family in ADAPTABLE if family in families]
    return "\n".join(rules) + "\n"


def round_trip_specs(subject: Subject) -> list[str]:
    from .harness import ModuleIndex

    return [full_spec(ModuleIndex.from_module(subject.load())), LAST_BLOCK_SPEC]


def adapted(subject: Subject, spec: str, name: str):
    """(model with random adapters, plan, adapter directory): apply, set lora_b, save."""
    from .harness import apply, save_adapters

    model = subject.load()
    plan = apply(model, spec)
    randomize_lora_b(model)
    adapter_dir = subject.scratch(name)
    save_adapters(model, plan, adapter_dir)
    return model, plan, adapter_dir


def check_round_trip(subject: Subject) -> Result:
    """(c) apply → save → load into a fresh model gives the same logits; mlx-lm's loader too when compatible.
    A documented refusal (an architecture's limit) is noted, and the spec without the refused modules must pass."""
    return _each_spec(subject, lambda spec, i: _round_trip_one(subject, spec, f"adapters-{i}"))


def _each_spec(subject: Subject, check_one) -> Result:
    """`check_one(spec, i)` → (ok, note) on every round-trip spec; where adapterspec refuses a spec for a
    documented reason, that is noted and the spec without the refused modules must pass."""
    notes, failed = [], False
    for i, spec in enumerate(round_trip_specs(subject)):
        ok, note = check_one(spec, i)
        exclusion = None if ok else _refused_by_design(note)
        if exclusion:
            notes.append(f"refused as documented ({exclusion})")
            ok, note = check_one(f"{spec.rstrip()}\n{exclusion}\n", i)
        failed |= not ok
        notes.append(note)
    return Result(not failed, "; ".join(notes))


def _refused_by_design(note: str) -> str | None:
    from .harness import documented_refusal

    return documented_refusal(note)


def _round_trip_one(subject: Subject, spec: str, name: str) -> tuple[bool, str]:
    from .harness import load_adapters

    label = spec.strip().replace("\n", "; ")
    try:
        model, plan, adapter_dir = adapted(subject, spec, name)
        expected = logits(model)
        base = logits(subject.load())
        if compare(expected, base, 0, 1e-7 * max(1.0, mx_max_abs(base))).ok:
            return False, f"`{label}`: the adapters do not change the logits"
        fresh = subject.load()
        load_adapters(fresh, adapter_dir)
        atol = ROUND_TRIP_ATOL * max(1.0, mx_max_abs(expected))
        same = compare(expected, logits(fresh), 0, atol)
        if not same:
            return False, f"`{label}`: reloaded logits differ, {same.detail}"
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if not config.get("adapterspec", {}).get("mlx_lm_compatible"):
            return True, f"`{label}`: ok"
        from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

        theirs = mlx_lm_load_adapters(subject.load(), str(adapter_dir))
        same = compare(expected, logits(theirs), 0, atol)
        if not same:
            return False, f"`{label}`: mlx-lm's load_adapters gives other logits, {same.detail}"
        return True, f"`{label}`: mlx-lm loader ok"
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, f"`{label}`: {type(e).__name__}: {str(e)[:300]}"


def check_fuse(subject: Subject) -> Result:
    """(d) `adapterspec fuse` output, loaded with mlx-lm, gives the adapted model's logits (a documented
    refusal is noted, and the spec without the refused modules must fuse)."""
    return _each_spec(subject, lambda spec, i: _fuse_one(subject, spec, i))


def _fuse_one(subject: Subject, spec: str, i: int) -> tuple[bool, str]:
    from .harness import fuse_cli

    label = spec.strip().replace("\n", "; ")
    try:
        model, plan, adapter_dir = adapted(subject, spec, f"fuse-adapters-{i}")
        expected = logits(model)
        out = subject.scratch(f"fused-{i}")
        done = fuse_cli(subject.model_dir, adapter_dir, out)
        if done.returncode != 0:
            message = (done.stderr.strip() or done.stdout.strip()).splitlines()
            return False, f"`{label}`: fuse exit {done.returncode}: {' '.join(message)[-600:]}"
        fused, _ = load_dir(out)
        # ~1e-4 relative, measured against the logits' scale (a logit near 0 gets no exact-zero demand)
        same = compare(expected, logits(fused), FUSE_RTOL, FUSE_RTOL * max(1.0, mx_max_abs(expected)))
        if not same:
            return False, f"`{label}`: fused logits differ, {same.detail}"
        return True, f"`{label}`: ok"
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, f"`{label}`: {type(e).__name__}: {str(e)[:300]}"


def mlx_lm_trained(subject: Subject, name: str, fine_tune_type: str = "lora"):
    """(model, adapter directory) as `mlx_lm.lora` leaves them (None and the reason where mlx-lm refuses or
    fails): its own linear_to_lora_layers on the last two blocks with no `keys` (mlx-lm picks them per
    architecture), random lora_b, the trainable parameters saved to adapters.safetensors and the run's
    arguments to adapter_config.json."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = subject.load()
    parameters = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    try:
        model.freeze()  # as mlx_lm.lora does; recurrent_gemma's Model fails here (it skips nn.Module's state)
        linear_to_lora_layers(model, 2, parameters, use_dora=fine_tune_type == "dora")
    except (ValueError, AttributeError) as e:  # mlx-lm's own refusal or failure: nothing of adapterspec's to check
        return None, f"mlx-lm refuses it: {type(e).__name__}: {e}"
    if not randomize_lora_b(model):
        return None, "mlx-lm adapts no module of this model"
    try:
        logits(model)
    except Exception as e:  # noqa: BLE001 — mlx-lm's own adapted model fails (afm7's DoRA on a FusedLinear)
        return None, f"mlx-lm's own adapted model fails: {type(e).__name__}: {str(e)[:160]}"
    adapter_dir = subject.scratch(name)
    adapter_dir.mkdir(parents=True)
    mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"model": str(subject.model_dir), "fine_tune_type": fine_tune_type, "num_layers": 2}
    config |= {"lora_parameters": parameters, "train": True, "batch_size": 1, "iters": 1, "learning_rate": 1e-5}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    return model, adapter_dir


def check_mlx_lm_dirs(subject: Subject) -> Result:
    """(f) Adapter directories written as mlx_lm.lora writes them (LoRA and DoRA, keys omitted): adapterspec's
    load_adapters and fuse give the logits of mlx-lm's adapted model."""
    from .harness import fuse_cli, load_adapters

    notes, failed = [], False
    for fine_tune_type in ("lora", "dora"):
        try:
            model, adapter_dir = mlx_lm_trained(subject, f"mlx-lm-{fine_tune_type}", fine_tune_type)
            if model is None:
                notes.append(f"{fine_tune_type}: {adapter_dir}")
                continue
            expected = logits(model)
            fresh = subject.load()
            load_adapters(fresh, adapter_dir)
            same = compare(expected, logits(fresh), 0, ROUND_TRIP_ATOL * max(1.0, mx_max_abs(expected)))
            if not same:
                failed = True
                notes.append(f"{fine_tune_type}: load_adapters gives other logits, {same.detail}")
            out = subject.scratch(f"mlx-lm-{fine_tune_type}-fused")
            done = fuse_cli(subject.model_dir, adapter_dir, out)
            if done.returncode != 0:
                failed = True
                message = (done.stderr.strip() or done.stdout.strip()).splitlines()
                notes.append(f"{fine_tune_type}: fuse exit {done.returncode}: {' / '.join(message[-3:])[:400]}")
                continue
            same = compare(expected, logits(load_dir(out)[0]), FUSE_RTOL, FUSE_RTOL * max(1.0, mx_max_abs(expected)))
            if not same:
                failed = True
                notes.append(f"{fine_tune_type}: fused logits differ, {same.detail}")
            else:
                notes.append(f"{fine_tune_type}: ok")
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            if _refused_by_design(str(e)):  # a documented limit (afm7's FusedLinear): said, not a failure
                notes.append(f"{fine_tune_type}: refused as documented: {str(e)[:200]}")
                continue
            failed = True
            notes.append(f"{fine_tune_type}: {type(e).__name__}: {str(e)[:300]}")
    return Result(not failed, "; ".join(notes))


def _pattern(path: str) -> str:
    """A module path with block and expert numbers as `*` (one row per kind of module)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def role_table(index) -> dict[str, list[str]]:
    """Role filter → the module path patterns it selects (block numbers as *)."""
    from .harness import roles

    return {role: sorted({_pattern(p) for p in paths}) for role, paths in roles(index).items() if paths}


def check_roles(subject: Subject) -> Result:
    """(e) Roles: the same on the directory and the live model; on a mixture of experts, @experts holds every
    routed expert layer and nothing else, a router scores at least every expert, and AS309 warns exactly
    when a spec adapts the attention but no expert."""
    from .harness import ModuleIndex, make_plan, parse_spec, roles

    live = ModuleIndex.from_module(subject.load())
    disk = ModuleIndex.from_model_dir(subject.model_dir)
    found, problems = roles(live), []
    if found != roles(disk):
        differing = sorted(r for r in found if found[r] != roles(disk)[r])
        problems.append(f"roles differ between the directory and the live model: {', '.join(differing)}")
    routed = {
        i.path
        for i in live
        if (i.family == "switch" or (i.family == "linear" and re.search(r"\.experts\.\d+\.", i.path)))
        and not re.search("shared", i.path, re.IGNORECASE)
        and not re.search(r"attn|attention", i.path.rsplit(".", 1)[0])  # deepseek_v41's grouped o_a_proj
    }
    if found["experts"] != routed:
        problems.append(f"@experts {sorted(found['experts'])[:2]} != routed expert layers {sorted(routed)[:2]}")
    for other in ("mlp", "attention", "shared_expert", "router"):
        if found["experts"] & found[other]:
            problems.append(f"@experts and @{other} overlap")
    counts = {i.num_experts for i in live if i.num_experts} | {
        len(live.children(i.path)) for i in live if i.name == "experts" and i.family == "list"
    }
    for path in sorted(found["router"]):  # a router may also score zero-computation experts (longcat_flash)
        if not counts or live[path].output_dims < min(counts):
            problems.append(f"router {path} has {live[path].output_dims} outputs, experts {sorted(counts)}")
    if routed and found["attention"]:
        warned = [d.code for d in make_plan(parse_spec("**@attention: lora(r=2)\n"), live).diagnostics]
        covered = [
            d.code for d in make_plan(parse_spec("**@attention: lora(r=2)\n**@experts: lora(r=2)\n"), live).diagnostics
        ]
        if "AS309" not in warned or "AS309" in covered:
            problems.append(f"AS309 on attention only: {'AS309' in warned}, with the experts: {'AS309' in covered}")
    table = role_table(live)
    detail = "; ".join(problems) or ", ".join(f"@{role} {len(paths)}" for role, paths in table.items())
    return Result(not problems, detail, {"roles": table, "moe": bool(routed)})


CHECKS = {
    "index": check_index,
    "plan": check_plans,
    "round_trip": check_round_trip,
    "fuse": check_fuse,
    "roles": check_roles,
    "mlx_lm_dirs": check_mlx_lm_dirs,
}
QUANTIZED_CHECKS = ("index", "plan", "round_trip")


def temp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="adapterspec-zoo-"))


if __name__ == "__main__":  # python -m tests.zoo.zoo ARCH MODEL_DIR QUANTIZATION_JSON: build one (see Subject.built)
    import sys

    arch, model_dir, quantization = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]) or None
    subject = Subject(arch, load_configs()[arch], model_dir.parent.parent, quantization)
    subject.root = model_dir.parent
    try:
        subject.build_here()
    except BaseException as e:  # noqa: BLE001
        print(f"FAILED {type(e).__name__}: {str(e)[:300]}")
        sys.exit(1)
    print("built")
