"""Stage 2, the feature cache: the shard format and the manifest that describes a shard folder."""
