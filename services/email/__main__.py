"""``python -m services.email``."""

from belfry import service

from services.email.server import build_for, listeners
from services.email.settings import load_settings

service.main("email", load_settings, build_for, listeners=listeners)
