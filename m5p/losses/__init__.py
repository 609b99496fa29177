"""SCALE objectives: harmonized contrastive loss and the five masked-task losses."""
