"""``fedcxr-clientapp``: the site's launcher of Flower ClientApp processes, with code approval.

Flower's SuperExec starts ``flwr-clientapp`` by name for every message; a site that requires
approval puts ``deploy/site-bin`` (a ``flwr-clientapp`` that runs this) first on the node's
PATH. This runs Flower's own ClientApp process, with one step added between pulling the task
(message, the node's context, the app's FAB) and installing the FAB: the FAB's bytes are
hashed and checked against the site's approvals (``common.approvals``) when the node config
sets ``require-approval = true``. A refused app is never installed, imported or run, so no
data is read; Flower sends the refusal back to the coordinator as the message's error.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.approvals import FAB_HASH_ENV, fab_hash


def check(node_config: dict, content: bytes) -> None:
    """Raise NotApproved unless the node's config does not require approval or the app's
    hash is approved in the site's state folder."""
    from client.node import open_site
    from common.approvals import APPROVALS_FILE, Approvals
    from common.config import RunConfig

    site = open_site(dict(node_config), RunConfig())
    if site.config.require_approval:
        Approvals(Path(site.state_dir) / APPROVALS_FILE).check(content, site.name)


def main() -> None:
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    pulled = {}
    pull, install = runtime.pull_task_input, runtime.install_from_fab

    def pull_and_keep_context(client):
        task = pull(client)
        pulled["context"] = task[1]
        return task

    def install_if_approved(content: bytes, *args, **kwargs):
        check(pulled["context"].node_config, content)
        # the app's identity for the site's audit log (this process then runs the app)
        os.environ[FAB_HASH_ENV] = fab_hash(content)
        return install(content, *args, **kwargs)

    runtime.pull_task_input = pull_and_keep_context
    runtime.install_from_fab = install_if_approved
    flwr_clientapp()


if __name__ == "__main__":
    main()
