"""One short check of the device paths: right KV on vLLM's real layouts, codecs on the device
against the CPU, and save/load/encode/decode times for a Llama-3.1-8B-shaped 4K prompt.

On a CUDA machine every tensor lives on the GPU; elsewhere the same checks run
on CPU tensors (the transfer rows then say n/a). Prints a table and exits 1
if any check found a wrong result (timings are printed, never judged).

    python benchmarks/gpu_check.py            # 4K-token prompt, Llama-3.1-8B shape
    python benchmarks/gpu_check.py --tokens 1024 --layers 8    # a quicker run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmc_connector import tokens  # noqa: E402
from lmc_connector.config import load_config  # noqa: E402
from lmc_connector.ops import paged  # noqa: E402
from lmc_connector.ops.codecs import Codec, get_codec  # noqa: E402
from lmc_connector.ops.paged import KVFormat, PagedKV  # noqa: E402
from lmc_connector.v1.metadata import LMCConnectorMetadata, LoadSpec, SaveSpec  # noqa: E402
from lmc_connector.v1.worker import LMCWorker, WorkerSettings  # noqa: E402

BLOCK, CHUNK = 16, 256
FAILURES: list[str] = []


def row(name: str, ok: bool | None, detail: str) -> None:
    mark = {True: "ok", False: "WRONG", None: "-"}[ok]
    if ok is False:
        FAILURES.append(name)
    print(f"{name:48s} {mark:6s} {detail}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# -- 1. gather/scatter on vLLM's own views -----------------------------------------------------


def vllm_views(
    layout: object, spec: object, layers: int, blocks: int, device: torch.device
) -> list[torch.Tensor]:
    """Per-layer views built by vLLM's own allocator code for one KV cache layout."""
    from vllm.v1.kv_cache_interface import (
        KVCacheTensor,
        compute_layer_kv_cache_shape_bytes,
        compute_layout_strides,
        create_kv_cache_views,
    )

    strides = compute_layout_strides(spec, blocks, layers, layout)  # type: ignore[arg-type]
    shape = (layers, *compute_layer_kv_cache_shape_bytes(spec, blocks))  # type: ignore[arg-type]
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    names = [f"l{i}" for i in range(layers)]
    tensor = KVCacheTensor(
        size=size, layers=names, layer_stride=strides[0], block_stride=strides[1]
    )
    raw = torch.randint(-128, 128, (size,), dtype=torch.int8, device=device)
    return create_kv_cache_views(raw, spec, blocks, layout, tensor)  # type: ignore[arg-type]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (random bytes seen as floats hold NaNs, which `torch.equal` never matches)."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def reference_read(
    kvs: list[torch.Tensor], fmt: KVFormat, table: list[int], n: int
) -> torch.Tensor:
    """Tokens [0, n) by per-plane advanced indexing: slow, simple, independent of PagedKV."""
    movable = [kv.view(paged.storage_dtype(kv.dtype)) for kv in kvs]
    planes = [paged.plane_views(kv, fmt) for kv in movable]
    blocks, offsets = paged.token_slots(table, 0, n, BLOCK, kvs[0].shape[2], kvs[0].device)
    return torch.stack(
        [torch.stack([p[blocks, :, offsets].flatten(1) for p in ps]) for ps in planes], 1
    )


def check_layouts(device: torch.device) -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout

    def full(heads: int, head: int, dtype: torch.dtype) -> object:
        return FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=head, dtype=dtype)

    kinds = {
        "packed bf16": (KVFormat.PACKED, full(4, 64, torch.bfloat16)),
        "packed fp8 bytes": (KVFormat.PACKED, full(4, 64, torch.uint8)),
        "opaque bytes": (KVFormat.OPAQUE, full(4, 64, torch.uint8)),
        "mla bf16": (
            KVFormat.MLA,
            MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=96, dtype=torch.bfloat16),
        ),
        "cpu pages f32": (KVFormat.CPU_PAGED, full(2, 32, torch.float32)),
    }
    table, other, n = [7, 2, 11, 5], [1, 9, 3, 14], 4 * BLOCK
    for layout in KVCacheLayout:
        checked, bad = [], []
        for kind, (fmt, spec) in kinds.items():
            kvs = vllm_views(layout, spec, 3, 16, device)
            if fmt.whole_blocks and kvs[0].stride(2) != kvs[0].shape[3]:
                continue  # the CPU backend's pages are contiguous: no other layout exists there
            pk = PagedKV(kvs, fmt)
            got = pk.read(table, 0, n)
            pk.write(other, 0, got)
            ok = same_bytes(got, reference_read(kvs, fmt, table, n))
            ok = ok and same_bytes(pk.read(other, 0, n), got)
            checked.append(kind)
            if not ok:
                bad.append(kind)
        detail = f"wrong: {', '.join(bad)}" if bad else f"{len(checked)} formats"
        row(f"round trip, vLLM layout {layout.name}", not bad, detail)


# -- 2. codecs on the device against the CPU -----------------------------------------------


def check_codecs(device: torch.device, chunk: torch.Tensor) -> None:
    cpu_chunk = chunk.cpu()
    for name in ("fp8", "cachegen"):
        codec = get_codec(name)
        on_device = codec.decode(codec.encode(chunk), device)
        on_cpu = codec.decode(codec.encode(cpu_chunk), "cpu")
        crossed = codec.decode(codec.encode(chunk), "cpu")
        scale = on_cpu.float().abs().max().item() or 1.0
        diff = (on_device.cpu().float() - on_cpu.float()).abs().max().item()
        cross = (crossed.float() - on_device.cpu().float()).abs().max().item()
        ok = diff <= 1e-2 * scale and cross <= 1e-3 * scale
        detail = f"max diff {diff:.3g}, decoded elsewhere {cross:.3g} (of {scale:.3g})"
        row(f"codec {name}: {device.type} vs cpu", ok, detail)


# -- 3. timings for a 4K-token Llama-3.1-8B-shaped prompt ----------------------------------


def check_worker(device: torch.device, args: argparse.Namespace) -> None:
    blocks_needed = args.tokens // BLOCK
    buffer = torch.randn(
        2 * blocks_needed + 4, args.layers, 8, BLOCK, 256, dtype=torch.bfloat16, device=device
    )
    caches = {f"l{i}": buffer[:, i] for i in range(args.layers)}
    kv_bytes = buffer[:blocks_needed].numel() * buffer.element_size()
    config = load_config({"chunk_size": CHUNK, "max_local_cpu_size": 3 * kv_bytes / 1e9}, env={})
    address = f"ipc://{tempfile.mkdtemp()}/gpu-check.sock"
    worker = LMCWorker(config, WorkerSettings("llama-8b-shape", 0, 1, BLOCK, address))
    worker.register_kv_caches(caches, KVFormat.PACKED, "CHECK")
    try:
        _time_worker(worker, device, args, kv_bytes, blocks_needed)
    finally:
        worker.close()


def _time_worker(
    worker: LMCWorker, device: torch.device, args: argparse.Namespace, kv_bytes: int, n: int
) -> None:
    assert worker.paged is not None and worker.saver is not None and worker.engine is not None
    source, target = list(range(n)), list(range(n, 2 * n))
    prompt = list(range(args.tokens))
    keys = tokens.chunk_hashes(prompt, CHUNK)
    bounds = tokens.chunk_bounds(args.tokens, CHUNK)
    save = LMCConnectorMetadata(saves=[SaveSpec("r", keys, bounds, source)])
    blocked = timed(device, lambda: worker.save(save))
    background = timed(device, worker.saver.drain)
    gbs = kv_bytes / (blocked + background) / 1e9
    row("save: wait_for_save blocked", None, f"{blocked * 1000:.2f} ms")
    row("save: background copy + put", None, f"{background * 1000:.1f} ms ({gbs:.2f} GB/s)")
    load = LMCConnectorMetadata(loads=[LoadSpec("r2", keys, 0, 0, args.tokens, target)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    seconds = timed(device, lambda: worker.start_load(load))
    row(
        "load: 4K prompt into vLLM's blocks",
        None,
        f"{seconds * 1000:.1f} ms ({kv_bytes / seconds / 1e9:.2f} GB/s)",
    )
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) - before
        row(
            "load: extra device memory",
            extra < kv_bytes / 4,
            f"{extra / 2**20:.0f} MiB peak for {kv_bytes / 2**20:.0f} MiB of KV",
        )
    same = torch.equal(
        worker.paged.read(target, 0, args.tokens), worker.paged.read(source, 0, args.tokens)
    )
    row("load: KV equals what was saved", same and not worker.take_load_errors(), "bit exact")
    _time_transfers(device, kv_bytes)
    _time_codecs(device, worker.paged.read(source, 0, CHUNK), args.tokens // CHUNK)


def _time_transfers(device: torch.device, kv_bytes: int) -> None:
    if device.type != "cuda":
        row("device -> host, pinned vs pageable", None, "n/a on CPU")
        return
    src = torch.empty(kv_bytes // 2, dtype=torch.bfloat16, device=device)
    pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    t_pinned = timed(device, lambda: pinned.copy_(src, non_blocking=True))
    t_pageable = timed(device, lambda: src.cpu())
    row("device -> host, pinned", None, f"{kv_bytes / t_pinned / 1e9:.1f} GB/s")
    row("device -> host, pageable (fresh pages)", None, f"{kv_bytes / t_pageable / 1e9:.1f} GB/s")
    t_up = timed(device, lambda: src.copy_(pinned, non_blocking=True))
    row("host -> device, pinned", None, f"{kv_bytes / t_up / 1e9:.1f} GB/s")


def _encode_into(codec: Codec, batch: list[torch.Tensor], blobs: list[bytes]) -> None:
    blobs.extend(codec.encode_batch(batch))


def _time_codecs(device: torch.device, chunk: torch.Tensor, chunks: int) -> None:
    check_codecs(device, chunk)
    batch = [chunk] * min(chunks, 4)
    mb = sum(c.numel() * c.element_size() for c in batch) / 1e6
    for name in ("fp8", "cachegen"):
        codec = get_codec(name)
        codec.decode_batch(codec.encode_batch(batch[:1]), device)  # warm-up
        blobs: list[bytes] = []
        t_enc = timed(device, partial(_encode_into, codec, batch, blobs))
        t_dec = timed(device, partial(codec.decode_batch, blobs, device))
        row(
            f"codec {name}: encode / decode {len(batch)} chunks",
            None,
            f"{mb / t_enc:.0f} / {mb / t_dec:.0f} MB/s on {device.type}",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length (4K)")
    parser.add_argument("--layers", type=int, default=32, help="layers (Llama-3.1-8B: 32)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU tensors"
    print(f"device: {name}; prompt {args.tokens} tokens, {args.layers} layers x 8 kv heads x 128")
    print(f"{'check':48s} {'result':6s} detail")
    check_layouts(device)
    check_worker(device, args)
    print(f"{len(FAILURES)} wrong: {', '.join(FAILURES)}" if FAILURES else "all checks right")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
