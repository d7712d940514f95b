"""Fuse trained adapters into a model directory, streaming tensor by tensor with bounded memory, written atomically.

No model class is built: each adapted module's weight is read, dequantized, merged (with `fusemath` in
mlx on the GPU where there is one; on the CPU plain LoRA on worker processes and the rest in mlx, the
same bits), requantized and written, while untouched tensors are copied byte for byte. Before anything is
written, every fused module is measured for how much of its adapter survives being stored
(`erasure`); `strict` refuses a fuse that loses most of an adapter, `keep_precision="auto"`
stores such modules unquantized instead.

An interrupted fuse leaves nothing at the output path. A process killed outright (SIGKILL) can leave
a hidden `.OUT.tmp-*` directory beside it; the next fuse to the same output removes it once the
process that made it is gone.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..errors import EXIT_ERRORS, UserError
from ..model.files import CONFIG_FILE, WEIGHT_INDEX_FILE, copy_model_side_files, side_files
from ..outputs import atomic_output_dir, check_output_dir, remove_stale_temporaries
from .adapter_source import AdapterSource
from .plan import MAX_SHARD_BYTES, FusePlan, Shard, plan_fuse
from .progress import Progress
from .report import ErasureReport, build_report, describe_lost, modules_to_keep_dense
from .workers import worker_count

KEEP_PRECISION = ("never", "auto", "fit")


class ErasureError(UserError):
    """--strict: some module would lose most of its adapter; nothing was written."""

    def __init__(self, report: ErasureReport):
        lost = report.lost
        if any(m.requantized for m in lost):
            help_text = (
                "write those modules unquantized with --keep-precision auto, or the whole model with --dequantize"
            )
        else:
            help_text = "their change is below the precision of the weights' dtype; check the adapter's scale"
        super().__init__(
            f"{len(lost)} module(s) would {describe_lost()}, e.g. '{lost[0].path}' keeps "
            f"{_percent(lost[0].kept)} with error {_error(lost[0].error)} as {lost[0].stored}; nothing was written",
            help=help_text,
            exit_code=EXIT_ERRORS,
        )
        self.report = report


class VerifyError(UserError):
    """--verify --strict: the fused model does not keep the adapters' effect; nothing was written."""

    def __init__(self, report, erasure: ErasureReport):
        super().__init__(
            f"{report.summary()}; nothing was written",
            help="fuse with --keep-precision auto or fit, or --dequantize, and verify again",
            exit_code=EXIT_ERRORS,
        )
        self.report = report
        self.erasure = erasure


@dataclass
class FuseResult:
    """What a fuse wrote and what it measured."""

    output: Path
    plan: FusePlan
    report: ErasureReport
    shards: list[Shard]
    kept_dense: list[str] = field(default_factory=list)
    removed_stale: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    # Peak resident memory of each worker process that merged modules in numpy (none: no workers ran).
    worker_peak_rss: list[int] = field(default_factory=list)
    # --verify: the fused model against the adapted one (a fuse.verify.VerifyReport), None when not asked.
    verified: Optional[object] = None

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.shards)


def fuse_model_dir(
    model_dir,
    adapters,
    out_dir,
    *,
    dequantize: bool = False,
    requantization: str = "grid",
    keep_precision: str = "never",
    strict: bool = False,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Optional[Progress] = None,
    protect: Iterable = (),
    verify: Optional[tuple[list, str]] = None,
    device: str = "auto",
) -> FuseResult:
    """Merge `adapters` (an adapter directory, or a plan.AdapterSource) into the model at `model_dir` and write
    the model to `out_dir`.

    `dequantize` writes every weight unquantized; `requantization` is "grid" (each quantization group stays on the
    input's own grid where it fits it, so a group the adapter does not move keeps its bits) or "plain" (every group
    requantized afresh, as mlx-lm's fuse does); `keep_precision="auto"` writes unquantized only the
    fused modules that requantization would strip of most of their adapter (per-module entries in
    the config's `quantization`), `keep_precision="fit"` stores each of them in the cheapest finer affine
    quantization that keeps its adapter instead (dense where none does); `strict` raises ErasureError instead of writing when a module
    would still lose most of its adapter. Refuses to write into the inputs (and into `protect`) or
    over a non-empty `out_dir` unless `force`. `verify` (token sequences, where they come from) runs the
    adapted and the fused model on them before the output is published (`fuse.verify`); with `strict`, a
    fused model that does not keep the adapters' effect raises VerifyError and nothing is written. `device`
    ("auto", "gpu", "cpu") says where the merges run (`merge.resolve_device`); the files are the same within the
    tolerance `docs/benchmarks.md` states.
    """
    started = time.monotonic()
    if keep_precision not in KEEP_PRECISION:
        raise UserError(f"keep_precision must be one of {', '.join(KEEP_PRECISION)}, not {keep_precision!r}")
    worker_count()  # a bad ADAPTERSPEC_FUSE_WORKERS is refused before any work
    from .merge import resolve_device

    options = dict(
        dequantize=dequantize, requantization=requantization, keep_precision=keep_precision, strict=strict, force=force,
        max_shard_bytes=max_shard_bytes, progress=progress, protect=tuple(protect), verify=verify,
        device=resolve_device(device),
    )  # fmt: skip
    try:
        result = _fuse(model_dir, adapters, out_dir, check_meanwhile=True, **options)
    except _SavedPlanDiffers as differs:  # an edited scale or rows in the saved plan: the spec's plan decides, as ever
        result = _fuse(model_dir, differs.spec_source, out_dir, check_meanwhile=False, **options)
    result.seconds = time.monotonic() - started
    return result


class _SavedPlanDiffers(Exception):
    """The adapter directory's saved plan, which the fuse ran from, is not its spec's plan in scale or rows."""

    def __init__(self, spec_source: AdapterSource):
        super().__init__("the saved plan differs from the spec's plan")
        self.spec_source = spec_source


def _fuse(model_dir, adapters, out_dir, *, dequantize, requantization, keep_precision, strict, force, max_shard_bytes,
          progress, protect, verify, device, check_meanwhile) -> FuseResult:  # fmt: skip
    """fuse_model_dir's work; with `check_meanwhile`, an adapter directory's spec is checked against its saved plan on
    a process of its own while the fuse runs from the saved plan, and waited for before the output is published."""
    plan = plan_fuse(
        model_dir, adapters, dequantize=dequantize, requantization=requantization, check_meanwhile=check_meanwhile
    )
    out = Path(out_dir).expanduser()
    inputs = [plan.model_dir, plan.adapters.origin, *protect]
    produces = fused_model_files(plan.model_dir)
    with plan.adapters.spec_check_first():  # an error here is reported after the check's, as when it came first
        check_output_dir(out, force=force, protect=inputs, produces=produces)
        removed = remove_stale_temporaries(out)
        from .erasure import measure_meanwhile
        from .shards import SourceFiles
        from .stream import merge_workers_for, write_shards

        with atomic_output_dir(out, force=force, protect=inputs, produces=produces) as tmp:
            # Started first, the worker processes (for the numpy merges) get ready while the adapters load. How much of
            # each adapter survives is measured on a thread while the shards are written, unless it decides what is.
            with SourceFiles() as files, merge_workers_for(plan.units, device) or nullcontext() as workers, \
                    _mlx_device(device):  # fmt: skip
                adapters = _load_adapter_arrays(plan)
                measuring = measure_meanwhile(plan, adapters, files)
                try:
                    if strict or keep_precision != "never":  # the measurements decide what is written
                        report, kept_dense, shards = _decide(plan, measuring.result(), adapters, files,
                                                             keep_precision, strict, max_shard_bytes)  # fmt: skip
                        write_shards(shards, adapters, files, tmp, progress, workers=workers, device=device)
                    else:  # measured while the shards are written
                        shards, kept_dense = plan.shards(max_shard_bytes), []
                        write_shards(shards, adapters, files, tmp, progress, workers=workers, device=device)
                        report = build_report(plan, measuring.result())
                finally:
                    measuring.wait()
            spec_source = plan.adapters.checked()  # the spec check's error, if any, is raised here
            if spec_source is not None:
                raise _SavedPlanDiffers(spec_source)
            _write_json(tmp / WEIGHT_INDEX_FILE, plan.index_json(shards))
            _write_json(tmp / CONFIG_FILE, plan.output_config())
            copy_model_side_files(plan.model_dir, tmp)
            verified = None
            if verify is not None:
                from .verify import adapter_directory, verify_fused

                sequences, source = verify
                verified = verify_fused(plan.model_dir, adapter_directory(plan.adapters.origin), tmp, sequences, source)
                if strict and not verified.keeps_adapter:
                    raise VerifyError(verified, report)
    peaks = workers.peak_rss if workers is not None else []
    return FuseResult(out, plan, report, shards, kept_dense, removed, 0.0, peaks, verified)


def _decide(plan: FusePlan, measurements, adapters, files, keep_precision: str, strict: bool, max_shard_bytes: int):
    """The report, the modules kept dense and the shards, where the measurements decide what is written."""
    from .erasure import fit

    kept_dense = modules_to_keep_dense(plan, measurements) if keep_precision == "auto" else []
    if keep_precision == "fit":
        finer, kept_dense, measurements = fit(plan, adapters, files, measurements)
        plan.store_as(finer)
    plan.keep_dense(kept_dense)
    report = build_report(plan, measurements)
    if strict and report.lost:
        raise ErasureError(report)
    return report, kept_dense, plan.shards(max_shard_bytes)


@contextmanager
def _mlx_device(device: str) -> Iterator[None]:
    """mlx's default device during the fuse: the GPU for "gpu", else the CPU (where the worker processes merge
    every unit, the little mlx work left then never starts a GPU, which costs start-up time and 600 MB on CUDA)."""
    import mlx.core as mx

    if device == "gpu":
        yield
        return
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(previous)


def _load_adapter_arrays(plan: FusePlan) -> dict:
    """The low-rank adapter tensors, loaded and evaluated (`full` replacements are copied from the file instead)."""
    import mlx.core as mx

    from ..adapters.weights import read_weights

    names = {source.name for unit in plan.fused_units for source in unit.adapter_tensors.values()}
    loaded = read_weights(plan.adapters.weights)  # every tensor finite, `full` replacements too
    if not names:
        return {}
    arrays = {name: loaded[name] for name in names}
    mx.eval(list(arrays.values()))
    return arrays


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def _percent(value: Optional[float]) -> str:
    return "nothing" if value is None else f"{100 * value:.0f}%"


def _error(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3g}"


def fused_model_files(model_dir: Path) -> list[str]:
    """What a fuse of this model writes: config, weights and their index, and the model's side files."""
    return [CONFIG_FILE, WEIGHT_INDEX_FILE, "model.safetensors", "model-*-of-*.safetensors", *side_files(model_dir)]
