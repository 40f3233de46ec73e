"""The store as a query service over HTTP (``geomstore serve``): a FastAPI app with a
map viewer at ``/``, tokens, limits, metrics, and tables as JSON, Arrow, Parquet, CSV or
GeoJSON."""

from geomstore.service.app import check_bind, create_app
from geomstore.service.auth import Tokens, load_tokens
from geomstore.service.state import Limits, ServiceConfig

__all__ = ["Limits", "ServiceConfig", "Tokens", "check_bind", "create_app", "load_tokens"]
