"""Pure maths and small pieces: solves, precision, Gram packing, calibration data, adapters, errors of input."""
