"""The web UI at /ui (static files) and the admin console's JSON routes."""
