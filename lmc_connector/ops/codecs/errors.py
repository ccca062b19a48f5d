"""The codec error types."""

from __future__ import annotations


class CodecError(ValueError):
    """A blob is malformed, truncated, corrupted or does not match what was asked of it."""


class UnknownCodecError(ValueError):
    """No codec is registered under the requested name."""


class MissingCalibrationError(CodecError):
    """A calibrated codec was asked to work without the calibration it needs.

    `calibration_id` names the calibration a blob needs (None: a codec was built without
    one). Treat it as a miss: load that calibration (e.g. into the CalibrationStore given to
    decode_blob) and retry, or recompute the KV; never substitute another calibration.
    """

    def __init__(self, calibration_id: str | None) -> None:
        self.calibration_id = calibration_id
        if calibration_id is None:
            message = (
                "this codec needs a calibration: fit one with fit_calibration(name, chunks) "
                "(or POST /calibrate) and pass get_codec(name, calibration=...)"
            )
        else:
            message = (
                f"this blob needs calibration {calibration_id}, which is not available: add it "
                "to the CalibrationStore given to decode_blob (calibrations=...)"
            )
        super().__init__(message)
