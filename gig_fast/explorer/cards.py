"""Extra cards of the explorer page, each built from a plain dict (whoever computes it — the validation
suite for the paper's App. E — hands the dict over; the explorer only checks and embeds it).

**PFV decomposition card** (paper §3.2.2, App. E, Figs. 7–9), ``kind`` = :data:`DECOMPOSITION_CARD_KIND`::

    {"kind": "pfv_decomposition", "layer": str, "image": int, "position": int, "yx": [y, x], "spatial": [H, W],
     "label": int, "class_name": str, "crop": PNG data URI | None (the PFV's iERF with context),
     "norm": ‖x‖, "centred_norm": ‖x − β‖, "rel_l2": ‖x − x̂‖/‖x‖, "residual_norm": ‖x − x̂‖,
     "active": concepts used, "K": concepts of the layer,
     "terms": [{"concept": q, "coefficient": u_q, "norm": ‖v_q‖, "share": |u_q|‖v_q‖ / Σ, "cosine": cos(v_q, x − β),
                "size": PFVs in the concept's cluster | None,
                "samples": [{"crop": data URI | None, "image": int, "label": int, "cosine": float,
                             "member": bool}, …]}, …]}

The page shows the cards listed in the element ``gig-decompositions`` (a "PFV decomposition" menu;
:func:`~gig_fast.explorer.render.render_explorer` and :func:`~gig_fast.explorer.render.insert_decompositions`
embed them); every string stays text.
"""
from __future__ import annotations

__all__ = ["DECOMPOSITION_CARD_KIND", "check_decomposition_card"]

DECOMPOSITION_CARD_KIND = "pfv_decomposition"
_REQUIRED = {"layer": str, "image": int, "position": int, "label": int, "class_name": str, "rel_l2": (int, float),
             "active": int, "K": int, "terms": list}
_TERM = {"concept": int, "coefficient": (int, float), "share": (int, float), "samples": list}


def _check_uri(value, where: str) -> None:
    if value is not None and not (isinstance(value, str) and value.startswith("data:image/png;base64,")):
        raise ValueError(f"{where} must be a PNG data URI or None")


def check_decomposition_card(card: dict) -> dict:
    """Return ``card`` if it has the fields the page draws (see the module docstring), else raise a
    ``ValueError`` that names the first missing or mistyped field."""
    if not isinstance(card, dict) or card.get("kind") != DECOMPOSITION_CARD_KIND:
        raise ValueError(f"a decomposition card is a dict with kind={DECOMPOSITION_CARD_KIND!r}")
    for key, typ in _REQUIRED.items():
        if not isinstance(card.get(key), typ) or isinstance(card.get(key), bool):
            raise ValueError(f"decomposition card field {key!r} missing or not {typ}")
    _check_uri(card.get("crop"), "decomposition card field 'crop'")
    for i, term in enumerate(card["terms"]):
        for key, typ in _TERM.items():
            if not isinstance(term.get(key), typ):
                raise ValueError(f"decomposition card term {i}: field {key!r} missing or not {typ}")
        for j, s in enumerate(term["samples"]):
            _check_uri(s.get("crop"), f"decomposition card term {i} sample {j} crop")
    return card
