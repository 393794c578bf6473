"""PlaybookActivities: the targets a run is measured against.

Workflows cannot read files; the worker loads and validates playbook.yaml at
start-up and serves the objectives from memory.
"""

from temporalio import activity
from temporalio.exceptions import ApplicationError

from models.playbook import Objectives, Playbook


class PlaybookActivities:
    def __init__(self, playbook: Playbook):
        self.playbook = playbook

    @activity.defn
    def objectives_for(self, procedure: str) -> Objectives:
        try:
            return self.playbook.objectives_for(procedure)
        except KeyError as err:
            raise ApplicationError(str(err.args[0]), type="UnknownProcedure", non_retryable=True) from err
