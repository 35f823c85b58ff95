"""Tracker write-back: the outbox and its GitHub and Linear writers."""
