"""The presentation layer shared by the CLI and the TUI, so both say the same things the same way.

- ``format``: sizes, counts, tables and aligned label/value lines.
- ``card``: a model's card (the labelled GGUF fields `pie-local show` prints and the TUI's
  models screen shows).
- ``problems``: what the user is told when something fails (a message and its fix) and the exit
  status of every command.

Imports stay light: nothing here loads the runtime or the driver.
"""
