"""Data: raw M5Product layout -> ArrayRecord (TFDS builder) -> Grain batches."""
