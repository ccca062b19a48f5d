"""The rANS coder as a small C library (`_rans.c`), built on first use, with a checked fallback.

The torch coder (rans_torch.py) pays ~16 tensor ops per step; on a CPU that is most of a
chunk's coding time. The same loops in C are one pass over the symbols. The library is
compiled with the system's C compiler the first time a process needs it, into
`$LMC_CACHE_DIR` (default `~/.cache/lmc_connector`; a private temporary directory where that
cannot be written), named by a hash of the source and the compiler, and loaded with ctypes
(calls release the GIL). Before it is used, a self-test
checks that it produces the torch coder's bytes. No compiler, a failed build, a failed
self-test or `LMC_CODEC_NATIVE=0` means `library()` is None and the codecs use the torch
coder: same bitstream, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from lmc_connector.ops.codecs.rans_tables import L, RansTables

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_rans.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]
_P = ctypes.c_void_p
_I = ctypes.c_int64
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def library() -> ctypes.CDLL | None:
    """The loaded, self-tested coder library, or None where the torch coder must be used."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


def _compiler() -> list[str] | None:
    configured = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    parts = configured.split()
    if parts and shutil.which(parts[0]):
        return parts
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _cache_dir() -> Path:
    explicit = os.environ.get("LMC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmc_connector"


def _build(cc: list[str], flags: list[str]) -> Path:
    """The library built from `_SOURCE` with `flags`: from the cache directory, else compiled
    there, else (read-only home, ...) compiled into a private temporary directory."""
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(cc + flags).encode() + sys.platform.encode())
    name = f"rans-{tag.hexdigest()[:16]}.so"
    target = _cache_dir() / name
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    except OSError:
        target = Path(tempfile.mkdtemp(prefix="lmc-rans-")) / name
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [*cc, *flags, "-o", tmp, str(_SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LMC_CODEC_NATIVE", "1") == "0" or sys.byteorder != "little":
        return None
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found: codecs use the torch rANS coder (slower on CPU)")
        return None
    lib = None
    for flags in (_FLAGS, [*_FLAGS, "-DLMC_PLAIN"]):  # without per-ISA clones, e.g. no ifunc
        try:
            lib = ctypes.CDLL(str(_build(cc, flags)))
            break
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("native rANS coder build failed (%s %s): %s", cc, flags, e)
    if lib is None:
        logger.warning("native rANS coder unavailable: using the torch coder")
        return None
    lib.lmc_rans_encode.restype = _I
    lib.lmc_rans_encode.argtypes = [_P, _I, _I, _I, _P, _I, _P, _P, _I]
    lib.lmc_rans_decode.restype = _I
    lib.lmc_rans_decode.argtypes = [_P, _I, _P, _P, _I, _I, _I, _P, _I, _P, _I]
    if not _self_test(lib):
        logger.warning("native rANS coder failed its self-test: using the torch coder")
        return None
    return lib


def _self_test(lib: ctypes.CDLL) -> bool:
    from lmc_connector.ops.codecs import rans_torch
    from lmc_connector.ops.codecs.rans_tables import build_tables

    g = torch.Generator().manual_seed(0)
    tables = build_tables(torch.rand(3, 5, generator=g) ** 4)
    dists = torch.randint(0, 3, (2, 1, 7), generator=g)
    syms = torch.randint(0, 5, (2 * 11, 1, 7), generator=g)
    codes = (dists.repeat_interleave(11, 0) * 5 + syms).to(torch.int16)
    want_words, want_states = rans_torch.encode(codes, tables)
    words, states = encode_run(lib, codes, 0, tables)
    if words != want_words[0].to(torch.int16).numpy().tobytes():
        return False
    if states != want_states[0].numpy().tobytes():
        return False
    got = torch.empty((22, 7), dtype=torch.uint8)
    ok = decode_run(lib, words, torch.from_numpy(_u32(states)), dists[:, 0], 11, tables, got)
    return ok and bool(torch.equal(got.long(), syms[:, 0]))


def _u32(buf: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(buf, dtype="<u4").astype(np.int32)


def _ptr(a: np.ndarray | torch.Tensor) -> int:
    return int(a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr())


def encode_run(
    lib: ctypes.CDLL, codes: torch.Tensor, run: int, tables: RansTables
) -> tuple[bytes, bytes]:
    """The words (u16 LE) and final states (u32 LE) of run `run` of codes [steps, runs,
    streams] (contiguous int16, CPU), as rans_torch.encode gives them."""
    steps, runs, streams = codes.shape
    assert tables.enc.device.type == "cpu" and codes.device.type == "cpu"
    cap = steps * streams + 1
    out = np.empty(cap, dtype=np.uint16)
    states = np.empty(streams, dtype=np.uint32)
    n = lib.lmc_rans_encode(
        codes.data_ptr() + run * streams * 2, steps, streams, runs * streams,
        tables.enc.data_ptr(), tables.enc.numel(), _ptr(states), _ptr(out), cap,
    )  # fmt: skip
    if n < 0:
        raise ValueError("rANS codes out of the tables' range")
    return out[cap - n :].tobytes(), states.tobytes()


def decode_run(
    lib: ctypes.CDLL,
    words: bytes | memoryview,
    states: torch.Tensor,
    dists: torch.Tensor,
    tokens: int,
    tables: RansTables,
    out: torch.Tensor,
) -> bool:
    """Decode one run into `out` [nblk * tokens, streams] (uint8, rows contiguous, may be a
    strided view): True when every stream ended in the initial state having consumed exactly
    the run's words."""
    assert tables.dec.device.type == "cpu" and out.device.type == "cpu"
    nblk, streams = dists.shape
    n = len(words) // 2
    buf = np.frombuffer(words, dtype="<u2", count=n)  # read in place: no copy to fault in
    if buf.ctypes.data % 2:
        buf = buf.copy()
    x = states.to(torch.int32).numpy().astype(np.uint32)
    d = dists.to(torch.int32).contiguous()
    used = lib.lmc_rans_decode(
        _ptr(buf), n, _ptr(x), d.data_ptr(), nblk, tokens, streams, tables.dec.data_ptr(),
        tables.dec.numel(), out.data_ptr(), out.stride(0),
    )  # fmt: skip
    return used == n and len(words) % 2 == 0 and bool((x == L).all())
