"""ReportActivities: the post-incident report (playbook 6.1), filled from the incident's own record.

Facts only: every timeline entry with its UTC time, targets against what the
run measured, approvals and escalations. Root cause, lessons and action items
are left for the people at the blameless postmortem. The Markdown goes to S3
(overwritten by a retry with the same content) and `drp report` prints it.
"""

from temporalio import activity

from adapters.reports import (
    render_report,
    split_s3,
)
from models.incident import ReportRequest
from models.playbook import Playbook


class ReportActivities:
    def __init__(self, playbook: Playbook, s3, destination: str):
        self.playbook = playbook
        self.s3 = s3
        self.bucket, self.prefix = split_s3(destination)

    @activity.defn
    def write_report(self, req: ReportRequest) -> str:
        """Render the post-incident report (Markdown) and put it in S3 under `<destination>/<incident>.md`;
        a retry overwrites it with the same content. Returns its s3:// URI.
        """
        markdown = render_report(self.playbook.communication.templates["report"], req)
        key = f"{self.prefix}/{req.incident_id}.md".lstrip("/")
        self.s3.put_object(
            Bucket=self.bucket, Key=key, Body=markdown.encode(), ContentType="text/markdown; charset=utf-8"
        )
        return f"s3://{self.bucket}/{key}"
