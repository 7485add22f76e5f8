"""Together's legacy `POST /inference` API (also at /api/inference, the legacy SDK's path)."""
