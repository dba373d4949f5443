"""The result cache: request fingerprints, the entry store (Redis or an in-process LRU),
single-flight of identical edits, and the hosted image files."""
