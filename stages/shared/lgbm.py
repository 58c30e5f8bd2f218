"""LightGBM for a process that serves boosters and never fits one.

``import lightgbm`` imports scikit-learn too when it is installed (``lightgbm.compat``, for
its scikit-learn estimators), and with it SciPy's statistics: 1.2 of the 2.4 s the import
takes on the 2-core development machine, idle, and more while the other stages start on the
same cores. The prediction stage only loads model text into ``lightgbm.Booster`` and calls
``predict``, which do not use scikit-learn.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_lightgbm_without_sklearn() -> ModuleType:
    """Import LightGBM as if scikit-learn were not installed, and return it.

    While LightGBM is imported, ``sys.modules["sklearn"]`` is None, so its ``from sklearn
    import ...`` raises ImportError and LightGBM defines its scikit-learn estimators as
    unavailable (``lightgbm.compat.SKLEARN_INSTALLED`` False); the entry is removed again,
    so a later ``import sklearn`` in the process works as usual. A LightGBM (or
    scikit-learn) already imported is left as it is.
    """
    if "lightgbm" in sys.modules or "sklearn" in sys.modules:
        import lightgbm

        return lightgbm
    sys.modules["sklearn"] = None  # type: ignore[assignment]
    try:
        import lightgbm
    finally:
        del sys.modules["sklearn"]
    return lightgbm
