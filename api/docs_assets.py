"""The Swagger UI's own files, served by EVC from the ``swagger-ui-bundle`` package (no CDN:
the API docs page works on an air-gapped network)."""

from __future__ import annotations

from flask import Blueprint, Response, send_from_directory

#: where the docs page (flask-smorest's Swagger UI template) loads its JS and CSS from
ASSETS_URL = "/api/v1/docs/assets/"

bp = Blueprint("docs_assets", __name__)


@bp.route(ASSETS_URL + "<path:filename>")
def asset(filename: str) -> Response:
    """swagger-ui-bundle.js, swagger-ui-standalone-preset.js, swagger-ui.css and the rest."""
    from swagger_ui_bundle import swagger_ui_path

    return send_from_directory(str(swagger_ui_path), filename, max_age=86400)
