"""webhooks/: events, not only polls. The webhook receiver (``factory-worker webhooks --serve``): signed GitHub,
Linear and Slack deliveries checked (:mod:`.verify`), deduplicated and answered at once, then acted on by one
worker thread (:mod:`.receiver`; the HTTP around it: :mod:`.server`); what a delivery means (:mod:`.events`);
an issue event's one gate pass through the poll's rules, gate and caps (:mod:`.gate`); tracker comments:
``/factory stop`` / ``/factory retry`` from those allowed to give them, the rest to the running agent's
``FACTORY_INBOX`` (:mod:`.comments`).

May import: dispatch, loop, context, writeback, chat, agents, sources, ledger, config. Never Celery: the receiver
runs in its own process, and sending an agent task (like stopping one) is a callable handed in by the CLI.
"""
