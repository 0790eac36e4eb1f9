"""The one exception type users see.

Every problem caused by user input (a bad path, an unsupported architecture, a target out of range) is raised as a
``FoldGPTError`` whose message names the problem and the fix on one line. The CLI prints it without a traceback.
"""


class FoldGPTError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it."""
