"""The one base class of the errors a user can fix.

Every command (`r2d3ray ...` and the jobs/*.py hand-offs to it) prints a `UserError` as one line,
`error: <message>`, and exits with status 2: the message names what was wrong and what to do, so
a traceback from deep inside a library would only hide it. Each subclass also derives from the
built-in exception its callers already catch (ValueError, FileNotFoundError, RuntimeError).
"""


class UserError(Exception):
    """A problem the user can fix (a config key, a missing file, an unreachable service)."""
