"""Datasets and batching: the synthetic corpus, MIMIC-CXR-JPG (mimic.py) and OpenI (openi.py)
readers, report sections (reports.py), memory-mapped shards (shards.py), tokenizers, the
`--data` registry (registry.py) and Collate. See docs/data.md."""
