"""The same click -> 3D mask through nnInteractive's client and through our RemoteSession, one server.

Starts one ``sam3d serve``, puts a byte-counting TCP relay in front of it, and for each repeat
runs the click on a real case through both clients (alternating which goes first): the
nnInteractive client (``/nninteractive``: set_image, set_target_buffer, add_point_interaction) and
our RemoteSession (``/v1``: upload, open, add_prompt, propagate). Prints the wall time of the
setup and of the click, the bytes on the wire each way, whether both give the same 3D mask, and
the ratio nnInteractive / ours. A click whose propagation passes the server's budget
(``--nninteractive-budget``) answers early with the slices done; the script then calls the
client's ``_predict`` until the object is complete ("more", "complete s"); Dice and "same 3D
mask" are of the complete object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nninteractive_vs_own_client.py \\
        [--case ct_upper_abdomen_totalseg --label 2] [--engine weightfree] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


class Relay:
    """A TCP relay to ``target`` counting the bytes sent up (client -> server) and down."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def counted(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, way: str) -> None:
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass
class Run:
    setup_s: float
    click_s: float
    setup_bytes: tuple[int, int]
    click_bytes: tuple[int, int]
    mask: np.ndarray
    more: int = 0  # predictions after the click until the object was complete (past the server's budget)
    complete_s: float = 0.0


def measured(relay: Relay, action):
    before, started = relay.counted(), time.perf_counter()
    result = action()
    after = relay.counted()
    return result, time.perf_counter() - started, (after[0] - before[0], after[1] - before[1])


def through_nninteractive(url: str, token: str, relay: Relay, volume, click) -> Run:
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    target = np.zeros(volume.shape, dtype=np.uint8)

    def setup():
        session = nnInteractiveRemoteInferenceSession(url + "/nninteractive", api_key=token)
        session.set_image(volume.array[None], {"spacing": [float(s) for s in volume.spacing_kji]})
        session.set_target_buffer(target)
        return session

    session, setup_s, setup_bytes = measured(relay, setup)
    _, click_s, click_bytes = measured(relay, lambda: session.add_point_interaction(list(click), True))
    more, started = 0, time.perf_counter()
    while session._predict() is not None:  # a click past the server's budget answered early: go on
        more += 1
    complete_s = click_s + time.perf_counter() - started
    session.close()
    return Run(setup_s, click_s, setup_bytes, click_bytes, target > 0, more, complete_s)


def through_ours(url: str, token: str, relay: Relay, volume, click) -> Run:
    from SAM3DSegmentLib.data.prompts import prompt_from_voxels
    from SAM3DSegmentLib.serving.client import open_remote_session

    session, setup_s, setup_bytes = measured(relay, lambda: open_remote_session(url, volume, 0, token=token))

    def click_and_propagate():
        session.add_prompt(1, prompt_from_voxels(0, [click]))
        return session.propagate(1).mask

    mask, click_s, click_bytes = measured(relay, click_and_propagate)
    session.close()
    return Run(setup_s, click_s, setup_bytes, click_bytes, mask, 0, click_s)


def start_server(args, folder: Path) -> tuple[subprocess.Popen, str, str]:
    token = "bench-" + "t" * 32
    (folder / "token").write_text(token + "\n")
    (folder / "token").chmod(0o600)
    command = [sys.executable, "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0", "--token-file",
               str(folder / "token"), "--engine", args.engine, "--device", "cpu"]
    if args.model:
        command += ["--model", args.model]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=(folder / "server.log").open("w"),
                               text=True, cwd=ROOT)
    values = {}
    while "SAM3D_SERVER_URL" not in values:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"the server ended: {(folder / 'server.log').read_text()}")
        key, _, value = line.strip().partition("=")
        values[key] = value
    return process, values["SAM3D_SERVER_URL"], token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="ct_upper_abdomen_totalseg")
    parser.add_argument("--label", type=int, default=2, help="label value of the target (default 2: right kidney)")
    parser.add_argument("--engine", default="weightfree", choices=("weightfree", "slicewise", "sam2", "auto"))
    parser.add_argument("--model", help="registry model (e.g. litemedsam)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from scipy import ndimage

    from SAM3DSegmentLib.data.volume_files import read_label_map, read_volume

    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    volume = read_volume(DATA / args.case / "image.nii.gz")
    truth = read_label_map(DATA / args.case / "label.nii.gz", volume) == args.label
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    k = int(slices[len(slices) // 2])
    depth = ndimage.distance_transform_edt(truth[k])
    j, i = (int(v) for v in np.unravel_index(int(depth.argmax()), depth.shape))

    with tempfile.TemporaryDirectory() as folder:
        process, url, token = start_server(args, Path(folder))
        try:
            relay = Relay(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            relayed = f"http://127.0.0.1:{relay.port}"
            runs: dict[str, list[Run]] = {"nninteractive": [], "ours": []}
            for repeat in range(args.repeats):
                order = ["nninteractive", "ours"] if repeat % 2 == 0 else ["ours", "nninteractive"]
                for name in order:
                    how = through_nninteractive if name == "nninteractive" else through_ours
                    runs[name].append(how(relayed, token, relay, volume, (k, j, i)))
        finally:
            process.terminate()
            process.wait(20)

    print(f"{args.case} label {args.label}, shape {volume.shape}, click (k, j, i) = {(k, j, i)}, engine {args.engine}"
          f"{' ' + args.model if args.model else ''}, {args.repeats} repeats")
    print(f"{'client':<14} {'repeat':>6} {'setup s':>8} {'click s':>8} {'setup up/down bytes':>22} "
          f"{'click up/down bytes':>20} {'Dice':>6} {'more':>5} {'complete s':>10}")
    for name, done in runs.items():
        for repeat, run in enumerate(done, 1):
            dice = 2 * np.sum(run.mask & truth) / (run.mask.sum() + truth.sum())
            print(f"{name:<14} {repeat:>6} {run.setup_s:8.2f} {run.click_s:8.2f} "
                  f"{'%d / %d' % run.setup_bytes:>22} {'%d / %d' % run.click_bytes:>20} {dice:6.3f} "
                  f"{run.more:>5} {run.complete_s:10.2f}")
    same = all(np.array_equal(a.mask, b.mask) for a, b in zip(runs["nninteractive"], runs["ours"]))
    click_s = {name: statistics.median(r.click_s for r in done) for name, done in runs.items()}
    click_bytes = {name: statistics.median(sum(r.click_bytes) for r in done) for name, done in runs.items()}
    print(f"same 3D mask: {same}; nnInteractive / ours (medians): "
          f"click wall {click_s['nninteractive'] / click_s['ours']:.2f}x, click bytes {click_bytes['nninteractive'] / click_bytes['ours']:.2f}x "
          f"({click_bytes['nninteractive']:.0f} vs {click_bytes['ours']:.0f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
