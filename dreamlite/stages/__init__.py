"""Built-in recipe stage kinds; importing this package registers them all."""
from . import compress, models, recover, rl, steps, world  # noqa: F401
