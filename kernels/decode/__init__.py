"""Decode: attention of one new query per sequence over its compressed paged cache."""
