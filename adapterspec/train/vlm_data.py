"""Image–text training data for vision-language models, through mlx-vlm's own pieces: its dataset layout and
loader, its processor (`VisionDataset`), its batching (`iterate_vlm_batches`) and its loss (`vlm_sft_loss`);
the batch order is seeded, so that a resumed run replays it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import UserError

FORMAT_HELP = (
    'mlx-vlm\'s layout: jsonl lines of {"messages": [...], "images": [path]} (paths relative to the data directory)'
)


def load_vlm_datasets(options, model, processor) -> tuple:
    """(train, valid, test) as mlx-vlm's cached VisionDatasets (test None unless --test)."""
    from mlx_vlm.trainer.datasets.loading import CacheDataset, load
    from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset

    from .data import process_every_example

    data = options.data
    if not data or not Path(data).is_dir():
        raise UserError(f"{data}: no such data directory", help=FORMAT_HELP)
    try:
        splits = load(data)
    except ValueError as error:
        raise UserError(f"{data}: cannot load the dataset: {error}", help=FORMAT_HELP) from None
    settings = {"train_on_completions": options.mask_prompt, **options.dataset}
    out = []
    for name in ("train", "valid", "test"):
        rows = splits.get(name)
        if not rows or (name == "test" and not options.test):
            out.append(None)
            continue
        vision = VisionDataset(rows, model.config, processor, config=settings, base_path=rows.base_path)
        dataset = process_every_example(CacheDataset(vision, process=False), f"{data}/{name}.jsonl", FORMAT_HELP)
        if len(dataset) < options.batch_size:
            raise UserError(
                f"{data}: the {name} set has {len(dataset)} examples, fewer than the batch size {options.batch_size}"
            )
        out.append(dataset)
    if out[0] is None:
        raise UserError(f"{data}/train.jsonl: no training examples", help=FORMAT_HELP)
    return tuple(out)


def vlm_batches(
    dataset, batch_size: int, max_seq_length: int, loop: bool = False, seed: int = 0, comm_group=None
) -> Iterator[tuple]:
    """mlx-vlm's batches as 1-tuples (the training loop calls `loss(model, *batch)`): length-grouped, padded by
    the processor's pad token, shuffled from `seed` alone when `loop` (repeating), in order otherwise."""
    import mlx.core as mx
    from mlx_vlm.trainer.vlm.sft.runtime import iterate_vlm_batches

    world = comm_group or mx.distributed.init()
    for batch in iterate_vlm_batches(
        dataset,
        batch_size,
        max_seq_length,
        train=loop,
        pad_token_id=pad_token_id(dataset),
        rank=world.rank(),
        world_size=world.size(),
        seed=seed,
    ):
        yield (batch,)


def pad_token_id(dataset) -> int:
    processor = getattr(dataset, "processor", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if value is not None else 0


def vlm_loss(model, batch):
    """mlx-vlm's masked causal cross-entropy of a batch: (mean loss, supervised tokens), as the loop wants."""
    from mlx_vlm.trainer.vlm.sft.runtime import vlm_sft_loss

    loss, metrics = vlm_sft_loss(model, batch, train_on_completions="completion_mask" in batch)
    return loss, metrics["num_tokens"]
