"""``python -m services.batching``."""

from belfry import service

from services.batching.server import build_for
from services.batching.settings import load_settings

service.main("batching", load_settings, build_for)
