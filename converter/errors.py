"""The project's exception types: bad input, and a check that cannot run on a valid input."""


class ShardproofError(Exception):
    """Bad input or an unsupported request; the message is one line naming the file or the numbers at fault."""


class CheckNotRun(Exception):
    """A valid checkpoint uses a feature a check cannot execute yet (e.g. a rotary variant the sharded runtime
    does not implement): the check is reported as not run, with this message as the reason, never as failed."""
