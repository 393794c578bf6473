"""The Atlassian Statuspage API (or anything speaking it): one status page incident per drp incident.

GET /incidents/unresolved, POST /incidents, PATCH /incidents/<id>, with
`Authorization: OAuth <token>`. The drp incident ID in brackets in the name is
what finds the page's incident again, so a retry updates instead of opening a
second one.
"""

import httpx


def open_or_update(
    http: httpx.Client, base: str, token: str, incident_id: str, name: str, body: str, status: str = "identified"
) -> str:
    """Open the status page incident for this drp incident, or update the open one; returns its id."""
    base = base.rstrip("/")
    headers = {"Authorization": f"OAuth {token}"}
    tag = f"[{incident_id}]"
    found = [
        i
        for i in http.get(f"{base}/incidents/unresolved", headers=headers).raise_for_status().json()
        if tag in i.get("name", "")
    ]
    if found:
        resp = http.patch(
            f"{base}/incidents/{found[0]['id']}", headers=headers, json={"incident": {"status": status, "body": body}}
        )
    else:
        resp = http.post(
            f"{base}/incidents",
            headers=headers,
            json={"incident": {"name": f"{name} {tag}", "status": status, "body": body}},
        )
    return resp.raise_for_status().json()["id"]
