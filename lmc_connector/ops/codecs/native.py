"""The codecs' C kernels as one small library, built on first use, loaded with ctypes.

Sources: `_rans.c` (the rANS coder, rans_native.py), `_cachegen.c` (CacheGen's quantizer
and dequantizer, cachegen_native.py) and `_fp8.c` (fp8's dequantizer, fp8_native.py), with
`_kernels.h` (what they share). The library is compiled with the system's C
compiler the first time a process needs it, into `$LMC_CACHE_DIR` (default
`~/.cache/lmc_connector`; a private temporary directory where that cannot be written), named
by a hash of the sources and the compiler, and loaded with ctypes (calls release the GIL).
No compiler, a failed build or `LMC_CODEC_NATIVE=0` means `library()` is None; each user
also checks its own kernels against the torch code before trusting them, and the codecs fall
back to that torch code: same bytes, slower.
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
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("_rans.c", "_cachegen.c", "_fp8.c")]
_HEADERS = [Path(__file__).with_name("_kernels.h")]
# No contraction of a product and a sum into one rounding: the kernels match torch bit for bit.
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off"]
P = ctypes.c_void_p
I64 = ctypes.c_int64
# (name, result, arguments) of every exported kernel.
_SIGNATURES = [
    ("lmc_rans_encode", I64, [P, I64, I64, I64, P, I64, P, P, I64]),
    ("lmc_rans_decode", I64, [P, I64, P, P, I64, I64, I64, P, I64, P, I64]),
    ("lmc_cg_quantize", None, [P, I64, I64, I64, P, P, P, P]),
    ("lmc_cg_codes", None, [P, P, I64, I64, I64, I64, I64, P]),
    ("lmc_cg_dequant", I64, [P, P, P, I64, I64, I64, I64, I64, I64, I64, P]),
    ("lmc_fp8_dequant", I64, [P, P, P, I64, I64, I64, P]),
]
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}
_checked_lock = threading.Lock()
_checked: dict[str, ctypes.CDLL | None] = {}


def library() -> ctypes.CDLL | None:
    """The loaded kernels library, or None where the codecs must use their torch code."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


def checked(part: str, self_test: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """The library once its kernels of `part` passed `self_test` (run once per process), or
    None where that part must use its torch code."""
    with _checked_lock:
        if part not in _checked:
            lib = library()
            if lib is not None and not self_test(lib):
                logger.warning("native %s failed its self-test: using torch code", part)
                lib = None
            _checked[part] = lib
        return _checked[part]


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
    """The library built from the sources with `flags`: from the cache directory, else
    compiled there, else (read-only home, ...) compiled into a private temporary directory."""
    tag = hashlib.sha256(" ".join(cc + flags).encode() + sys.platform.encode())
    for source in _SOURCES + _HEADERS:
        tag.update(source.read_bytes())
    name = f"kernels-{tag.hexdigest()[:16]}.so"
    target = _cache_dir() / name
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    except OSError:
        target = Path(tempfile.mkdtemp(prefix="lmc-kernels-")) / name
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [*cc, *flags, "-o", tmp, *map(str, _SOURCES)],
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
        logger.info("no C compiler found: codecs use their torch code (slower on CPU)")
        return None
    for flags in (_FLAGS, [*_FLAGS, "-DLMC_PLAIN"]):  # without per-ISA clones, e.g. no ifunc
        try:
            lib = ctypes.CDLL(str(_build(cc, flags)))
            break
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("codec kernels build failed (%s %s): %s", cc, flags, e)
    else:
        logger.warning("codec kernels unavailable: the codecs use their torch code")
        return None
    for name, result, args in _SIGNATURES:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = result, args
    return lib
