"""The control CLI: the click commands, their output, the fast early path (standard library only)."""
