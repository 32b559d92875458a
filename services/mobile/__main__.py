"""``python -m services.mobile``."""

from belfry import service

from services.mobile.server import build_for
from services.mobile.settings import load_settings

service.main("mobile", load_settings, build_for)
