"""Evaluation of a trained model, one package for every protocol:

- embedding: the one evaluation path, `embed` a split unmasked and `evaluate` a protocol on it;
- protocols: retrieval metrics and the paper's protocols (full split, 5x200) on embeddings;
- finegrained: retrieval against counterfactual studies (one attribute changed);
- gallery: chunked top-k search over a cached, embedded gallery (mcr.retrieve);
- pictures: training curves, MAE reconstructions and the retrieval grid (mcr.plot).

The CLIs (mcr.evaluate, mcr.retrieve, mcr.plot) parse and check their arguments and call these.
"""
