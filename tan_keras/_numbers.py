"""How the package writes numbers: for JSON files and for people.

JSON has no Infinity, and an infinite epsilon (a run without noise) is common
here: `json_safe` writes every non-finite float as null. `short` prints a
number with 4 significant digits and an infinite or missing one as "inf".
"""

import math
from typing import Any, Optional


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively.

    Args:
      value: A float, or a dict, list or tuple holding some.

    Returns:
      The same structure (tuples become lists), JSON-ready.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def short(value: Optional[float]) -> str:
    """4 significant digits; "inf" for an infinite or missing (None) value."""
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.4g}"
