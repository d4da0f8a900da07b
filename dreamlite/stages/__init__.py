"""Built-in recipe stage kinds; importing this package registers them all."""
from . import models, world  # noqa: F401
