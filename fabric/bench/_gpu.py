"""GPU materialize: a stored artifact into a CuPy array vs CuPy's pinned H2D copy.

Ours: ``gpu.materialize(key, source=fabric)``: read and verify every chunk from
the cassette, stage it through pinned buffers and copy it to the device.
Floor: one ``memcpyAsync`` host-to-device of the same bytes already sitting in
pinned host memory (the PCIe/NVLink ceiling), on the same device.
"""

from __future__ import annotations

import time

import numpy as np

import fabric
from fabric.bench._core import Ctx, Row, compare

__all__ = ["bench_gpu"]


def bench_gpu(ctx: Ctx) -> None:
    """Skipped with a reason where no CUDA device is usable."""
    import gpu

    bench = "gpu-materialize"
    size = (256 << 20) if ctx.quick else (1 << 30)
    m = f"materialize {size >> 20} MiB artifact onto cuda:0"
    if not gpu.available():
        import importlib.util

        why = "no CUDA device" + ("" if importlib.util.find_spec("cupy") else " (CuPy is not installed: evalfabric[gpu])")
        ctx.add(Row(bench, m, other_label="floor: CuPy pinned H2D copy", verdict="skipped", note=why))
        return
    import cupy  # type: ignore[import-not-found]

    rng = np.random.default_rng(7)
    host = rng.integers(0, 255, size=size, dtype=np.uint8)
    reps = 2 if ctx.quick else 3
    with ctx.tempdir("gpu") as d:
        fab = fabric.open(d, durability="fast", map_size=size * 3)
        try:
            ref = fab.put(host)
            out = gpu.materialize(ref.key, source=fab)  # warm: CUDA context, allocator
            cupy.cuda.Stream.null.synchronize()
            if not bool((out[:4096].get() == host[:4096]).all()):
                raise AssertionError("materialized bytes differ from the stored artifact")
            del out
            ours_t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                arr = gpu.materialize(ref.key, source=fab)
                cupy.cuda.Device(0).synchronize()
                ours_t.append(time.perf_counter() - t0)
                del arr
        finally:
            fab.close()
    pinned = cupy.cuda.alloc_pinned_memory(size)
    staged = np.frombuffer(pinned, dtype=np.uint8, count=size)
    staged[:] = host
    dev = cupy.empty(size, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    floor_t = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        cupy.cuda.runtime.memcpyAsync(dev.data.ptr, staged.ctypes.data, size, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        stream.synchronize()
        floor_t.append(time.perf_counter() - t0)
    gib = size / 2**30
    ctx.add(compare(bench, m, gib / min(ours_t), gib / min(floor_t[1:]), unit="GiB/s", other_label="floor: CuPy pinned H2D copy",
                    note="ours reads and BLAKE3-verifies every chunk from LMDB before its copy; the floor copies bytes already pinned; informational",
                    device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(errors="replace")))
