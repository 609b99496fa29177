"""The five modalities, in the order the joint co-transformer concatenates them."""

MODALITIES: tuple[str, ...] = ("text", "table", "image", "video", "audio")
NUM_MODALITIES = len(MODALITIES)
INDEX = {m: i for i, m in enumerate(MODALITIES)}

# The 10 unordered modality pairs (i < j), in a fixed order used by losses and logs.
PAIRS: tuple[tuple[int, int], ...] = tuple(
    (i, j) for i in range(NUM_MODALITIES) for j in range(i + 1, NUM_MODALITIES))
PAIR_NAMES: tuple[str, ...] = tuple(f"{MODALITIES[i]}-{MODALITIES[j]}" for i, j in PAIRS)
