"""``python -m services.webhooks``."""

from belfry import service

from services.webhooks.server import build_for
from services.webhooks.settings import load_settings

service.main("webhooks", load_settings, build_for)
