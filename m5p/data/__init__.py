"""Data: raw M5Product layout -> ArrayRecord shards (TFDS-readable) -> Grain batches."""
