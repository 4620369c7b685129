class UserError(Exception):
    """Bad input from the user: the CLI prints it on one line and exits non-zero.

    The message names the offending file, row or key.
    """
