"""Reference forward pass over a TensorRT-LLM checkpoint directory, in pure torch.

Reads only ``config.json`` and ``rank{N}.safetensors`` and follows TensorRT-LLM's runtime semantics:
column-parallel ``qkv``/``fc``/``gate``/``lm_head``, row-parallel ``dense``/``proj`` whose partial sums are
all-reduced over the TP group before the replicated bias is added once, vocab-parallel logits all-gathered
over TP, and hidden states handed from stage to stage. The checkpoint's architecture card names the family
forward that runs it.

- ``config``: ``RuntimeConfig`` and ``load_config``; ``rank_files``: ``ShardedCheckpoint``, ``RankWeights``
- ``collectives``: ``Collectives`` and ``SimulatedCollectives``
- ``blocks``: the shared math, per TP rank; ``families/``: one module per family forward (``family``: registry)
- ``stage``: one pipeline stage; ``simulated``: ``run_simulated``; ``distributed``: ``run_distributed`` (torchrun)
"""
