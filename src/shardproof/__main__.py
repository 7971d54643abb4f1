"""`python -m shardproof`: the same command line as `shardproof`."""

from shardproof.cli import app

app(prog_name="shardproof")
