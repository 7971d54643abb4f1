"""The one exception type for bad input and unsupported requests."""


class ShardproofError(Exception):
    """Bad input or an unsupported request; the message is one line naming the file or the numbers at fault."""
