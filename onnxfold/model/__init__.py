"""The ONNX file: loading (external data, normalisation, shapes), saving atomically, and the table
of per-op weight layouts. Protobuf is touched only in this package and in runtime/."""
