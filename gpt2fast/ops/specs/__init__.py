"""One module per op: its :class:`~gpt2fast.ops._spec.OpSpec`, registered on import (``gpt2fast.ops`` imports
every module here)."""
