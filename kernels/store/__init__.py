"""Store: quantize a step's new keys and values into their paged records."""
