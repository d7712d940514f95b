"""Time each operation an adapted linear adds to a training step, one by one, beside the base's own GEMM.

A compiled LoRA step at few tokens is launch-bound: this shows which of the added kernels cost what, at
the shapes of an 8-block 4096-wide llama (q/o 4096 → 4096, k/v 4096 → 1024, gate/up 4096 → 11008), for
one adapter (rank r) and for three siblings sharing one product (rank 3r). Each operation runs `--repeats`
times in one evaluation (kernels queued back to back, as in a step); the median of `--rounds` is reported,
with the host time until the work is queued (`mx.async_eval` returns): where it is close to the total, the
operation is bound by the host's dispatch, not by the GPU. On a CUDA GPU, hand-written kernels for the four
narrow products (`mx.fast.cuda_kernel`) are timed beside the library's GEMMs, with their largest difference
from them relative to the GEMM's largest value.

    python benchmarks/lowrank_ops.py                       # 1024, 4096 and 8192 rows
    python benchmarks/lowrank_ops.py --rows 1024 --json ops.json
"""

import argparse
import json
import statistics
import time

import mlx.core as mx


def operations(rows: int, d_in: int, d_out: int, r: int, dtype: mx.Dtype) -> dict:
    """name -> (function, inputs) for each operation of one adapted linear's step at these shapes."""
    key = iter(mx.random.split(mx.random.key(0), 16))

    def normal(*shape, dt=dtype):
        return mx.random.normal(shape, key=next(key)).astype(dt)

    x, dy = normal(rows, d_in), normal(rows, d_out)
    weight, out, dx = normal(d_out, d_in), normal(rows, d_out), normal(rows, d_in)
    a, b, z, dz = normal(d_in, r), normal(r, d_out), normal(rows, r), normal(rows, r)
    a32 = normal(d_in, r, dt=mx.float32)
    library = {
        "base x·Wᵀ": (lambda x, w: x @ w.T, (x, weight)),
        "base dy·W": (lambda dy, w: dy @ w, (dy, weight)),
        "z = x·A": (lambda x, a: x @ a, (x, a)),
        "y = out + z·B": (lambda out, z, b: mx.addmm(out, z, b), (out, z, b)),
        "dz = dy·Bᵀ": (lambda dy, b: dy @ b.T, (dy, b)),
        "dx += dz·Aᵀ": (lambda dx, dz, a: mx.addmm(dx, dz, a.T), (dx, dz, a)),
        "dA = xᵀ·dz": (lambda x, dz: x.T @ dz, (x, dz)),
        "dB = zᵀ·dy": (lambda z, dy: z.T @ dy, (z, dy)),
        "cast A": (lambda a: a.astype(dtype), (a32,)),
        "cast dA": (lambda a: a.astype(mx.float32), (a,)),
        "add (rows × in)": (lambda p, q: p + q, (dx, x)),
    }
    for name, function in hand_written_kernels().items():
        reference, inputs = library[name]
        expected, got = reference(*inputs).astype(mx.float32), function(*inputs).astype(mx.float32)
        error = (mx.abs(got - expected).max() / mx.abs(expected).max()).item()
        library[f"{name} (kernel; max error {error:.1e})"] = (function, inputs)
    return library


# One block per row: out[n, j] = Σ_k x[n, k]·m[k, j] for the R columns of a narrow m (x·A; dy·Bᵀ with M_T).
ROW_DOT_SOURCE = """
    int row = blockIdx.x;
    int t = threadIdx.x;
    float acc[R];
    for (int j = 0; j < R; ++j) acc[j] = 0.f;
    const T* xr = x + (size_t)row * K;
    for (int k = t; k < K; k += THREADS) {
        float xv = static_cast<float>(xr[k]);
        for (int j = 0; j < R; ++j) {
            float mv = static_cast<float>(M_T ? m[(size_t)j * K + k] : m[(size_t)k * R + j]);
            acc[j] += xv * mv;
        }
    }
    __shared__ float part[THREADS / 32][R];
    int warp = t / 32, lane = t % 32;
    for (int j = 0; j < R; ++j) {
        float v = acc[j];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffff, v, off);
        if (lane == 0) part[warp][j] = v;
    }
    __syncthreads();
    if (t < R) {
        float s = 0.f;
        for (int w = 0; w < THREADS / 32; ++w) s += part[w][t];
        out[(size_t)row * R + t] = static_cast<T>(s);
    }
"""

# Blocks of columns × chunks of rows: out[k, j] += Σ_n x[n, k]·z[n, j] in float32 atomics (xᵀ·dz; (zᵀ·dy)ᵀ with
# OUT_T, written as zᵀ·dy).
COLUMN_REDUCE_SOURCE = """
    int k = blockIdx.x * THREADS + threadIdx.x;
    int n0 = blockIdx.y * ROWS;
    int n1 = min(N, n0 + ROWS);
    __shared__ float zs[ROWS * R];
    for (int i = threadIdx.x; i < (n1 - n0) * R; i += THREADS)
        zs[i] = static_cast<float>(z[(size_t)n0 * R + i]);
    __syncthreads();
    if (k >= K) return;
    float acc[R];
    for (int j = 0; j < R; ++j) acc[j] = 0.f;
    for (int n = n0; n < n1; ++n) {
        float xv = static_cast<float>(x[(size_t)n * K + k]);
        for (int j = 0; j < R; ++j) acc[j] += xv * zs[(n - n0) * R + j];
    }
    for (int j = 0; j < R; ++j) atomicAdd(&out[OUT_T ? (size_t)j * K + k : (size_t)k * R + j], acc[j]);
"""


def hand_written_kernels() -> dict:
    """name -> function of the narrow products by hand-written kernels (CUDA only; empty elsewhere)."""
    if mx.default_device().type != mx.DeviceType.gpu or not mx.cuda.is_available():
        return {}
    row_dot = mx.fast.cuda_kernel(name="row_dot", input_names=["x", "m"], output_names=["out"], source=ROW_DOT_SOURCE)
    column_reduce = mx.fast.cuda_kernel(
        name="column_reduce", input_names=["x", "z"], output_names=["out"], source=COLUMN_REDUCE_SOURCE
    )
    threads, rows_per_block = 256, 64

    def dot(x, m, transposed):  # x (n, K); m (K, R), or (R, K) read as its transpose
        (n, k), r = x.shape, m.shape[0 if transposed else 1]
        template = [("T", x.dtype), ("R", r), ("K", k), ("THREADS", threads), ("M_T", transposed)]
        return row_dot(
            inputs=[x, m], template=template, grid=(n * threads, 1, 1), threadgroup=(threads, 1, 1),
            output_shapes=[(n, r)], output_dtypes=[x.dtype],
        )[0]  # fmt: skip

    def reduce(x, z, transposed):  # x (n, K), z (n, R) -> xᵀ·z (K, R), or zᵀ·x (R, K), float32
        (n, k), r = x.shape, z.shape[1]
        template = [("T", x.dtype), ("R", r), ("K", k), ("N", n), ("THREADS", threads), ("ROWS", rows_per_block),
                    ("OUT_T", transposed)]  # fmt: skip
        grid = (-(-k // threads) * threads, -(-n // rows_per_block), 1)
        return column_reduce(
            inputs=[x, z], template=template, grid=grid, threadgroup=(threads, 1, 1),
            output_shapes=[(r, k) if transposed else (k, r)], output_dtypes=[mx.float32], init_value=0.0,
        )[0]  # fmt: skip

    return {
        "z = x·A": lambda x, a: dot(x, a, False),
        "dz = dy·Bᵀ": lambda dy, b: dot(dy, b, True),
        "dA = xᵀ·dz": lambda x, dz: reduce(x, dz, False),
        "dB = zᵀ·dy": lambda z, dy: reduce(dy, z, True),
    }


def time_operation(function, inputs, repeats: int, rounds: int) -> tuple[float, float]:
    """Microseconds per call, `repeats` calls queued in one evaluation, and of it the host's time until the
    calls are queued; medians over rounds."""
    mx.eval(function(*inputs))
    samples, queued = [], []
    for _ in range(rounds):
        mx.synchronize()
        start = time.perf_counter()
        mx.async_eval([function(*inputs) for _ in range(repeats)])
        queued.append((time.perf_counter() - start) / repeats * 1e6)
        mx.synchronize()
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples), statistics.median(queued)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,4096,8192", help="token counts (rows), comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    dtype = mx.bfloat16
    shapes = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 11008)}
    print(f"device {mx.default_device()}, mlx {mx.__version__}, bfloat16, µs per call (host µs until queued)")
    results = []
    for rows in (int(n) for n in args.rows.split(",")):
        for shape_name, (d_in, d_out) in shapes.items():
            for r in (args.rank, 3 * args.rank):
                for name, (function, inputs) in operations(rows, d_in, d_out, r, dtype).items():
                    if r != args.rank and name.startswith(("base", "add")):
                        continue
                    us, host_us = time_operation(function, inputs, args.repeats, args.rounds)
                    results.append(
                        dict(rows=rows, shape=shape_name, d_in=d_in, d_out=d_out, r=r, op=name, us=us, host_us=host_us)
                    )
                    print(f"rows {rows:5d}  {shape_name:8s} r={r:<3d} {name:44s} {us:9.1f} ({host_us:.1f})")
                mx.clear_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(mx.default_device()), mlx=mx.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
