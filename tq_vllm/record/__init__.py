"""The bytes: bit packing (packing.py), the per-token, per-KV-head record and every byte offset
in it (layout.py), and one layer's codec between quantizer codes and records (codec.py)."""
