"""What several subcommands print alike: a plan as tables (`plan`, `apply`), what a finished fuse did (`fuse`,
`apply --fuse`), and the tokens a fused model is verified on (`fuse --verify`, `verify`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..inputs import open_regular
from ..tables import format_table


def is_parameter_free_leaf(info) -> bool:
    """RoPE, activations: listed by a live model, absent from a model directory's headers, never adapted."""
    return info.family == "leaf" and info.num_params == 0


def rule_rows(plan) -> list[list[object]]:
    rows = []
    for outcome in plan.outcomes:
        rule = outcome.rule
        entries = [e for e in plan.entries if e.rule_index == rule.index]
        kinds = sorted({e.adapter for e in entries}) or ([rule.transform.kind] if outcome.decided else ["—"])
        rows.append(
            [
                rule.span.line,
                rule.text,
                sum(1 for path in outcome.matched if not is_parameter_free_leaf(plan.index[path])),
                len(outcome.decided),
                ", ".join(kinds),
                rule.transform.describe(),
                f"{sum(e.trainable for e in entries):,}",
            ]
        )
    return rows


def module_rows(plan) -> list[list[object]]:
    return [
        [
            e.path,
            e.base,
            e.adapter,
            e.r if e.r is not None else "",
            f"{e.scale:g}" if e.scale is not None else "",
            f"{e.dropout:g}" if e.dropout is not None else "",
            f"{e.trainable:,}",
            e.rule_span.line,
        ]
        for e in plan.entries
    ]


def render(plan, verbose: bool) -> str:
    from ..model.adapter_format import saved_plan
    from ..model.mlxlm import mlx_lm_config
    from ..model.vlm import is_vlm_index, mlx_vlm_config

    out = [
        format_table(
            ["line", "rule", "matched", "decides", "adapter", "transform", "trainable"],
            rule_rows(plan),
            right=(0, 2, 3, 6),
        )
    ]
    if verbose:
        out += [
            "",
            format_table(
                ["module", "base", "adapter", "r", "scale", "dropout", "trainable", "rule"],
                module_rows(plan),
                right=(3, 4, 5, 6, 7),
            ),
        ]
    total, trainable = plan.total_parameters, plan.trainable_parameters
    share = 100.0 * trainable / total if total else 0.0
    out += ["", f"{len(plan.entries)} modules adapted; trainable parameters: {trainable:,} of {total:,} ({share:.3f}%)"]
    saved = saved_plan(plan)  # what the adapter directory holds (PiSSA / OLoRA: rank 2r on the original weights)
    fit = mlx_lm_config(saved, plan.index)
    if saved is not plan:
        out.append("pissa/olora adapters are saved as plain LoRA of twice their rank on the original weights")
    if fit.compatible:
        params = fit.config["lora_parameters"]
        out.append(
            f"mlx-lm compatible: yes (fine_tune_type={fit.config['fine_tune_type']}, "
            f"num_layers={fit.config['num_layers']}, rank={params['rank']}, keys={len(params['keys'])})"
        )
    elif is_vlm_index(plan.index):
        vlm_fit = mlx_vlm_config(plan)
        if vlm_fit.compatible:
            params = vlm_fit.config["lora_parameters"]
            out.append(
                f"mlx-vlm compatible: yes (fine_tune_type={vlm_fit.config['fine_tune_type']}, "
                f"rank={params['rank']}, keys={len(params['keys'])})"
            )
        else:
            out.append("mlx-vlm compatible: no — " + "; ".join(vlm_fit.reasons))
            out.append("  (adapterspec.load_adapters and 'adapterspec fuse' still read these adapters)")
    else:
        out.append("mlx-lm compatible: no — " + "; ".join(fit.reasons))
        out.append("  (adapterspec.load_adapters and 'adapterspec fuse' still read these adapters)")
    return "\n".join(out)


def print_outcome(result, output: str) -> None:
    """What a finished fuse did: notes, lost adapters with what to do, and the files written (stderr)."""
    for note in result.plan.notes:
        print(f"note: {note}", file=sys.stderr)
    for path in result.removed_stale:
        print(f"removed {path}, left by an interrupted fuse", file=sys.stderr)
    lost = result.report.lost
    if lost:
        from ..fuse.report import describe_lost

        print(
            f"warning: {len(lost)} module(s) {describe_lost()}, e.g. '{lost[0].path}' as {lost[0].stored}",
            file=sys.stderr,
        )
        if any(m.requantized for m in lost):
            print(
                "  help: --keep-precision auto stores them unquantized; --strict makes this an error", file=sys.stderr
            )
        else:
            print(
                "  help: their change is below the precision of the weights' dtype; check the adapter's scale",
                file=sys.stderr,
            )
    verified = getattr(result, "verified", None)
    if verified is not None and not verified.keeps_adapter:
        print(f"warning: verify: {verified.summary()}", file=sys.stderr)
        print("  help: --keep-precision fit or auto keeps it; --strict makes this an error", file=sys.stderr)
    finer = [unit for unit in result.plan.units if getattr(unit, "stored_quantization", None) and unit.requantize]
    if finer:
        print(
            f"stored {len(finer)} module(s) in a finer quantization so that their adapter survives, e.g. "
            f"'{finer[0].path}' as {finer[0].output_description}",
            file=sys.stderr,
        )
    if result.kept_dense:
        print(f"kept {len(result.kept_dense)} module(s) unquantized so that their adapter survives", file=sys.stderr)
    shards = len(result.shards)
    replaced = sum(1 for m in result.plan.adapters.modules if m.kind == "full")
    what = f"{len(result.plan.fused_units)} adapter(s)" + (
        f" and {replaced} fully trained module(s)" if replaced else ""
    )
    print(
        f"fused {what} into {output}: {shards} weight file{'s' * (shards != 1)}, "
        f"{result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s",
        file=sys.stderr,
    )


def add_verify_arguments(parser, data_flag: str) -> None:
    """The options that choose the token sequences a fused model is verified on (`fuse --verify`, `verify`)."""
    from ..fuse.verify import DEFAULT_LENGTH, DEFAULT_SEQUENCES

    parser.add_argument(
        data_flag, dest="verify_data", metavar="PATH",
        help="verify on text from a jsonl file or a data directory in mlx-lm's layouts (valid.jsonl, else test, "
        "else train) instead of tokens sampled from the vocabulary",
    )  # fmt: skip
    parser.add_argument(
        "--verify-sequences", type=_positive, default=DEFAULT_SEQUENCES, metavar="N",
        help=f"how many token sequences (default {DEFAULT_SEQUENCES})",
    )  # fmt: skip
    parser.add_argument(
        "--verify-length", type=_positive, default=DEFAULT_LENGTH, metavar="N",
        help=f"tokens per sequence, at most (default {DEFAULT_LENGTH})",
    )  # fmt: skip
    parser.add_argument("--verify-seed", type=_seed, default=0, metavar="N", help="seed of the sampled tokens")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


def verify_sequences(args, model: str) -> tuple[list, str]:
    """(token sequences, where they come from) for verifying a fuse of `model`."""
    from ..fuse.verify import check_verify_size, sample_sequences

    check_verify_size(model, args.verify_sequences, args.verify_length)
    if args.verify_data:
        return data_sequences(Path(args.verify_data), model, args.verify_sequences, args.verify_length)
    sequences = sample_sequences(model, args.verify_sequences, args.verify_length, args.verify_seed)
    return sequences, "sampled from the vocabulary"


def data_sequences(path: Path, model: str, count: int, length: int) -> tuple[list, str]:
    """The first `count` records of a jsonl file in one of mlx-lm's layouts, tokenized and cut to `length`."""
    import json

    from ..adapters.loading import load_tokenizer
    from ..train.data import FORMATS_HELP, LAYOUTS, MAX_LINE_BYTES

    if path.is_dir():
        found = [path / f"{split}.jsonl" for split in ("valid", "test", "train") if (path / f"{split}.jsonl").is_file()]
        if not found:
            raise UserError(f"{path}: no valid.jsonl, test.jsonl or train.jsonl there", help=FORMATS_HELP)
        path = found[0]
    tokenizer = load_tokenizer(model)
    sequences = []
    with open_regular(path) as file:
        for number, raw in enumerate(file, start=1):
            if len(sequences) == count:
                break
            if len(raw) > MAX_LINE_BYTES or not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as error:
                raise UserError(f"{path}:{number}: not a line of JSON ({error})", help=FORMATS_HELP) from None
            if not isinstance(record, dict) or not any(layout <= record.keys() for layout in LAYOUTS):
                raise UserError(f"{path}:{number}: none of mlx-lm's layouts", help=FORMATS_HELP)
            tokens = _record_tokens(record, tokenizer)
            if tokens:
                sequences.append(list(tokens)[:length])
    if not sequences:
        raise UserError(f"{path}: no examples to verify with", help=FORMATS_HELP)
    return sequences, str(path)


def _record_tokens(record: dict, tokenizer) -> list:
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=True)
    if "text" in record:
        return tokenizer.encode(str(record["text"]))
    return tokenizer.encode(str(record["prompt"]) + str(record["completion"]))


def _seed(text: str) -> int:
    from .common import seed  # the spec reading there loads the parser: only when a seed is given

    return seed(text)
