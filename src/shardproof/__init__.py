"""shardproof: convert HuggingFace checkpoints into TensorRT-LLM checkpoints and prove them exact.

Subpackages: `shardproof.converter` (plan, transforms, architecture cards, writer, reassembler) and
`shardproof.verify` (equivalence check, sharded reference runtime, mutation self-test).
"""

__version__ = "0.2.0"
