"""The stages of `make bench` (scripts/bench.py) and the helpers scripts/bench_real.py shares.

- ``common``: the result table, clocks, the CPU's name and measured matmul rate, FLOP counting,
  the RegionSpot-BL sizes and the speed goals.
- ``bl_shards``: synthetic shards of RegionSpot-BL's size (SAM ViT-B + CLIP ViT-L/14 features).
- ``data_stage``: the demo images, tiny backbones and their shards, made through the package's CLIs' code.
- ``extract_stage``: extraction against SamPredictor per box, its options and its parts.
- ``load_stage``: the shard reader against ``cat``, its decode path against webdataset's.
- ``flops_stage``: what the GPU goals ask of the hardware, counted.
- ``train_stage``: the BL head step from cached features against running CLIP (and SAM) per batch.
- ``eval_stage``: the batched head pass over cached splits, and the LVIS metric step's backends.
"""
