"""A run's state put in place: a checkpoint restored, rank 0's state shared with every process, the RNG key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError


@dataclass
class StartState:
    """Where a run starts: step 0 (fresh) or a checkpoint's step, with any half-accumulated gradient."""

    step: int = 0
    grad_accum: Optional[dict] = None
    accum_tokens: object = None
    trained_tokens: int = 0


def from_rank0(tree, world):
    """`tree` as rank 0 holds it, on every process (the others' values are ignored)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    if world.size() == 1:
        return tree
    keep = world.rank() == 0
    return tree_map(lambda x: mx.distributed.all_sum(x if keep else mx.zeros_like(x), group=world, stream=mx.cpu), tree)


def rank0_outcome(error: Optional[UserError], world) -> None:
    """Raise on every process when rank 0 failed (`error` is rank 0's), so that no process waits forever."""
    import mlx.core as mx

    failed = 1 if error is not None else 0
    if world.size() > 1:
        failed = int(from_rank0(mx.array(failed), world).item())
    if error is not None:
        raise error
    if failed:
        raise UserError("rank 0 stopped the run (see its message)")


def rng_key():
    import mlx.core as mx

    return mx.random.state[0]


def set_rng_key(key) -> None:
    import mlx.core as mx

    high, low = (int(v) for v in key.tolist())
    mx.random.seed((high << 32) | low)


def put_weights(model, weights: dict, origin: str) -> None:
    """Load adapter weights into the model's trainable parameters, checking names and shapes."""
    from mlx.utils import tree_flatten

    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    problems = [f"'{k}' is not a trainable parameter" for k in weights if k not in expected]
    problems += [
        f"'{k}' has shape {tuple(v.shape)}, expected {expected[k]}"
        for k, v in weights.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if problems:
        raise UserError(
            f"{origin} does not fit the spec's adapters: " + "; ".join(problems[:3]),
            help="train with the spec and model these weights were made with",
        )
    model.load_weights(list(weights.items()), strict=False)


def restore(model, optimizer, checkpoint, plan) -> StartState:
    """Put a checkpoint's adapter weights, optimizer state and RNG key in place."""
    from mlx.utils import tree_flatten, tree_map_with_path

    from ..adapters.inits import trained_weights

    put_weights(model, trained_weights(plan, checkpoint.weights), str(checkpoint.path))
    saved = checkpoint.optimizer_state()
    current = dict(tree_flatten(optimizer.state))
    if set(saved) != set(current):
        raise UserError(
            f"{checkpoint.path}: its optimizer state does not fit this optimizer",
            help="resume with the optimizer the run started with",
        )
    optimizer.state = tree_map_with_path(lambda path, _: saved[path], optimizer.state)
    optimizer.init(model.trainable_parameters())
    set_rng_key(checkpoint.arrays["rng_key"])
    grads = checkpoint.grad_accum()
    grad_accum = tree_map_with_path(lambda path, _: grads[path], model.trainable_parameters()) if grads else None
    tokens = checkpoint.arrays.get("grad_accum_tokens") if grads else None
    return StartState(checkpoint.step, grad_accum, tokens, int(checkpoint.info.get("trained_tokens", 0)))


def resume(model, optimizer, out: Path, identity: dict, world, plan) -> StartState:
    """Rank 0 reads the newest checkpoint under out/ and checks it belongs to this run; every process gets its state."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from .checkpoint import differences, latest_checkpoint, remove_leftovers

    start, error = StartState(), None
    if world.rank() == 0:
        try:
            remove_leftovers(out)
            checkpoint = latest_checkpoint(out)
            changed = differences(checkpoint.info.get("trajectory", {}), identity)
            if changed:
                raise UserError(
                    f"{checkpoint.path} comes from a run with other settings: " + "; ".join(changed),
                    help="resume with the options of the interrupted run, or start over with --force",
                )
            start = restore(model, optimizer, checkpoint, plan)
        except UserError as failure:
            error = failure
    rank0_outcome(error, world)
    if world.size() == 1:
        return start
    header = from_rank0(mx.array([start.step, start.trained_tokens, int(start.grad_accum is not None)]), world).tolist()
    model.update(from_rank0(model.trainable_parameters(), world))
    optimizer.state = from_rank0(optimizer.state, world)
    optimizer.init(model.trainable_parameters())
    set_rng_key(from_rank0(rng_key(), world))
    grad_accum, tokens = None, None
    if header[2]:
        grad_accum = from_rank0(start.grad_accum or tree_map(mx.zeros_like, model.trainable_parameters()), world)
        tokens = from_rank0(start.accum_tokens if start.accum_tokens is not None else mx.array(0.0), world)
    mx.eval(model.parameters(), optimizer.state, grad_accum, tokens)
    return StartState(int(header[0]), grad_accum, tokens, int(header[1]))
