"""The one exception type that reaches the user as a single clear line (see `utils.cli.main_guard`)."""


class UserError(Exception):
    """A problem with the user's input or environment: the message names the problem and the fix."""
