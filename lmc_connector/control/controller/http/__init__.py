"""The controller's HTTP API: the app, its routes by concern, and the body helpers."""
