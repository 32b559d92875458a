"""``python -m services.dispatcher``."""

from belfry import service

from services.dispatcher.server import build_for
from services.dispatcher.settings import load_settings

service.main("dispatcher", load_settings, build_for)
