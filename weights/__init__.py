"""Denoisers shipped with dvt-timm and the manifest of the Hub releases (`manifest.json`).

Installed as the package-data module `dvt_timm.weights`; `dvt_timm.registry` reads the manifest.
"""
