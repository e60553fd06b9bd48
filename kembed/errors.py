"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""


class KembedError(Exception):
    """Base class for every error kembed reports to the user as a one-line message."""


class DataError(KembedError):
    """Malformed input data.

    Args:
        path: the file that holds the bad input.
        message: what is wrong.
        record: the record's position or id in the file, when one record is at fault.
        field: the field of that record, when one field is at fault.
    """

    def __init__(self, path, message: str, record=None, field: str | None = None):
        self.path, self.record, self.field = str(path), record, field
        where = self.path
        if record is not None:
            where += f": record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(KembedError):
    """A recipe or a key=value override that does not validate."""


class ModelError(KembedError):
    """A model argument that cannot be resolved or loaded offline."""


class TrainingError(KembedError):
    """Training that cannot go on, e.g. a non-finite loss or gradient norm (the weights would be
    NaN from that step on)."""
