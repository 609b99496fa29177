"""The SCALE model: layers, the five unimodal towers, the joint co-transformer."""
