"""Peak memory of taking in a long video: decoding it whole (what the HTTP ingress did) against
checking its header (what the ingress does now) and decoding the sampled frames (what the video
encoder pool does now).

A 360p H.264 clip of ``--seconds`` at ``--fps`` is written frame by frame (so writing it costs little
memory); each way of reading it then runs in a fresh process, which reports how far its peak
resident memory (VmHWM) rose above where it stood with the file's bytes in hand.

    .venv/bin/python benchmarks/ingress_memory.py [--seconds 120] [--fps 24]
    .venv/bin/python benchmarks/ingress_memory.py --check   # header check and sampled decoding only
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile

WAYS = {
    "probe": "probe(EncodedMedia('video', data))",
    "sampled": "decode_video_frames(data, 5)",
    "whole": "decode_video(data, max_frames=100_000)",
}


def write_clip(seconds: int, fps: int, path: str) -> int:
    """A moving bar over a plain background, 640x360; returns the frame count."""
    import av
    import numpy as np

    n = seconds * fps
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        frame = np.zeros((360, 640, 3), np.uint8)
        for t in range(n):
            frame[:] = 40
            frame[140:220, (5 * t) % 600 : (5 * t) % 600 + 40] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return n


def measure(way: str, path: str) -> float:
    """MB by which reading the clip ``way`` raised a fresh process's peak memory."""
    script = (
        "import resource, sys\n"
        "from omnistage.actors.media import decode_video, decode_video_frames, probe\n"
        "from omnistage.actors.payloads import EncodedMedia\n"
        f"data = open({path!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{WAYS[way]}\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--check", action="store_true", help="skip decoding the whole clip")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".mp4") as clip:
        frames = write_clip(args.seconds, args.fps, clip.name)
        report = {"frames": frames, "file_mb": round(len(open(clip.name, "rb").read()) / 2**20, 3)}
        for way in WAYS:
            if way == "whole" and args.check:
                continue
            report[f"{way}_mb"] = round(measure(way, clip.name), 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
