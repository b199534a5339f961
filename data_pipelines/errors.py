"""The one exception data_pipelines raises for expected failures (bad corpus, bad prepared data,
a refused loader state). Its message is one line that says what and where; the CLI prints it
without a traceback."""


class DataError(ValueError):
    """A corpus, prepared directory or loader state that cannot be used; one-line message."""
