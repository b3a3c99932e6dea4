"""Short messages for errors, shown to the user instead of tracebacks.

The library's messages advise command-line options (``--checkpoint FILE``, ``--adapter FILE``,
``sam3d models download``); in Slicer the same advice names the SAM 3D module's panel and its
fields ("Checkpoint file", "Adapter file") instead.
"""

from __future__ import annotations

import re

from SAM3DSegmentLib.errors import (
    CheckpointError,
    DependencyError,
    DownloadError,
    ModelOutOfMemoryError,
    PropagationCancelled,
    SAM3DError,
    ServerError,
)

MODULE = "the SAM 3D Segment module"
ADAPTER_FIELD = f"the Adapter file (Server section of {MODULE})"
OUT_OF_MEMORY_ADVICE = (
    "The model ran out of memory. Try: the CPU device, a smaller model (SAM 2.1 tiny, MedSAM2), "
    "a slice range around the object, or cropping the volume (Crop Volume module)."
)
MANUAL_DOWNLOAD = "shares it only as a page"
"""In the library's advice for checkpoints that must be downloaded by hand (e.g. 3DSAM-adapter's)."""
SERVER_STOPPED_ADVICE = "The segment was not changed; the next action starts the SAM 3D server again."

# (pattern in a library message, what to say in Slicer instead); applied in order.
PANEL_ADVICE: tuple[tuple[str, str], ...] = (
    # adapter files (models/adapters.py, engines/choice.py): before the general --model / --checkpoint advice
    (r"Give the file `sam3d finetune` wrote\.", f"Choose the file the fine-tuning wrote as {ADAPTER_FIELD}."),
    (r"write it again with `sam3d finetune`", f"fine-tune again and choose the new file as {ADAPTER_FIELD}"),
    (r"Pass a base checkpoint with --checkpoint, an adapter from `sam3d finetune` with --adapter\.",
     f"Choose a base checkpoint as the Checkpoint file and an adapter from fine-tuning as {ADAPTER_FIELD}."),
    (r"use --model ([\w.\-]+) or an adapter made for ([\w.\-]+?)\.",
     rf"choose the model \1 in {MODULE}, or an adapter made for \2 as {ADAPTER_FIELD}."),
    (r"pass the original with --checkpoint", f"choose the original as the Checkpoint file in {MODULE}"),
    (r"give --model \(e\.g\. ([\w.\-]+)\) with --adapter",
     rf"choose a model (e.g. \1) in {MODULE}, or clear {ADAPTER_FIELD}"),
    (r"--adapter( FILE)?", ADAPTER_FIELD),
    # the volumetric engine (engines/volumetric.py, engines/choice.py): before the general advice
    (r"correct a slice with a mask", "correct a slice with a lasso or any Segment Editor tool (the edited slice is "
                                     "kept when you propagate)"),
    (r"needs --model, the 3DSAM-adapter checkpoint of the task:",
     f"needs a model, the 3DSAM-adapter checkpoint of the task (choose it in {MODULE}):"),
    (r"then pass --checkpoint FILE --model ([\w.\-]+)",
     rf"then choose it as the checkpoint file with the model \1 in {MODULE}"),
    (r"`?sam3d models download [\w.\-]+`?", f"press 'Download model' in {MODULE}"),
    (r"`?sam3d models list`?", f"the model list in {MODULE}"),
    (r"(pass|add|give|check the path given with) (a valid (checkpoint )?file with )?--checkpoint( FILE)?",
     f"choose a local checkpoint file in {MODULE}"),
    (r"--checkpoint FILE", f"a local checkpoint file in {MODULE}"),
    (r"(use |choose the matching |add )?--model [\w.\- ]+", f"choose the matching model in {MODULE}"),
    (r"drop --model/--checkpoint", f"clear the model and checkpoint in {MODULE}"),
    (r"(use )?--engine (\w+)", rf"choose the \2 engine in {MODULE}"),
    (r"(use )?--device (cpu or auto|\w+)", f"choose the CPU (or auto) device in {MODULE}"),
    (r"Check --token-file\.", f"Check the server's token file in {MODULE}."),
    (r"give --token-file \(the file `sam3d serve` printed\)", f"choose the server's token file in {MODULE}"),
    (r"\(sam3d serve --max-volume-mb\)", "(the server's limit): crop the volume first (Crop Volume module)"),
    (r"Is `sam3d serve` running there\?", f"Check the server URL in {MODULE} (empty: a local server)."),
    (r"`pip install --force-reinstall ([^`]+)`", rf"press 'Install dependencies' in {MODULE}"),
)


def panel_advice(text: str) -> str:
    """``text`` with command-line advice replaced by the panel's buttons and fields."""
    for pattern, replacement in PANEL_ADVICE:
        text = re.sub(pattern, replacement, text)
    return text


def is_about_the_adapter(text: str) -> bool:
    """Whether a message is about the adapter file (then the model download advice does not fit)."""
    return bool(re.search(r"\b[Aa]dapter\b", text.replace("3DSAM-adapter", "")))


def user_message(error: BaseException) -> str:
    """What to tell the user about ``error`` (the library's errors already carry advice)."""
    if isinstance(error, PropagationCancelled):
        return "Cancelled; the segment was not changed."
    if isinstance(error, ModelOutOfMemoryError):
        return panel_advice(str(error)) or OUT_OF_MEMORY_ADVICE
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return OUT_OF_MEMORY_ADVICE
    if isinstance(error, DependencyError):
        return f"{panel_advice(str(error))}\nOpen {MODULE} and press 'Install dependencies'."
    if isinstance(error, ImportError):
        return f"A required package is missing ({error}). Open {MODULE} and press 'Install dependencies'."
    if isinstance(error, (CheckpointError, DownloadError)):
        if is_about_the_adapter(str(error)) or MANUAL_DOWNLOAD in str(error):
            return panel_advice(str(error))  # the message says how to get the file; 'Download model' cannot
        return (f"{panel_advice(str(error))}\nPress 'Download model' in {MODULE}, "
                "or choose a local checkpoint file there.")
    if isinstance(error, ServerError):
        text = panel_advice(str(error))
        if "not changed" not in text:
            text += " " + SERVER_STOPPED_ADVICE
        if ("Install dependencies" not in text and not is_about_the_adapter(str(error))
                and MANUAL_DOWNLOAD not in str(error)):
            text += f" If this repeats, open {MODULE} and press 'Install dependencies'."
        return text
    if isinstance(error, SAM3DError):
        return panel_advice(str(error))
    return f"Unexpected error: {type(error).__name__}: {error}. Details are in the Python console / log."
