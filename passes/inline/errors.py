"""The error the inline rewrite reports an FFN it cannot rewrite with."""


class InlineError(RuntimeError):
    """An inline FFN whose module cannot be rewritten (the FFN is left dense, with this reason)."""
