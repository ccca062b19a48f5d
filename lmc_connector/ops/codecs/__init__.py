"""KV chunk codecs: a registry, one self-describing byte format, `fp8`, `cachegen` and the
calibrated `kvtc`.

For the serving path: a calibrated codec's blob names its calibration
(`peek_header(blob).calibration_id`); fit one with `fit_calibration(name, chunks)`, keep its
bytes (named by `calibration_id(blob)`, one per layout: `parse_calibration(blob).layout`),
and decode with `decode_blob(blob, device, calibrations=store)` where `store` is a
`CalibrationStore` (optionally with a loader that fetches missing ones). A blob whose
calibration is not at hand raises `MissingCalibrationError`: a miss, never wrong KV.
"""

from lmc_connector.ops.codecs.calibration import Calibration, calibration_id, parse_calibration
from lmc_connector.ops.codecs.calibration_store import CalibrationSource, CalibrationStore
from lmc_connector.ops.codecs.errors import CodecError, MissingCalibrationError, UnknownCodecError
from lmc_connector.ops.codecs.format import BlobHeader
from lmc_connector.ops.codecs.registry import (
    Codec,
    codec_names,
    decode_blob,
    fit_calibration,
    get_codec,
    is_calibrated,
    peek_header,
    register,
    unregister,
)

__all__ = [
    "BlobHeader",
    "Calibration",
    "CalibrationSource",
    "CalibrationStore",
    "Codec",
    "CodecError",
    "MissingCalibrationError",
    "UnknownCodecError",
    "calibration_id",
    "codec_names",
    "decode_blob",
    "fit_calibration",
    "get_codec",
    "is_calibrated",
    "parse_calibration",
    "peek_header",
    "register",
    "unregister",
]
