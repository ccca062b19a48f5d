"""KV chunk codecs: a registry, one self-describing byte format, `fp8` and `cachegen`."""

from lmc_connector.ops.codecs.errors import CodecError, UnknownCodecError
from lmc_connector.ops.codecs.format import BlobHeader
from lmc_connector.ops.codecs.registry import (
    Codec,
    codec_names,
    decode_blob,
    get_codec,
    peek_header,
)

__all__ = [
    "BlobHeader",
    "Codec",
    "CodecError",
    "UnknownCodecError",
    "codec_names",
    "decode_blob",
    "get_codec",
    "peek_header",
]
