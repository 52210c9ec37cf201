"""``gig-fast serve --run DIR``: a local HTTP JSON API and the explorer page over a finished run
(optional extra ``gig_fast[serve]``: FastAPI + uvicorn).

* :mod:`.app`: the endpoints (:func:`create_app`) and :func:`serve`, which runs them with uvicorn.
* :mod:`.views`: what the server draws for the explorer page (cards, pair and image views), from what
  the run computed once.

The server reads the run through :class:`gig_fast.Run` (the results reader); importing this package
does not import FastAPI (only :func:`create_app` and :func:`serve` do).
"""
from .app import Workers, create_app, serve
from .views import Views

__all__ = ["serve", "create_app", "Workers", "Views"]
