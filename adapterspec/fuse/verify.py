"""Whether a fused model keeps its adapters: the base, the adapted model (base + adapters) and the fused model run
on the same token sequences, and their next-token distributions compared.

Memory: one model at a time (the base is loaded, run, given its adapters and run again, then dropped before the
fused model is loaded), plus float32 logits of the sampled tokens: the base's, replaced sequence by sequence by the
adapted model's and its difference from the base (at most 2 × tokens × vocabulary × 4 bytes, plus one sequence's;
the default 512 tokens of a 32,000-token vocabulary: 131 MB).

The adapter's effect is measured on log-probabilities, where a constant shift of the logits means nothing: with
E = log p_adapted − log p_base and F = log p_fused − log p_base over every sampled position,
kept = ⟨F, E⟩ / ‖E‖² (the share of the adapter's effect the fused model shows) and
error = ‖F − E‖ / ‖E‖ (at 1 the fused model is no closer to the adapted one than the base is). These are the
erasure report's two measures, taken on the outputs instead of the weights, and judged by the same thresholds.
Two models whose logits differ nowhere by more than ROUNDING of the adapted model's largest logit are the same
model computed along another path (float32 rounding). A fused model that close to the adapted one keeps the
adapters ("ok"; "zero" where the base is that close too: fresh LoRA, or fresh PiSSA, whose whole effect is such
rounding, and which the two measures, judging noise against noise, called "partial"). Where the adapters change no
output at all there is nothing to keep, and a fused model that is not that close is "changed": the fuse moved it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .report import Survival, status_of

DEFAULT_SEQUENCES = 8
DEFAULT_LENGTH = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# The largest logit difference, relative to the largest logit, still taken for the same model: about 80 float32 steps
# (fresh PiSSA's W − A·B + A·B differs from W by about 1e-6); bfloat16 and float16 arithmetic differ by far more.
ROUNDING = 1e-5


@dataclass(frozen=True)
class Comparison:
    """A model's next-token distributions against the adapted model's, over every sampled position."""

    top1_agreement: float
    kl_mean: float
    kl_max: float
    max_abs_logit_diff: float
    reference_max_abs_logit: float = 0.0

    @property
    def within_rounding(self) -> bool:
        """The two models' logits differ by no more than float32 rounding."""
        return self.max_abs_logit_diff <= ROUNDING * max(1.0, self.reference_max_abs_logit)

    def to_json(self) -> dict:
        return {
            "top1_agreement": self.top1_agreement,
            "kl_mean": self.kl_mean,
            "kl_max": self.kl_max,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "within_rounding": self.within_rounding,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The fused and the base model against the adapted one, and how much of the adapter's effect the fused keeps."""

    sequences: int
    tokens: int
    source: str
    fused: Comparison
    base: Comparison
    kept: Optional[float]
    error: Optional[float]

    @property
    def status(self) -> str:
        """ok, partial or lost by the erasure report's thresholds, ok where the fused model is the adapted one within
        rounding (zero where the base is too), changed where the adapters change nothing and the fused model does."""
        if self.fused.within_rounding:
            return "zero" if self.base.within_rounding else "ok"
        if self.kept is None or self.base.within_rounding:
            return "changed"
        return status_of(Survival(self.kept, self.error))

    @property
    def keeps_adapter(self) -> bool:
        return self.status in ("ok", "zero")

    def to_json(self) -> dict:
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "tokens_from": self.source,
            "fused_vs_adapted": self.fused.to_json(),
            "base_vs_adapted": self.base.to_json(),
            "effect_kept": self.kept,
            "effect_error": self.error,
            "status": self.status,
        }

    def summary(self) -> str:
        if self.status in ("zero", "changed"):
            text = "the adapters change none of the sampled outputs"
            if self.base.max_abs_logit_diff > 0:
                text = "the adapters change the sampled outputs by float rounding at most"
            if self.status == "changed":
                text += f", but the fused model's differ (KL max {self.fused.kl_max:.3g}): changed"
            return text
        if self.fused.within_rounding:
            return "the fused model gives the adapted model's outputs within float rounding: ok"
        text = f"the fused model keeps {100 * self.kept:.0f}% of the adapter's effect on the log-probabilities"
        text += f" (error {self.error:.3g})"
        if self.fused.kl_mean >= self.base.kl_mean:
            text += "; it is no closer to the adapted model than the base is"
        return f"{text}: {self.status}"

    def render(self) -> str:
        from ..tables import format_table

        rows = [
            [
                name,
                f"{100 * c.top1_agreement:.1f}%",
                f"{c.kl_mean:.3g}",
                f"{c.kl_max:.3g}",
                f"{c.max_abs_logit_diff:.3g}",
            ]
            for name, c in (("fused", self.fused), ("base", self.base))
        ]
        headers = ["against the adapted model", "top-1 agreement", "KL mean", "KL max", "max |Δlogit|"]
        table = format_table(headers, rows, right={1, 2, 3, 4})
        where = f"{self.sequences} sequence(s), {self.tokens} tokens ({self.source})"
        return f"verify: {where}\n{table}\n{self.summary()}"


def sample_sequences(model_dir, sequences: int = DEFAULT_SEQUENCES, length: int = DEFAULT_LENGTH, seed: int = 0):
    """`sequences` token sequences of `length`, drawn uniformly from the tokenizer's vocabulary (the embedding's rows
    when the model has no tokenizer), with a seeded generator."""
    from ..adapters.loading import load_tokenizer
    from ..model.files import read_model_config, resolve_model_path

    model_dir = resolve_model_path(model_dir)
    vocab = _embedding_rows(read_model_config(model_dir))
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        try:
            words = len(load_tokenizer(model_dir).vocab)
            vocab = min(vocab, words) if vocab else words
        except (UserError, AttributeError, TypeError):
            pass
    if not vocab:
        raise UserError(f"{model_dir}: cannot tell the vocabulary size", help="give token sequences with --data")
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length).tolist() for _ in range(sequences)]


def check_verify_size(model_dir, sequences: int, length: int) -> None:
    """Refuse sequences longer than the model's context, or more tokens than half the memory of the device the
    models run on can hold: the logits kept (2 × tokens × vocabulary float32) and one sequence's attention scores
    (heads × length² float32, three copies while the softmax runs)."""
    from ..model.files import read_model_config, resolve_model_path

    config = read_model_config(resolve_model_path(model_dir))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    context = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    if isinstance(context, int) and 0 < context < length:
        raise UserError(
            f"--verify-length {length}: longer than the model's context ({context} tokens, max_position_embeddings)",
            help=f"give at most {context} (the default is {DEFAULT_LENGTH})",
        )
    heads = config.get("num_attention_heads") or text.get("num_attention_heads") or 1
    heads = heads if isinstance(heads, int) and heads > 0 else 1
    needed = 4 * (2 * sequences * length * max(_embedding_rows(config), 1) + 3 * heads * length * length)
    available = _device_memory()
    if available and needed > available // 2:
        raise UserError(
            f"verifying on {sequences} sequence(s) of {length} tokens needs about {needed / 1e9:.1f} GB for logits and "
            f"attention, more than half of the {available / 1e9:.1f} GB this machine's models run in",
            help=f"give fewer or shorter sequences (--verify-sequences, --verify-length; the default is "
            f"{DEFAULT_SEQUENCES} × {DEFAULT_LENGTH})",
        )


def _device_memory() -> int:
    """Bytes of memory the default device has: the GPU's where mlx reports it, else the machine's."""
    import os

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("memory_size", "total_memory"):  # Metal's, CUDA's
        if info.get(key):
            return int(info[key])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _embedding_rows(config: dict) -> int:
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return value if isinstance(value, int) and value > 0 else 0


def verify_fused(model_dir, adapter_dir, fused_dir, sequences: Sequence[Sequence[int]], source: str) -> VerifyReport:
    """Run base, adapted and fused model on `sequences` and compare them (one model in memory at a time)."""
    from ..adapters.loading import load_model
    from ..adapters.weights import load_adapters

    sequences = [list(s) for s in sequences if len(s) > 0]
    if not sequences:
        raise UserError("no token sequences to verify with", help="give more data, or drop --data to sample tokens")
    _check_same_kind(model_dir, fused_dir)
    model, config = load_model(model_dir)
    model.eval()
    forward = partial(_forward, _language_model(model, config))
    base = [forward(tokens) for tokens in sequences]
    load_adapters(model, adapter_dir)
    adapted, effect = [], []
    base_stats = _Stats()
    for i, tokens in enumerate(sequences):
        logits = forward(tokens)
        base_stats.add(logits, base[i])
        adapted.append(logits)
        effect.append(_log_probs(logits) - _log_probs(base[i]))
        mx.eval(effect[-1])
        base[i] = None  # the base's logits give way to the effect, sequence by sequence
    del model, base
    _release()
    fused_model, fused_config = load_model(fused_dir)
    fused_model.eval()
    forward = partial(_forward, _language_model(fused_model, fused_config))
    fused_stats = _Stats()
    along = miss = norm = 0.0
    for tokens, adapted_logits, e in zip(sequences, adapted, effect):
        logits = forward(tokens)
        if logits.shape != adapted_logits.shape:
            raise UserError(
                f"{fused_dir}: the fused model gives {logits.shape[-1]} logits per token, "
                f"the base {adapted_logits.shape[-1]}",
                help="give the directory that a fuse of these adapters into this base wrote",
            )
        fused_stats.add(adapted_logits, logits)
        f = _log_probs(logits) - _log_probs(adapted_logits) + e  # log p_fused − log p_base
        parts = mx.sum(f * e), mx.sum(mx.square(f - e)), mx.sum(e * e)
        mx.eval(*parts)
        along, miss, norm = along + parts[0].item(), miss + parts[1].item(), norm + parts[2].item()
    del fused_model
    _release()
    kept, error = (None, None) if norm == 0.0 else (along / norm, (miss / norm) ** 0.5)
    tokens = sum(len(s) for s in sequences)
    return VerifyReport(len(sequences), tokens, source, fused_stats.result(), base_stats.result(), kept, error)


def _check_same_kind(model_dir, fused_dir) -> None:
    """The fused directory holds a model of the base's architecture and vocabulary (a fuse keeps both)."""
    from ..model.files import read_model_config, resolve_model_path

    base, fused = (read_model_config(resolve_model_path(d)) for d in (model_dir, fused_dir))
    for what, of in (("model_type", lambda c: c.get("model_type")), ("vocab_size", _embedding_rows)):
        if of(base) != of(fused):
            raise UserError(
                f"{fused_dir}: {what} {of(fused)!r}, the base {model_dir} has {of(base)!r}",
                help="give the directory that a fuse of these adapters into this base wrote",
            )


def _language_model(model, config: dict):
    """What maps tokens to logits: the model, or a vision-language model's language model (text alone)."""
    from ..adapters.loading import vision_language

    return model.language_model if vision_language(model, config) else model


def _forward(model, tokens: list[int]) -> mx.array:
    output = model(mx.array(tokens)[None])
    logits = getattr(output, "logits", output).astype(mx.float32)[0]  # mlx-vlm's language models wrap their logits
    mx.eval(logits)
    return logits


def _log_probs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class _Stats:
    """Top-1 agreement, KL(reference ‖ other) and the largest logit difference, accumulated over sequences."""

    def __init__(self):
        self.agree = self.count = 0
        self.kl_sum, self.kl_max, self.diff_max, self.scale = 0.0, 0.0, 0.0, 0.0

    def add(self, reference: mx.array, other: mx.array) -> None:
        log_p, log_q = _log_probs(reference), _log_probs(other)
        kl = mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)
        agree = mx.sum(mx.argmax(reference, axis=-1) == mx.argmax(other, axis=-1))
        diff, scale = mx.max(mx.abs(reference - other)), mx.max(mx.abs(reference))
        mx.eval(kl, agree, diff, scale)
        self.agree += agree.item()
        self.count += kl.size
        self.kl_sum += mx.sum(kl).item()
        self.kl_max = max(self.kl_max, mx.max(kl).item())
        self.diff_max = max(self.diff_max, diff.item())
        self.scale = max(self.scale, scale.item())

    def result(self) -> Comparison:
        # A KL below zero is rounding (the two distributions are the same): report 0.
        mean = max(self.kl_sum / self.count, 0.0)
        return Comparison(self.agree / self.count, mean, max(self.kl_max, 0.0), self.diff_max, self.scale)


def _release() -> None:
    gc.collect()
    mx.clear_cache()


def adapter_directory(origin: Path) -> Path:
    """The adapter directory to verify with; a fuse from a plan in memory has none."""
    if not Path(origin).is_dir():
        raise UserError("--verify needs an adapter directory", help="save the adapters, then fuse with --verify")
    return Path(origin)
