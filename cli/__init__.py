"""The ``moefx`` command and its rich views, installed as ``moefx.cli`` (arrives with the CLI issue)."""
