"""Pydantic models: the contract between starters, workflows and activities.

Only the standard library and pydantic are imported here, so workflows can
import these modules inside the sandbox.
"""
