"""``python -m services.gateway``."""

from belfry import service

from services.gateway.server import build_for, listeners
from services.gateway.settings import load_settings

service.main("gateway", load_settings, build_for, listeners=listeners)
