"""The web UI's static files (ES modules, CSS, HTML), shipped as package data in `static/`."""
