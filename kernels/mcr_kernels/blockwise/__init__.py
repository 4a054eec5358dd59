"""`blockwise` backends: the training-path ops built from torch's own fused CPU kernels, in
blocks, so that CPU runs neither materialise what the fused GPU kernels avoid nor run the
unfused reference. Each module registers its ops; see docs/<op>.md."""
