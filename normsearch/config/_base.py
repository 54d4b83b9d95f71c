"""Base class of every configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

class _Strict(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
