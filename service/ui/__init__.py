"""The web view's static files (``static/``: the page, its ES modules, its style sheet and the vendored uPlot),
shipped as package data and served by ``service.routes.ui``."""
