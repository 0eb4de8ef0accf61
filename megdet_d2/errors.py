"""``ConfigError``: the one exception type for faults the user fixes in the config or the data.

Raised with a one-line message ``"KEY=value <what is wrong>; <fix>"`` (or naming the file) by
every start-up check and by the few run-time checks that can only see the fault later (an image
the data loader cannot read, a checkpoint that loads too little). ``train_net.py`` turns it into
``Config error: ...`` and exit status 2, without a traceback. It is a ``ValueError`` so code
catching ``ValueError`` keeps working.
"""

__all__ = ["CONFIG_ERROR_EXIT_CODE", "ConfigError"]

# Exit status of a process (launcher or worker) ended by a ConfigError.
CONFIG_ERROR_EXIT_CODE = 2


class ConfigError(ValueError):
    """A config, command-line or input-data fault, described in one line naming the key or file."""
