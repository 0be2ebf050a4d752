"""The one exception type for bad user input (config, data, checkpoint).

The CLI turns it into one line `error: <field>: <what was expected>` on stderr and exit code 2.
Anything else that escapes is a bug or a failure of the run (exit code 1).
"""


class BadInputError(ValueError):
  """Bad config, data or checkpoint: names the field or file and what was expected."""

  def __init__(self, field: str, expected: str):
    self.field = field
    self.expected = expected
    super().__init__(f"{field}: {expected}")
