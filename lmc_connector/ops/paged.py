"""Copies between vLLM's paged KV caches and chunk tensors, with one indexed op per layer.

Device-agnostic torch: the same code runs on CPU and CUDA tensors. vLLM hands
each layer's cache to the connector as a 4-D view `[blocks, kv_heads,
block_size, C]` (a strided view into one shared buffer; every layer of a
buffer has the same strides). What C holds depends on the attention backend,
see `KVFormat`. Chunk tensors are `[planes, layers, tokens, channels]`.

A copy goes through a *layer-major* scratch tensor `[layers, ...]`: one
`index_select` (gather) or `index_copy_` (scatter) per layer moves a whole
layer's share between the paged cache and the scratch, addressed by one index
tensor computed once per chunk; one more copy turns the scratch into the chunk
tensor or back. So a chunk costs `layers + constant` ops whatever its size,
which keeps a GPU's copies from being launch-bound.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

#: Element types a chunk keeps as numbers (codecs can code them); anything else is moved as
#: opaque bytes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KVFormat(enum.Enum):
    """How one layer's `[blocks, kv_heads, block_size, C]` view stores K and V."""

    #: vLLM's CPU attention backend: C = 2 * head_size, and each (block, head) page is really
    #: `[2 * block_size, head_size]`: the block's K part, then its V part. The order inside
    #: the K part depends on the CPU's attention ISA (with "vec" it is transposed,
    #: `[head_size, block_size]`), so rows of the K part are not tokens: this format is only
    #: ever moved in whole blocks (`whole_blocks`), which is exact whatever the ISA.
    CPU_PAGED = "cpu_paged"
    #: FlashAttention / FlashInfer / Triton: C packs one token's K then V (each half may end
    #: with the token's inline quantization scale: moved along, bytes as they are).
    PACKED = "packed"
    #: MLA: one latent head (kv_heads == 1), C = latent size; a single plane.
    MLA = "mla"
    #: A quantized layout whose C packs K, V and scales in a backend-specific way (NVFP4,
    #: TurboQuant, ...): C is moved whole, as bytes, per token and head; a single plane.
    OPAQUE = "opaque"

    @property
    def planes(self) -> int:
        return 1 if self in (KVFormat.MLA, KVFormat.OPAQUE) else 2

    @property
    def whole_blocks(self) -> bool:
        """Rows of a page are not tokens: copy whole blocks only (see CPU_PAGED)."""
        return self is KVFormat.CPU_PAGED


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The element type chunks of a `dtype` KV cache hold: floats as they are, else bytes."""
    if dtype in FLOAT_DTYPES:
        return dtype
    if dtype.itemsize == 1:
        return torch.uint8
    raise ValueError(
        f"KV cache element type {dtype} is neither float16/bfloat16/float32 nor a 1-byte type; "
        "this connector cannot move it: run vLLM without --kv-cache-dtype or with fp8"
    )


def plane_views(kv: torch.Tensor, fmt: KVFormat) -> list[torch.Tensor]:
    """Views `[blocks, kv_heads, block_size, head_size]` of each plane, sharing `kv`'s storage.

    For tests and probes that address single tokens. For CPU_PAGED the two
    views are the two halves of each page, addressed as rows.
    """
    if kv.dim() != 4:
        raise ValueError(f"expected a 4-D paged KV view, got shape {tuple(kv.shape)}")
    blocks, heads, block_size, width = kv.shape
    if fmt.planes == 1:
        return [kv]
    if width % 2:
        raise ValueError(f"{fmt.value}: last dimension {width} is not K and V of equal size")
    head_size = width // 2
    if fmt is KVFormat.PACKED:
        return [kv[..., :head_size], kv[..., head_size:]]
    if kv.stride(3) != 1 or kv.stride(2) != width:
        raise ValueError(
            f"cpu_paged: each (block, head) page must be contiguous; strides are {kv.stride()}"
        )
    pages = kv.as_strided(
        (blocks, heads, 2 * block_size, head_size),
        (kv.stride(0), kv.stride(1), head_size, 1),
        kv.storage_offset(),
    )
    return [pages[:, :, :block_size], pages[:, :, block_size:]]


def token_slots(
    block_ids: Sequence[int] | torch.Tensor,
    start: int,
    end: int,
    block_size: int,
    kernel_block_size: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block index, offset) of each token in [start, end) of a request.

    `block_ids` is the request's block table in the scheduler's blocks of
    `block_size` tokens; the kernel may split each into blocks of
    `kernel_block_size` tokens (consecutive kernel blocks per scheduler block).
    """
    if end < start or start < 0:
        raise ValueError(f"bad token range [{start}, {end})")
    if block_size % kernel_block_size:
        raise ValueError(f"block size {block_size} is not a multiple of {kernel_block_size}")
    table = torch.as_tensor(block_ids, dtype=torch.long, device=device)
    needed = (end + block_size - 1) // block_size
    if table.numel() < needed:
        raise ValueError(f"tokens up to {end} need {needed} blocks; the table has {table.numel()}")
    positions = torch.arange(start, end, dtype=torch.long, device=device)
    slots = table[positions // block_size] * block_size + positions % block_size
    return slots // kernel_block_size, slots % kernel_block_size


def _as_movable(kv: torch.Tensor) -> torch.Tensor:
    """`kv` as the element type chunks hold (a same-size view for 1-byte types)."""
    dtype = storage_dtype(kv.dtype)
    return kv if dtype == kv.dtype else kv.view(dtype)


class PagedKV:
    """One worker's paged KV cache as the connector moves it: views and index geometry.

    Built once at registration from vLLM's per-layer views (all of one shape,
    strides and dtype); owns no memory. Stateless afterwards, so any thread may
    copy with it (the caller keeps copies of one block range from racing).

    Token formats address a *row* (one plane of one head of one token, or a
    finer piece when the strides do not allow it) per index entry; the
    whole-block format addresses a kernel block per entry.
    """

    def __init__(
        self, kvs: Sequence[torch.Tensor], fmt: KVFormat, block_size: int | None = None
    ) -> None:
        if not kvs:
            raise ValueError("vLLM registered no KV cache layers")
        first = kvs[0]
        if first.dim() != 4:
            raise ValueError(f"expected 4-D paged KV views, got shape {tuple(first.shape)}")
        for kv in kvs:
            if kv.shape != first.shape or kv.stride() != first.stride() or kv.dtype != first.dtype:
                raise ValueError(
                    f"KV cache layers differ (shape {tuple(kv.shape)} vs {tuple(first.shape)}, "
                    f"strides {kv.stride()} vs {first.stride()}, {kv.dtype} vs {first.dtype}): "
                    "this connector caches models whose layers share one KV layout"
                )
        self.fmt = fmt
        self.layers = [_as_movable(kv) for kv in kvs]
        self.dtype = self.layers[0].dtype
        self.device = first.device
        _, self.heads, self.kernel_block_size, width = first.shape
        self.block_size = block_size or self.kernel_block_size
        if self.block_size % self.kernel_block_size:
            raise ValueError(
                f"block size {self.block_size} is not a multiple of the KV view's "
                f"{self.kernel_block_size} tokens per block"
            )
        self.planes = fmt.planes
        if fmt.planes == 2 and width % 2:
            raise ValueError(f"{fmt.value}: last dimension {width} is not K and V of equal size")
        #: Elements per plane of one head of one token.
        self.plane_width = width // fmt.planes
        self.channels = self.heads * self.plane_width
        #: Copies are rounded up to multiples of this many tokens.
        self.align = self.kernel_block_size if fmt.whole_blocks else 1
        self._rows: list[torch.Tensor] = []
        self._inner = torch.empty(0)
        self._row_width = 0
        self._strides = (0, 0)
        if not fmt.whole_blocks:
            self._build_rows()

    def _build_rows(self) -> None:
        """A 2-D row view of each layer's storage and the in-token row offsets of a token."""
        kv = self.layers[0]
        s0, s1, s2, s3 = kv.stride()
        width = self.plane_width
        # Whole plane rows when every stride is a multiple of the row; single elements else.
        whole = s3 == 1 and all(s % width == 0 for s in (s0, s1, s2))
        row = width if whole else 1
        pieces = width // row
        heads = torch.arange(self.heads, dtype=torch.long).view(1, -1, 1)
        planes = torch.arange(self.planes, dtype=torch.long).view(-1, 1, 1)
        parts = torch.arange(pieces, dtype=torch.long).view(1, 1, -1)
        # [planes, heads, pieces] element offsets within one token, then [planes, 1, heads*pieces]
        inner = heads * s1 + (planes * width + parts * row) * s3
        self._inner = inner.reshape(self.planes, 1, -1).to(self.device)
        self._row_width = row
        self._strides = (s0, s2)
        blocks, heads_n, tokens, c = kv.shape
        last = (blocks - 1) * s0 + (heads_n - 1) * s1 + (tokens - 1) * s2 + (c - 1) * s3
        rows = last // row + 1
        self._rows = [
            kv.as_strided((rows, row), (row, 1), kv.storage_offset()) for kv in self.layers
        ]

    # -- index -----------------------------------------------------------------------------

    def index(self, table: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The index entries of tokens [start, end) of a request whose block table (scheduler
        blocks, a long tensor on this cache's device) is `table`.

        Whole-block formats need `start` and `end` on kernel-block boundaries.
        """
        blocks, offsets = token_slots(
            table, start, end, self.block_size, self.kernel_block_size, self.device
        )
        if self.fmt.whole_blocks:
            if start % self.align or end % self.align:
                raise ValueError(f"[{start}, {end}) is not on {self.align}-token block bounds")
            return blocks[:: self.align].contiguous()
        s0, s2 = self._strides
        outer = (blocks * s0 + offsets * s2).view(1, -1, 1)
        return ((outer + self._inner) // self._row_width).reshape(-1)

    # -- scratch ---------------------------------------------------------------------------

    def aligned(self, tokens: int) -> int:
        """`tokens` rounded up to a multiple of `align` (what a copy of them covers)."""
        return -(-tokens // self.align) * self.align

    def scratch_numel(self, tokens: int) -> int:
        """Elements of a layer-major scratch for `tokens` tokens (a chunk's worth)."""
        return len(self.layers) * self.planes * tokens * self.channels

    def scratch_view(self, buffer: torch.Tensor, tokens: int) -> torch.Tensor:
        """The first part of a flat `buffer` as the scratch of `tokens` tokens, `[layers, -1]`."""
        return buffer[: self.scratch_numel(tokens)].view(len(self.layers), -1)

    def _scratch_parts(self, scratch: torch.Tensor, tokens: int) -> torch.Tensor:
        layers, heads, width = len(self.layers), self.heads, self.plane_width
        if self.fmt.whole_blocks:
            n, bs = tokens // self.kernel_block_size, self.kernel_block_size
            # [layers, blocks, heads, 2, rows, width] -> [2, layers, blocks, rows, heads, width]
            return scratch.view(layers, n, heads, 2, bs, width).permute(3, 0, 1, 4, 2, 5)
        # [layers, planes, tokens, channels] -> [planes, layers, tokens, channels]
        return scratch.view(layers, self.planes, tokens, self.channels).transpose(0, 1)

    def to_chunk(self, scratch: torch.Tensor, tokens: int, out: torch.Tensor) -> torch.Tensor:
        """Copy a layer-major scratch into the chunk tensor `out` (one op); returns `out`."""
        parts = self._scratch_parts(scratch, tokens)
        out.view(parts.shape).copy_(parts, non_blocking=out.device != scratch.device)
        return out

    def from_chunk(self, chunk: torch.Tensor, scratch: torch.Tensor) -> None:
        """Copy a chunk tensor (any strides, any device) into a layer-major scratch (one op)."""
        tokens = chunk.shape[2]
        parts = self._scratch_parts(scratch, tokens)
        parts.copy_(chunk.reshape(parts.shape), non_blocking=chunk.device != scratch.device)

    # -- copies (one indexed op per layer) -------------------------------------------------

    def gather(self, index: torch.Tensor, scratch: torch.Tensor) -> None:
        """Copy the addressed rows or blocks of every layer into a layer-major scratch."""
        for layer, src in enumerate(self._sources()):
            dst = scratch[layer].view(index.numel(), *src.shape[1:])
            torch.index_select(src, 0, index, out=dst)

    def scatter(self, index: torch.Tensor, scratch: torch.Tensor) -> None:
        """Write a layer-major scratch into the addressed rows or blocks of every layer."""
        for layer, dst in enumerate(self._sources()):
            dst.index_copy_(0, index, scratch[layer].view(index.numel(), *dst.shape[1:]))

    def _sources(self) -> list[torch.Tensor]:
        return self.layers if self.fmt.whole_blocks else self._rows

    # -- conveniences (tests, probes; allocate their own scratch) --------------------------

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int]:
        return (self.planes, len(self.layers), tokens, self.channels)

    def read(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of a request as a new chunk tensor on this cache's device."""
        table = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        tokens = end - start
        view = self._new_scratch(tokens)
        self.gather(self.index(table, start, end), view)
        out = torch.empty(self.chunk_shape(tokens), dtype=self.dtype, device=self.device)
        return self.to_chunk(view, tokens, out)

    def write(self, block_ids: Sequence[int], start: int, kv: torch.Tensor) -> None:
        """Write a chunk tensor over tokens [start, start + kv.shape[2]) of a request."""
        if kv.dim() != 4 or tuple(kv.shape) != self.chunk_shape(kv.shape[2]):
            raise ValueError(
                f"chunk of shape {tuple(kv.shape)} does not match {self.chunk_shape(kv.shape[2])}"
            )
        table = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        tokens = kv.shape[2]
        view = self._new_scratch(tokens)
        self.from_chunk(kv.to(self.dtype), view)
        self.scatter(self.index(table, start, start + tokens), view)

    def _new_scratch(self, tokens: int) -> torch.Tensor:
        buffer = torch.empty(self.scratch_numel(tokens), dtype=self.dtype, device=self.device)
        return self.scratch_view(buffer, tokens)
