"""The one exception type users see: a single sentence that says what is wrong and what to do."""


class MoEScopeError(ValueError):
    """Bad input or an unsupported model; the message is meant to be shown to the user as is."""
