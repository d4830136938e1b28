"""The one exception type that reaches the user as a single clear line (see `utils.core.cli.main_guard`),
and how untrusted text is quoted in such a line."""


class UserError(Exception):
    """A problem with the user's input or environment: the message names the problem and the fix."""


def shown(value, limit: int = 160) -> str:
    """Text from an untrusted file (a record, a data set) for an error message: control characters
    escaped, so the file cannot drive the terminal or break the one-line rule; cut to `limit`."""
    text = repr(str(value))[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."
