class UserError(Exception):
    """Bad input from the user: the CLI prints it on one line and exits non-zero.

    The message names the offending file, row or key.
    """


class StorageError(UserError):
    """The storage behind a URL refused a request (wrong credentials, no such bucket) or
    could not be reached; the message names the URL."""


class StorageUnavailable(StorageError):
    """A transient failure (a 5xx, a timeout, a reset connection) that outlasted the
    retries with backoff. Trying again later may succeed: Prefect's I/O tasks retry on it."""
