"""Context: attention of prefill chunks over compressed context and the chunk's own tokens."""
