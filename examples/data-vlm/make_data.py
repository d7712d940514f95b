"""Write the example image–text dataset (train/valid/test.jsonl and images/) deterministically.

Run `python examples/data-vlm/make_data.py` to (re)write it next to this script. Each image is a coloured
shape on a plain background, drawn with numpy and saved with PIL; its caption comes from a template
("a red square on black."), so a few dozen steps of LoRA on the language model and the vision tower
visibly lower the loss. The rows are mlx-vlm's layout: {"messages": [...], "images": [path]}, paths relative
to this directory.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
SIZES = {"train": 64, "valid": 16, "test": 16}
IMAGE_SIZE = 56
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "white": (240, 240, 240)}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (120, 120, 120)}
SHAPES = ("square", "circle", "stripe")
QUESTION = "what is in the image?"


def draw(shape: str, colour: tuple, background: tuple, offset: int):
    """A IMAGE_SIZE² RGB image: `shape` in `colour` on `background`, moved by `offset` pixels."""
    import numpy as np

    size = IMAGE_SIZE
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = background
    y, x = np.mgrid[0:size, 0:size]
    centre = size // 2 + offset
    if shape == "square":
        inside = (abs(x - centre) < size // 4) & (abs(y - centre) < size // 4)
    elif shape == "circle":
        inside = (x - centre) ** 2 + (y - centre) ** 2 < (size // 4) ** 2
    else:
        inside = abs(y - centre) < size // 8
    pixels[inside] = colour
    return pixels


def make_split(split: str, count: int, rng: random.Random, out: Path) -> list[dict]:
    from PIL import Image

    rows = []
    for number in range(count):
        shape = rng.choice(SHAPES)
        colour = rng.choice(sorted(COLOURS))
        background = rng.choice(sorted(BACKGROUNDS))
        image = f"images/{split}-{number:03d}.png"
        pixels = draw(shape, COLOURS[colour], BACKGROUNDS[background], rng.randint(-4, 4))
        Image.fromarray(pixels).save(out / image, optimize=True)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": f"a {colour} {shape} on {background}."},
                ],
                "images": [image],
            }
        )
    return rows


def make_data(out: Path = HERE, seed: int = SEED) -> list[Path]:
    """(Re)write train/valid/test.jsonl and their images under `out`."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for old in (out / "images").glob("*.png"):
        old.unlink()
    written = []
    for split, count in SIZES.items():
        rows = make_split(split, count, rng, out)
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
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
