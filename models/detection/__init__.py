"""Detection matching: prompt parsing, ONNX detector runtime, export and the matching score."""
