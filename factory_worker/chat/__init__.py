"""chat/: humans in the loop. A Slack thread per dispatch (its start and end posted, the humans' replies
delivered to the running agent's inbox) and Slack-compatible webhook notifications.

May import: sources, ledger, config, net (the one HTTP edge).
"""
