"""``ConfigError``: the one exception type for faults the user fixes in the config or the data.

Raised with a one-line message ``"KEY=value <what is wrong>; <fix>"`` (or naming the file) by
every start-up check and by the few run-time checks that can only see the fault later (an image
the data loader cannot read, a checkpoint that loads too little). ``train_net.py`` turns it into
``Config error: ...`` and exit status 2, without a traceback. It is a ``ValueError`` so code
catching ``ValueError`` keeps working.
"""

__all__ = ["CONFIG_ERROR_EXIT_CODE", "ConfigError", "config_error_line"]

# Exit status of a process (launcher or worker) ended by a ConfigError.
CONFIG_ERROR_EXIT_CODE = 2


class ConfigError(ValueError):
    """A config, command-line or input-data fault, described in one line naming the key or file."""


def config_error_line(error):
    """The one line of a ``ConfigError``: its message, or, when a DataLoader worker raised it
    (torch re-raises it with the worker's traceback as message), the original message."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        return last.split("ConfigError: ", 1)[1] if "ConfigError: " in last else last
    return text.splitlines()[0] if text else type(error).__name__
