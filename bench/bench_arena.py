"""Arena costs: map and unmap latency per chunk, and compaction bandwidth as a ratio to a
plain device-to-device copy of the same bytes measured in the same run.

Run: ``python -m bench.bench_arena [--device cuda|cpu] [--out DIR]``. On a GPU the figures
are written to ``bench/results/arena.json``; on CPU (host backend) they are printed and
written only when ``--out`` is given, since host numbers say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import kernels
from arena import KVSpec, PagedArena
from bench._common import time_fn, write_result

# Llama-3-8B-like geometry: 32 layers x 8 KV heads x 128 x fp16, block 16 -> 2 MiB blocks.
SPEC = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.float16)


def map_unmap_latency(device: str, chunks: int) -> dict:
    """Median seconds per chunk for mapping (resize) and unmapping (shrink) ``chunks`` chunks,
    one chunk per call, so each timing is one map or one unmap."""
    arena = PagedArena(SPEC, (chunks + 1) * (2 << 20), device)
    pool = arena.pool("bench")
    bpc = arena.blocks_per_chunk
    maps, unmaps = [], []
    for rounds in range(3):
        for i in range(1, chunks + 1):
            t0 = time.perf_counter()
            pool.resize(i * bpc)
            maps.append(time.perf_counter() - t0)
        for i in range(chunks - 1, -1, -1):
            pool.resize(i * bpc)
            t0 = time.perf_counter()
            arena.shrink()
            unmaps.append(time.perf_counter() - t0)
    arena.close()
    return dict(chunk_bytes=2 << 20, chunks=chunks, map_s_median=statistics.median(maps),
                unmap_s_median=statistics.median(unmaps), map_s_p90=float(np.quantile(maps, .9)),
                unmap_s_p90=float(np.quantile(unmaps, .9)))


def compaction_bandwidth(device: str, num_blocks: int, num_moves: int) -> dict:
    """Bytes/s (read + written) of kernels.compact_blocks moving ``num_moves`` random blocks,
    against ``Tensor.copy_`` of the same number of bytes between two contiguous buffers."""
    blocks = torch.empty((num_blocks, *SPEC.block_shape), dtype=SPEC.dtype, device=device)
    blocks.view(torch.int16).random_(-30000, 30000)
    perm = torch.randperm(num_blocks, device=device)
    src, dst = perm[:num_moves], perm[num_moves:2 * num_moves]
    table = torch.randint(0, num_blocks, (256, 512), dtype=torch.int32, device=device)
    moved = 2 * num_moves * SPEC.block_bytes
    t_compact = time_fn(lambda: kernels.compact_blocks(blocks, src, dst, table))
    a = torch.empty(num_moves * SPEC.block_bytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t_copy = time_fn(lambda: b.copy_(a))
    return dict(block_bytes=SPEC.block_bytes, num_moves=num_moves, table_entries=table.numel(),
                compact_s=t_compact, copy_s=t_copy, compact_bytes_per_s=moved / t_compact,
                copy_bytes_per_s=moved / t_copy, ratio_to_copy=t_copy / t_compact)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for the JSON (default on GPU: "
                        "bench/results)")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    lat = map_unmap_latency(args.device, chunks=64 if gpu else 16)
    comp = [compaction_bandwidth(args.device, 4096 if gpu else 64, m)
            for m in ((64, 512, 1024) if gpu else (8, 16))]
    print(f"map   {lat['map_s_median'] * 1e6:8.1f} us/chunk (p90 {lat['map_s_p90'] * 1e6:.1f})")
    print(f"unmap {lat['unmap_s_median'] * 1e6:8.1f} us/chunk (p90 {lat['unmap_s_p90'] * 1e6:.1f})")
    for c in comp:
        print(f"compact {c['num_moves']:5d} x {c['block_bytes'] >> 20} MiB: "
              f"{c['compact_bytes_per_s'] / 1e9:7.1f} GB/s, copy {c['copy_bytes_per_s'] / 1e9:7.1f}"
              f" GB/s, ratio {c['ratio_to_copy']:.3f}")
    if gpu or args.out:
        path = write_result("arena", dict(map_unmap=lat, compaction=comp), args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
