"""The golden regression suite: per registered card, deterministic tiny models converted in a few layouts, each
conversion's config.json and per-rank tensor hashes committed as a manifest under `manifests/`.

`shardproof golden check` regenerates and compares; `shardproof golden update` rewrites the manifests.
"""
