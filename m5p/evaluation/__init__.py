"""Downstream evaluation: retrieval (and, later, classification and clustering)."""
