"""Write the example dataset (train/valid/test.jsonl, prompt-completion pairs) deterministically.

Run `python examples/data/make_data.py` to (re)write the three files next to this script. The
texts use the words the tiny example models' tokenizer was trained on (counting, repeating and
answering short questions), so that a few hundred steps of LoRA visibly lower the loss.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
SIZES = {"train": 400, "valid": 48, "test": 48}

PHRASES = [
    "the quick brown fox jumps over the lazy dog",
    "adapters change a few modules of a large model",
    "the rest stays frozen",
    "the plan shows the result",
    "the loss went down a little",
    "every rule of a spec names modules by their path",
    "quantized layers keep their packed weights",
    "each expert is a small MLP",
    "tokenizers split text into pieces",
    "the optimizer took a step",
]
FACTS = {
    "what changes a few modules": "adapters",
    "what stays frozen": "the rest",
    "what shows the result": "the plan",
    "what jumps over the lazy dog": "the quick brown fox",
    "what went down a little": "the loss",
    "what splits text into pieces": "tokenizers",
    "what keeps packed weights": "quantized layers",
    "what routes every token": "mixture-of-experts models",
}


def count_example(rng: random.Random) -> dict:
    start = rng.randint(0, 40)
    length = rng.randint(4, 8)
    return {"prompt": f"count from {start}:", "completion": " ".join(str(n) for n in range(start, start + length))}


def repeat_example(rng: random.Random) -> dict:
    phrase = rng.choice(PHRASES)
    return {"prompt": f"repeat: {phrase}", "completion": phrase}


def fact_example(rng: random.Random) -> dict:
    question = rng.choice(sorted(FACTS))
    return {"prompt": f"{question}?", "completion": f"{FACTS[question]}."}


def make_examples(count: int, rng: random.Random) -> list[dict]:
    makers = (count_example, repeat_example, fact_example)
    return [makers[i % len(makers)](rng) for i in range(count)]


def make_data(out_dir: Path = HERE, seed: int = SEED) -> list[Path]:
    """Write train/valid/test.jsonl under out_dir; the same seed always gives the same bytes."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, size in SIZES.items():
        path = out_dir / f"{split}.jsonl"
        lines = [json.dumps(example) for example in make_examples(size, rng)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in make_data(args.out, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
