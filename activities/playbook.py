"""PlaybookActivities: what the playbook says about a run or an incident.

Workflows cannot read files; the worker loads and validates playbook.yaml at
start-up and answers from memory.
"""

from temporalio import activity
from temporalio.exceptions import ApplicationError

from models.errors import ErrorKind
from models.incident import IncidentPlan, PlanRequest
from models.playbook import Objectives, Playbook, Severity
from models.runbooks import runbook


class PlaybookActivities:
    def __init__(self, playbook: Playbook):
        self.playbook = playbook

    @activity.defn
    def objectives_for(self, procedure: str) -> Objectives:
        """The RTO and RPO targets (durations) the procedure is measured against. UnknownProcedure
        (non-retryable) when the playbook does not list it.
        """
        try:
            return self.playbook.objectives_for(procedure)
        except KeyError as err:
            raise ApplicationError(str(err.args[0]), type=ErrorKind.UnknownProcedure, non_retryable=True) from err

    @activity.defn
    def approvers_for(self, procedure: str, severity: Severity) -> dict[str, list[str]]:
        """The roster of one runbook: gate -> people who may decide it ("*": every other gate)."""
        return self.playbook.approvers_for(severity, procedure)

    @activity.defn
    def plan_incident(self, req: PlanRequest) -> IncidentPlan:
        """Classify (a person's choice wins over the rules) and gather the severity's policy."""
        pb = self.playbook
        severity, procedure, rule_input, how = req.severity, req.procedure, {}, "set when opened"
        rule = next((r for r in pb.classification.rules if r.matches(req.labels)), None)
        if rule is not None:
            rule_input = {
                **rule.runbook_input,
                **{field: req.labels[label] for field, label in rule.input_from_labels.items() if label in req.labels},
            }
            if severity is None:
                severity, how = rule.severity, f"rule matching {rule.match}"
            procedure = procedure or rule.procedure
        if severity is None:
            mapped = pb.classification.severity_labels.get(req.labels.get("severity", ""))
            severity = mapped or pb.classification.default_severity
            how = f"alert label severity={req.labels['severity']}" if mapped else "playbook default"
        if procedure == "none":
            procedure = None
        if procedure is not None and procedure not in pb.procedures:
            raise ApplicationError(
                f"procedure {procedure!r} is not in the playbook's procedures "
                f"({', '.join(sorted(pb.procedures))}, or none)",
                type=ErrorKind.UnknownProcedure,
                non_retryable=True,
            )
        policy = pb.severities[severity]
        objectives = pb.objectives_for(procedure) if procedure else None
        commanders = [n for n, p in pb.people.items() if "incident_commander" in p.roles]
        return IncidentPlan(
            severity=severity,
            severity_name=policy.name,
            impact=policy.impact,
            classified_by=how,
            procedure=procedure,
            workflow=runbook(procedure).workflow_type if procedure else None,
            runbook_input=rule_input,
            notify=policy.notify,
            status_update_every=policy.status_update_every,
            status_page_update_every=policy.status_page_update_every,
            customer_notice_within=policy.customer_notification_within,
            exec_notice_within=policy.exec_notification_within,
            levels=pb.escalation.levels,
            repage_every=pb.escalation.repage_every,
            approval_escalate_after=policy.approval_escalate_after,
            postmortem_after=pb.postmortem_within,
            responders=sorted(pb.people),
            resolvers=pb.approvers_for(severity, procedure or "")["*"],
            incident_commander=commanders[0] if commanders else None,
            rto_target=objectives.rto if objectives else None,
            rpo_target=objectives.rpo if objectives else None,
        )
