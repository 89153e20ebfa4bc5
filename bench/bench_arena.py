"""Arena costs: map and unmap latency per chunk, and compaction bandwidth as a ratio to a
plain device-to-device copy of the same bytes measured in the same run.

Run: ``python -m bench.bench_arena [--device cuda|cpu] [--out DIR] [--tiny]``. On a GPU the
figures are written to ``arena.json`` in ``$OUT`` (when set) or ``bench/results/``, section by
section as they are measured (map/unmap first); on CPU (host backend) they are printed and
written only when ``--out`` or ``--tiny`` is given, since host numbers say nothing about a
GPU. Compaction is timed from CUDA-graph replays (the kernel alone), with the eager time and
the host's launch cost beside it. Exit status 1 when any case failed (the rest are kept).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import kernels
from arena import KVSpec, PagedArena
from bench._common import ResultFile, error_row, time_kernel

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


#: Compaction cases on a GPU as (blocks in the buffer, moves): few moves show the launch's
#: fixed cost (remap build, table rewrite), many its copy bandwidth. On CPU: tiny.
GPU_COMPACTION = ((4096, 1), (4096, 8), (4096, 64), (4096, 512), (4096, 1024))
CPU_COMPACTION = ((64, 1), (64, 8), (64, 16))
#: The block table rewritten by every compaction (int32 entries).
TABLE_SHAPE = (256, 512)


def compaction_cases(gpu: bool) -> tuple[tuple[int, int], ...]:
    """(num_blocks, num_moves) pairs measured on a GPU (``gpu``) or on CPU."""
    return GPU_COMPACTION if gpu else CPU_COMPACTION


def compaction_bandwidth(device: str, num_blocks: int, num_moves: int) -> dict:
    """kernels.compact_blocks moving ``num_moves`` random blocks of ``SPEC`` and rewriting a
    ``TABLE_SHAPE`` table, against ``Tensor.copy_`` of the same bytes between two buffers.

    Times (seconds per call, see :func:`bench._common.time_kernel`): ``kernel_s`` from CUDA
    graph replays, ``eager_s`` eager with events, ``host_launch_s`` the host's part.
    Bandwidths count each moved byte read and written, over ``kernel_s``."""
    blocks = torch.empty((num_blocks, *SPEC.block_shape), dtype=SPEC.dtype, device=device)
    blocks.view(torch.int16).random_(-30000, 30000)
    perm = torch.randperm(num_blocks, device=device)
    src, dst = perm[:num_moves], perm[num_moves:2 * num_moves]
    table = torch.randint(0, num_blocks, TABLE_SHAPE, dtype=torch.int32, device=device)
    moved = 2 * num_moves * SPEC.block_bytes
    compact = time_kernel(lambda: kernels.compact_blocks(blocks, src, dst, table))
    a = torch.empty(num_moves * SPEC.block_bytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy = time_kernel(lambda: b.copy_(a))
    return dict(block_bytes=SPEC.block_bytes, num_blocks=num_blocks, num_moves=num_moves,
                table_entries=table.numel(), compact=compact, copy=copy,
                compact_s=compact["kernel_s"], copy_s=copy["kernel_s"],
                compact_bytes_per_s=moved / compact["kernel_s"],
                copy_bytes_per_s=moved / copy["kernel_s"],
                ratio_to_copy=copy["kernel_s"] / compact["kernel_s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for arena.json (default: $OUT "
                        "when set, else bench/results; on CPU only when given)")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (a dry run of "
                        "the plumbing on CPU)")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    write = gpu or args.out is not None or args.tiny
    res = ResultFile("arena", args.out, spec=str(SPEC)) if write else None
    chunks = 4 if args.tiny else 64 if gpu else 16
    failed = False
    try:   # written before compaction is tried: a failing kernel keeps these figures
        lat = map_unmap_latency(args.device, chunks=chunks)
        print(f"map   {lat['map_s_median'] * 1e6:8.1f} us/chunk (p90 {lat['map_s_p90'] * 1e6:.1f})")
        print(f"unmap {lat['unmap_s_median'] * 1e6:8.1f} us/chunk "
              f"(p90 {lat['unmap_s_p90'] * 1e6:.1f})", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded; compaction is still tried
        lat, failed = error_row(exc), True
        print(f"map/unmap failed: {lat['error']}", flush=True)
    if res is not None:
        res.set("map_unmap", lat)
    cases = compaction_cases(gpu)[:1] if args.tiny else compaction_cases(gpu)
    for num_blocks, moves in cases:
        try:
            c = compaction_bandwidth(args.device, num_blocks, moves)
            print(f"compact {c['num_moves']:5d} x {c['block_bytes'] >> 20} MiB: "
                  f"{c['compact_s'] * 1e6:9.1f} us (host {c['compact']['host_launch_s'] * 1e6:.0f}"
                  f" us) {c['compact_bytes_per_s'] / 1e9:7.1f} GB/s, copy "
                  f"{c['copy_bytes_per_s'] / 1e9:7.1f} GB/s, ratio {c['ratio_to_copy']:.3f}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - one failed case keeps the others
            c, failed = dict(num_blocks=num_blocks, num_moves=moves, **error_row(exc)), True
            print(f"compact {moves:5d}: failed: {c['error']}", flush=True)
        if gpu:
            torch.cuda.empty_cache()
        if res is not None:
            res.add("compaction", c)
    if res is not None:
        print(f"wrote {res.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
