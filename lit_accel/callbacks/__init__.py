"""Reusable Lightning callbacks. Each module imports only ``lightning`` and ``torch``."""

__all__: list[str] = []
