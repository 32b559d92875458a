"""``python -m services.webpush``."""

from belfry import service

from services.webpush.server import build_for
from services.webpush.settings import load_settings

service.main("webpush", load_settings, build_for)
