"""The streaming fuse: a plan from headers, output shards laid out and filled, one merge interface (mlx, numpy, C), the erasure report."""
