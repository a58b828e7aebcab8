"""Stage 1, extract: frozen SAM + CLIP features of a dataset into WebDataset shards
(``python -m regionspot_pl.extract``)."""
