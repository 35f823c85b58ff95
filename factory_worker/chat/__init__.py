"""Humans in the loop: a Slack thread per dispatch, webhook notifications."""
