"""Message templates people edit (templates/*.txt next to playbook.yaml).

`$name` placeholders (string.Template), so a template holds no code. The
first line may be `Subject: ...`. Every placeholder must be one the incident
fills: a misspelt one is an error when the playbook loads, not a blank in a
customer email during a P0.
"""

from string import Template

from pydantic import BaseModel, ConfigDict

# What every message can say about its incident.
MESSAGE_FIELDS = frozenset(
    {
        "incident_id",
        "title",
        "severity",
        "severity_name",
        "impact",
        "status",
        "next_steps",
        "timestamp",
        "started_at",
        "next_update",
        "procedure",
        "current_step",
        "level",
        "level_name",
        "approval_step",
        "by",
        "reason",
        "duration",
        "report_uri",
        "status_page_url",
        "services",
        "alerts",
    }
)
# The post-incident report adds what only it shows.
REPORT_FIELDS = MESSAGE_FIELDS | frozenset(
    {
        "ended_at",
        "timeline_table",
        "rto_target",
        "rto_actual",
        "rpo_target",
        "rpo_actual",
        "approvals_table",
        "escalations_table",
        "resolution",
        "runbook_outcome",
        "incident_commander",
    }
)
MESSAGE_KINDS = {
    "status_update": MESSAGE_FIELDS,
    "status_page": MESSAGE_FIELDS,
    "customer_notice": MESSAGE_FIELDS,
    "exec_notice": MESSAGE_FIELDS,
    "page": MESSAGE_FIELDS,
    "approval_needed": MESSAGE_FIELDS,
    "resolution": MESSAGE_FIELDS,
    "postmortem_reminder": MESSAGE_FIELDS,
    "report": REPORT_FIELDS,
}


class TemplateError(ValueError):
    """A template that cannot be filled: the message says which placeholder or where the syntax breaks."""


class RenderedMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    subject: str
    body: str


def parse_template(kind: str, text: str) -> tuple[Template, Template]:
    """Split off the subject line and check both parts against the placeholders `kind` may use."""
    first, _, rest = text.partition("\n")
    if first.startswith("Subject:"):
        subject, body = first.removeprefix("Subject:").strip(), rest.lstrip("\n")
    else:
        subject, body = "$title [$incident_id]", text
    parts = Template(subject), Template(body)
    allowed = MESSAGE_KINDS[kind]
    for part in parts:
        if not part.is_valid():
            raise TemplateError(f"{kind} template: invalid placeholder syntax (write $$ for a dollar sign)")
        unknown = sorted(set(part.get_identifiers()) - allowed)
        if unknown:
            raise TemplateError(
                f"{kind} template: unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                f"known: {', '.join(sorted(allowed))}"
            )
    return parts


def render(kind: str, text: str, context: dict[str, str]) -> RenderedMessage:
    subject, body = parse_template(kind, text)
    filled = {name: context.get(name, "") for name in MESSAGE_KINDS[kind]}
    return RenderedMessage(subject=subject.substitute(filled), body=body.substitute(filled).strip() + "\n")
