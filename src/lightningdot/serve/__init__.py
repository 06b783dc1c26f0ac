"""The HTTP service (`ldot serve`); needs the `serve` extra (FastAPI, uvicorn)."""

from lightningdot.serve.app import create_app

__all__ = ["create_app"]
