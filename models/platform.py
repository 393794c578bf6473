"""Inputs and outputs of the application platform activities."""

from pydantic import BaseModel, ConfigDict

from models.identifiers import IncidentId


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True)


class StopAppRequest(_Msg):
    incident_id: IncidentId


class AppStopped(_Msg):
    replicas_before: int


class StartAppRequest(_Msg):
    incident_id: IncidentId
    replicas: int


class AppHealth(_Msg):
    health_status: int
    critical_status: int
    critical_items: int
