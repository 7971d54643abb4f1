"""An out-of-tree shardproof plugin: the OLMo2 architecture and the `npy` weight format.

Installing the package is all it takes: its `shardproof.plugins` entry point names this module, whose import
registers the card (the weight mapper), the sharded runtime's forward for it, and the format's loaders.
"""

from . import card, npy_format, runtime  # noqa: F401
