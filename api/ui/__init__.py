"""The web console at ``/ui``: server-rendered pages over the same services as the API, signed
in with an EVC token exchanged for a server-side session (:mod:`evc.api.ui.session`)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint(
    "ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static", static_url_path="/static"
)

# the views register themselves on ``bp``
from evc.api.ui import actions, pages, session  # noqa: E402, F401

__all__ = ["bp"]
