"""The LoRA merge W + scale·BᵀAᵀ in numpy, summed in the order mlx's CPU matmul sums, for the same bits faster."""

from __future__ import annotations

import functools

import numpy as np

TILE_ROWS = 32
# (weight, output) dtypes: a dense weight, and a dequantized one merged into its scales' dtype.
DTYPES = (("float16", "float16"), ("float32", "float32"), ("float32", "float16"))


def merge(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """float32 W + scale·(A·B)ᵀ rounded once to `dtype`, for W (out, in), A (in, r), B (r, out).

    Each product sums its r terms one after another in float32 with separate multiplies and adds,
    as the reference BLAS behind mlx's CPU matmul does (numpy's own matmul fuses and reorders them).
    Rows are merged a cache-sized tile at a time.
    """
    a_t = np.ascontiguousarray(lora_a.astype(np.float32).T)
    b_t = np.ascontiguousarray(lora_b.astype(np.float32).T)
    rows, cols = weight.shape
    out = np.empty((rows, cols), dtype=dtype)
    total, term, wide = (np.empty((min(TILE_ROWS, rows), cols), dtype=np.float32) for _ in range(3))
    factor = np.float32(scale)
    with np.errstate(all="ignore"):  # an overflow rounds to ±inf, as in mlx, without a warning
        for start in range(0, rows, TILE_ROWS):
            stop = min(start + TILE_ROWS, rows)
            acc, tmp, w = total[: stop - start], term[: stop - start], wide[: stop - start]
            np.multiply(b_t[start:stop, :1], a_t[:1], out=acc)
            for k in range(1, a_t.shape[0]):
                np.multiply(b_t[start:stop, k : k + 1], a_t[k : k + 1], out=tmp)
                acc += tmp
            acc *= factor
            np.copyto(w, weight[start:stop])  # numpy widens float16 fast in a cast, slowly inside an add
            acc += w
            out[start:stop] = acc
    return out


@functools.lru_cache(maxsize=None)
def merge_works() -> bool:
    """Whether `merge` gives here the bits of the mlx merge it replaces, on random weights of the dtypes it is used for."""
    import mlx.core as mx

    from .fuse_kernels import merge as mlx_merge

    rng = np.random.default_rng(0)
    for rank in (1, 8, 16):
        for dtype, out in DTYPES:
            weight = (rng.standard_normal((67, 320)) * 0.02).astype(dtype)
            a = (rng.standard_normal((320, rank)) * 0.02).astype(np.float16)
            b = (rng.standard_normal((rank, 67)) * 0.02).astype(np.float16)
            adapter = {"lora_a": mx.array(a), "lora_b": mx.array(b)}
            expected = mlx_merge("lora", mx.array(weight), adapter, 20.0, getattr(mx, out))
            if not np.array_equal(np.asarray(expected).view(np.uint8), merge(weight, a, b, 20.0, out).view(np.uint8)):
                return False
    return True
