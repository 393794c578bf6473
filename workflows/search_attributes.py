"""Search attributes the Web UI shows and filters on (registered by the stack)."""

from temporalio.common import SearchAttributeKey

INCIDENT_ID = SearchAttributeKey.for_keyword("IncidentId")
PROCEDURE = SearchAttributeKey.for_keyword("Procedure")
SEVERITY = SearchAttributeKey.for_keyword("Severity")
STATUS = SearchAttributeKey.for_keyword("IncidentStatus")  # investigating ... resolved
