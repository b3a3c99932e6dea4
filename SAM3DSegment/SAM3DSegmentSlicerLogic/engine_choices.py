"""The engines the panel offers, the models each runs, and which prompts an engine takes (no Qt).

The volumetric engine (3DSAM-adapter, docs/volumetric.md) runs one of four tumour models and takes
include clicks only. Its box and exclude-click refusals are the library's own ``PromptError``
messages (from ``engines/volumetric.py``, which imports torch and so is not imported in Slicer),
raised before the prompt goes to the server and shown through :func:`.messages.user_message`.
"""

from __future__ import annotations

ENGINE_NAMES: tuple[str, ...] = ("auto", "weightfree", "slicewise", "sam2", "volumetric")
"""The panel's engine list (the library's ``engines.choice.ENGINES``)."""
VOLUMETRIC = "volumetric"
VOLUMETRIC_FAMILY = "sam3d_adapter"

BOX_REFUSED = "3DSAM-adapter takes clicks, not boxes: click inside the object instead."
EXCLUDE_REFUSED = (
    "3DSAM-adapter has no exclude clicks (its prompt encoder takes include points only); "
    "add include clicks, or correct a slice with a mask."
)
"""The library's messages for a box and an exclude click on the volumetric engine (kept equal by a test)."""


def model_family(model: str) -> str | None:
    """The registry family of ``model`` ("sam", "sam2", "litemedsam", "sam3d_adapter"), or None when
    unknown or empty."""
    if not model:
        return None
    from SAM3DSegmentLib.models.registry import REGISTRY

    spec = REGISTRY.get(model)
    return spec.family if spec is not None else None


def volumetric_models() -> list[str]:
    """The 3DSAM-adapter models (one per CT tumour task), in registry order."""
    from SAM3DSegmentLib.models.registry import REGISTRY

    return [name for name, spec in REGISTRY.items() if spec.family == VOLUMETRIC_FAMILY]


def engine_of(engine: str, model: str = "") -> str:
    """The engine the settings run: "auto" with a 3DSAM-adapter model is the volumetric engine, as in
    the library's engine choice; otherwise ``engine`` ("auto" stays undecided until a session opens)."""
    if engine == "auto" and model_family(model) == VOLUMETRIC_FAMILY:
        return VOLUMETRIC
    return engine


def takes_include_clicks_only(engine: str) -> bool:
    return engine == VOLUMETRIC


def prompt_refusal(engine: str, prompt) -> str | None:
    """Why ``engine`` cannot take ``prompt`` (a ``SlicePrompt``), or None when it can."""
    if not takes_include_clicks_only(engine):
        return None
    if prompt.box is not None:
        return BOX_REFUSED
    if any(not point.positive for point in prompt.points):
        return EXCLUDE_REFUSED
    return None


def mode_refusal(engine: str, mode: str) -> str | None:
    """Why ``engine`` cannot take what the effect's click mode makes ("box", "exclude"), or None."""
    if not takes_include_clicks_only(engine):
        return None
    return {"box": BOX_REFUSED, "exclude": EXCLUDE_REFUSED}.get(mode)


def model_note(engine: str, model: str) -> str | None:
    """What the panel says when the engine and model do not go together for the volumetric engine."""
    engine = engine_of(engine, model)
    family = model_family(model)
    names = ", ".join(volumetric_models())
    if engine == VOLUMETRIC and not model:
        return (f"The volumetric engine needs one of its models: {names} (a tumour model for one CT task), "
                "with its downloaded last.pth.tar as the checkpoint file.")
    if engine == VOLUMETRIC and family != VOLUMETRIC_FAMILY:
        return f"The volumetric engine runs the 3DSAM-adapter models only: choose one of {names}."
    if engine in ("slicewise", "sam2") and family == VOLUMETRIC_FAMILY:
        return f"{model} is a 3DSAM-adapter model: choose the volumetric engine."
    return None
