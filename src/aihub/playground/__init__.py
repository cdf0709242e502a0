"""The playground: one page, shipped inside the package, that drives every product.

`GET /` (and `/playground`) serves it, with its script and stylesheet next to it; no build step,
no CDN, nothing fetched from elsewhere, so it works offline with the embedded defaults.
"""
