"""The one exception type for problems a user can fix (bad recipe, missing file, bad CLI input).

The CLI turns it into a single line on stderr and exit code 2, without a traceback.
Messages name the field or file at fault and, where there is one, the fix.
"""


class MftBenchError(Exception):
    """A user-fixable problem: the message is shown as is."""
