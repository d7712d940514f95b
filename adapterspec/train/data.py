"""Training data through mlx-lm's loaders and batcher, with a private, seeded data order that can be replayed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import types
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError

FORMATS_HELP = 'the formats are mlx-lm\'s: jsonl lines of {"text"}, {"prompt", "completion"} or {"messages"}'


SPLITS = ("train", "valid", "test")
# The record layouts mlx-lm's loaders read (its default feature names), in the order it prefers them: a split is read
# in the layout of its first example.
LAYOUTS = ({"prompt", "completion"}, {"messages"}, {"text"})
MAX_LINE_BYTES = 64 << 20
# A batch is padded for the attention's tile (below) only where that adds at most this share of its inputs.
MAX_ATTENTION_PADDING = 1 / 16
# The sequence lengths whose attention MLX's CUDA backend differentiates with its fused kernel are multiples of this.
CUDA_ATTENTION_TILE = 128


def check_local_data(directory: Path, options) -> None:
    """Each split file of a local data directory: a regular file of JSON objects in one of mlx-lm's layouts,
    checked line by line so that a problem is named by file and line (train.jsonl must exist and hold examples)."""
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory", help="give a directory with train.jsonl and valid.jsonl")
    custom_features = any(key.endswith("_feature") for key in options.dataset)
    for split in SPLITS:
        path = directory / f"{split}.jsonl"
        if not path.exists() and not path.is_symlink():
            if split == "train":
                raise UserError(f"{path}: no such file", help="the training data is train.jsonl in the data directory")
            continue
        examples = _check_jsonl(path, custom_features)
        if split == "train" and examples == 0:
            raise UserError(f"{path}: the training set is empty", help=FORMATS_HELP)


def _check_jsonl(path: Path, custom_features: bool) -> int:
    from ..inputs import open_regular

    examples, first = 0, None
    with open_regular(path) as file:
        for number, raw in enumerate(file, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(f"{path}:{number}: the line is longer than {MAX_LINE_BYTES >> 20} MiB")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as error:
                raise UserError(f"{path}:{number}: not a line of JSON ({error})", help=FORMATS_HELP) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not an object", help=FORMATS_HELP)
            if not custom_features:
                layout = next((layout for layout in LAYOUTS if layout <= record.keys()), None)
                if layout is None:
                    fields = ", ".join(sorted(record)) or "none"
                    raise UserError(
                        f"{path}:{number}: none of mlx-lm's layouts (its fields: {fields})", help=FORMATS_HELP
                    )
                if first is None:
                    first = (layout, number)
                elif layout != first[0]:
                    raise UserError(
                        f"{path}:{number}: a {_layout_name(layout)} example in a file whose first example (line "
                        f"{first[1]}) is {_layout_name(first[0])}",
                        help="mlx-lm reads every example of a file in the layout of its first: "
                        "put each layout in a data directory of its own",
                    )
                _check_fields(path, number, record, layout)
            examples += 1
    return examples


def _layout_name(layout: set) -> str:
    return "{" + ", ".join(f'"{name}"' for name in sorted(layout, reverse=True)) + "}"


def _check_fields(path: Path, number: int, record: dict, layout: set) -> None:
    """The values mlx-lm's datasets tokenize: text, prompt and completion strings; messages a list of objects."""
    for name in sorted(layout):
        value = record[name]
        if name == "messages":
            if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
                raise UserError(
                    f'{path}:{number}: "messages" is not a list of message objects',
                    help='give [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]',
                )
        elif not isinstance(value, str):
            raise UserError(
                f'{path}:{number}: "{name}" is a JSON {type(value).__name__}, not a string', help=FORMATS_HELP
            )
        elif name == "text" and not value.strip():
            raise UserError(f'{path}:{number}: "text" is empty', help="remove the line, or give it text to train on")


def _read_examples(path: Path) -> tuple[list, list]:
    """The JSON objects of a split file that `check_local_data` accepted (blank lines skipped), and their lines."""
    if not path.is_file():
        return [], []
    with open(path, "rb") as file:
        numbered = [(number, raw) for number, raw in enumerate(file, start=1) if raw.strip()]
    return [json.loads(raw.decode("utf-8")) for _, raw in numbered], [number for number, _ in numbered]


def load_datasets(options, tokenizer) -> tuple:
    """(train, valid, test) as mlx-lm's CacheDatasets, every example processed (None for a split without examples,
    and for test unless --test)."""
    from mlx_lm.tuner.datasets import load_dataset

    from ..model.files import HF_REPO_ID

    data = options.data or _dataset_name(options.dataset.get("hf_dataset"))
    local = bool(options.data) and Path(options.data).exists()
    remote = options.dataset.get("hf_dataset") or (
        data and not local and HF_REPO_ID.match(data) and not data.startswith((".", "/", "~"))
    )
    if not local and not remote:
        raise UserError(
            f"{data}: no such data directory",
            help="give a directory with train.jsonl and valid.jsonl (and test.jsonl for --test)",
        )
    args = types.SimpleNamespace(
        data=options.data, train=True, test=options.test, mask_prompt=options.mask_prompt, **options.dataset
    )
    from_files = local and not options.dataset.get("hf_dataset")
    lines = (None, None, None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if from_files:
                (train, valid, test), lines = _load_local(Path(data), tokenizer, args)
            else:
                train, valid, test = load_dataset(args, tokenizer)
    except (ValueError, KeyError) as error:
        raise UserError(f"{data}: cannot load the dataset: {error}", help=FORMATS_HELP) from None
    except Exception as error:
        if local:
            raise
        raise UserError(
            f"{data}: not a local directory, and loading it as a Hugging Face dataset failed: {error}"
        ) from None
    if len(train) < options.batch_size:
        raise UserError(
            f"{data}: the training set has {len(train)} examples, fewer than the batch size {options.batch_size}"
        )
    if len(valid) and len(valid) < options.batch_size:
        raise UserError(
            f"{data}: the validation set has {len(valid)} examples, fewer than the batch size {options.batch_size}"
        )
    if options.test and len(test) < options.batch_size:
        raise UserError(
            f"{data}: the test set has {len(test)} examples, fewer than the batch size {options.batch_size}"
        )
    return tuple(
        _processed(split, f"{data}/{name}.jsonl" if from_files else f"{data} ({name} split)", numbers)
        if len(split) and (name != "test" or options.test)
        else None
        for name, split, numbers in zip(SPLITS, (train, valid, test), lines)
    )


def _dataset_name(hf_dataset) -> Optional[str]:
    """How to name a config's hf_dataset (one, or a list of them) in messages."""
    entries = hf_dataset if isinstance(hf_dataset, list) else [hf_dataset] if hf_dataset else []
    names = [str(e.get("path") or e.get("name")) if isinstance(e, dict) else str(e) for e in entries]
    return ", ".join(names) or None


def _processed(dataset, where: str, lines: Optional[list]):
    """mlx-lm's CacheDataset of a split with every example processed (tokenized, its chat template applied) now."""
    from mlx_lm.tuner.datasets import CacheDataset

    return process_every_example(CacheDataset(dataset), where, FORMATS_HELP, lines)


def process_every_example(dataset, where: str, help: str, lines: Optional[list] = None):
    """`dataset` after indexing each of its examples once, as mlx-lm's and mlx-vlm's batching do at the first batch
    (their caches keep them): an example that cannot be processed is named here, not in the middle of a step."""
    for index in range(len(dataset)):
        try:
            dataset[index]
        except Exception as error:  # whatever the processing (tokenizer, chat template, image reader) raises
            line = f" (line {lines[index]})" if lines else ""
            raise UserError(
                f"{where}: example {index + 1}{line} cannot be processed: {type(error).__name__}: {error}", help=help
            ) from None
    return dataset


def _load_local(directory: Path, tokenizer, args) -> tuple:
    """mlx-lm's datasets of a local directory's splits, as its loader makes them, except that blank lines are
    skipped and a split file without examples counts as absent (mlx-lm's loader fails on both); and each split's
    line numbers."""
    from mlx_lm.tuner.datasets import create_dataset

    splits = [_read_examples(directory / f"{split}.jsonl") for split in SPLITS]
    if not splits[0][0]:
        raise UserError(f"{directory / 'train.jsonl'}: the training set is empty", help=FORMATS_HELP)
    datasets = tuple(create_dataset(examples, tokenizer, args) if examples else [] for examples, _ in splits)
    return datasets, tuple(lines for _, lines in splits)


def data_fingerprint(data: Optional[str]) -> Optional[str]:
    """sha256 of a local train.jsonl, so that a resumed run can tell the data changed."""
    path = Path(data or "") / "train.jsonl"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seeded_batches(
    dataset, batch_size: int, max_seq_length: int, loop: bool = False, seed: int = 0, comm_group=None
) -> Iterator:
    """mlx-lm's `iterate_batches`, drawing its shuffles from a private numpy RNG seeded with `seed`.

    mlx-lm shuffles with numpy's global RNG, which evaluation draws from too; a private RNG makes the
    order depend on the seed alone, so a resumed run can replay it.
    """
    import numpy as np
    from mlx_lm.tuner.trainer import iterate_batches

    private = np.random.RandomState(seed).get_state()
    batches = iterate_batches(dataset, batch_size, max_seq_length, loop=loop, comm_group=comm_group)
    multiple = attention_multiple()
    while True:
        outer = np.random.get_state()
        np.random.set_state(private)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            private = np.random.get_state()
            np.random.set_state(outer)
        yield padded_for_attention(*batch, multiple) if multiple else batch


def attention_multiple() -> int:
    """ADAPTERSPEC_TRAIN_PAD_ATTENTION: the multiple of tokens the model's inputs are padded to; `auto`, the default,
    is 128 where MLX runs on a CUDA GPU and 0 (none) elsewhere.

    MLX's CUDA backend differentiates attention with cuDNN's fused kernel only where the sequence is a multiple of
    128; other lengths (mlx-lm's batches give 1023 inputs at max_seq_length 1024) recompute attention unfused, every
    score in memory, in the backward. On the CPU and on Metal attention's backward is never fused: padding buys
    nothing there."""
    value = os.environ.get("ADAPTERSPEC_TRAIN_PAD_ATTENTION", "auto").strip()
    if value == "auto":
        return CUDA_ATTENTION_TILE if _on_cuda() else 0
    if not value.isdigit():
        raise UserError(
            f"ADAPTERSPEC_TRAIN_PAD_ATTENTION={value!r}: not a whole number",
            help="give a multiple such as 128, 0 for none, or auto (128 on a CUDA GPU)",
        )
    return int(value)


def _on_cuda() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


def padded_for_attention(batch, lengths, multiple: int):
    """mlx-lm's (batch, lengths) with padding columns appended so that the model's inputs (all columns but the last)
    are a multiple of `multiple` long, where that adds at most MAX_ATTENTION_PADDING of them. Under a causal mask no
    earlier position sees the new ones, and the loss's mask stays what it was: a length is at most the old number of
    inputs (mlx-lm's mask takes targets up to the length, which a batch cut to its width stops at the last column)."""
    import mlx.core as mx

    inputs = batch.shape[1] - 1
    extra = -inputs % multiple
    if extra == 0 or extra > inputs * MAX_ATTENTION_PADDING:
        return batch, lengths
    padding = mx.zeros((batch.shape[0], extra), batch.dtype)
    kept = mx.concatenate([lengths[:, :1], mx.minimum(lengths[:, 1:], inputs)], axis=1)
    return mx.concatenate([batch, padding], axis=1), kept


def skip(batches: Iterator, count: int) -> Iterator:
    """`batches` after its first `count` items (warnings about long examples are not repeated)."""
    with contextlib.redirect_stdout(io.StringIO()):
        for _ in range(count):
            next(batches)
    return batches
