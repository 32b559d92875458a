"""``python -m services.preferences``: the preferences and directory service."""

from belfry import service

from services.preferences.server import build_for
from services.preferences.settings import load_settings

service.main("preferences", load_settings, build_for)
