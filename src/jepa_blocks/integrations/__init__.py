"""Adapters to training frameworks, each behind an optional extra.

* :mod:`jepa_blocks.integrations.lightning`: Lightning callbacks (EMA-target update, online
  kNN / collapse monitor); needs ``pip install 'jepa-blocks[lightning]'``.

Importing :mod:`jepa_blocks.integrations` imports no framework; each submodule imports its
framework when it is imported itself.
"""

# Nothing is re-exported here, so that importing the package never imports a framework:
# import the callbacks from their submodule (jepa_blocks.integrations.lightning).
__all__: list[str] = []
