"""workspace/: a git worktree per dispatch. Repository mirrors (one bare clone per repository, cloned once,
fetched before each dispatch, shared by a worker's slots under a file lock), routing an issue to its
repository (``workspace.repo_url``, or a ``workspace.repos`` label), branch names, the worktree on the issue's
branch given to the agent's uid/gid and removed after the run, the reclaim of what a killed process left, the
agent's result file, and publishing: the agent's leftovers committed, the branch pushed with the worker's
credential, one pull request per issue through GitHub's REST API.

May import: sources (the ``Issue`` model, GitHub's rate-limit reading), config, net (the one HTTP edge). Never
loop/, dispatch/, worker/ or Celery: it is a core a test drives with real git and no broker.

The API the dispatch calls (one :class:`Workspace` per worker process, ``Workspace.from_settings(settings)``;
``enabled`` is False without ``workspace.repo_url`` / ``repos``: then nothing changes for agents):

* ``route(issue) -> Route``: the repository, or ``url=None`` and a ``reason`` (from the settings only) that
  ``explain`` can show. ``prepare`` raises :class:`Unroutable` with that reason.
* ``prepare(issue, attempt, uid, gid, name=None) -> Prepared``: fetch (or clone) the mirror, make the worktree
  on the issue's branch (``workspace.branch``: continuing this worker's unpushed branch or the pushed one, else
  from ``workspace.base``), owned by ``uid``/``gid``. Run the agent with ``cwd=prepared.cwd`` and
  ``prepared.env`` added: ``FACTORY_REPO_DIR``, ``FACTORY_BRANCH``, ``FACTORY_BASE_SHA``, ``FACTORY_RESULT``,
  ``FACTORY_ISSUE_JSON`` (beside the worktree), and ``HOME`` = ``prepared.home`` (beside it too).
  :class:`WorkspaceError` (one line) is a failed attempt. ``name`` (``tree_name(issue, attempt)``): a staged
  attempt's worktree, made by its first stage and found again by the next ones on this root.
* ``publish(prepared, issue) -> Published`` after an exit 0: ``branch``, ``head_sha``, ``commits`` beyond the
  base, ``pushed``, ``pr_url``, ``no_changes``, ``failure`` ("no changes" with ``workspace.no_changes=fail``),
  the agent's ``result`` (or ``result_problem``); ``as_record()`` for the ledger. :class:`PublishError` is a
  failed attempt (retried with backoff; the commits stay on the branch and the next attempt continues it).
* ``outcome(prepared) -> Published``: what a run that is not published (it failed) left, for the record.
* ``release(prepared, keep=None, hand_over=False)``: always, after the run (``finally``): the worktree
  removed, or kept (``agent.keep_workdir``); ``hand_over``: left for the attempt's next stage, its lock dropped.
  ``reclaim()``: once when a worker starts; a staged attempt's worktree between two stages is kept while
  ``keep_staged(name, note)`` (given by the caller, who knows the attempt) says so.

The dispatch calls it from ``dispatch/worktree.py``.

Security model: the worker's git runs only on the mirror (``--git-dir``, its own config, hooks off); the agent
never gets the credential (it is in the environment of the worker's push and fetch git processes only, read
by an askpass helper); what the agent left uncommitted is committed by git running as the agent. See
``docs/ARCHITECTURE.md``, "The life of a workspace".
"""

from factory_worker.config.workspace import NoChanges, Route
from factory_worker.workspace.core import Workspace
from factory_worker.workspace.result import ResultFile
from factory_worker.workspace.types import Prepared, Published, PublishError, Unroutable, WorkspaceError

__all__ = [
    "NoChanges",
    "Prepared",
    "PublishError",
    "Published",
    "ResultFile",
    "Route",
    "Unroutable",
    "Workspace",
    "WorkspaceError",
]
