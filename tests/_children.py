"""Child processes of the tests import the very ``gig_fast`` the test process imported: in CI that is
the installed package, whose compiled backends the checkout's copy lacks (``make test`` builds
nothing in place). A child that put the checkout first on its path would run the torch fallbacks and
differ from the parent in the solvers' last digits (a served explanation 3e-4 off the in-process
one, a resumed graph 2e-4 off the uninterrupted one — CI, before this helper)."""
import os
from pathlib import Path

import gig_fast

PACKAGE_ROOT = str(Path(gig_fast.__file__).resolve().parents[1])


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with :data:`PACKAGE_ROOT` first on ``PYTHONPATH`` (start children outside the
    checkout, e.g. ``cwd=tmp_path``: ``python -m`` and ``-c`` put the working folder first)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]), **extra)
