"""A minimal live client of `gstalk serve` (docs/serve.md): stream a 16-bit WAV file over the
WebSocket at real-time pace, save the frames that come back as JPEGs and their audio as a WAV.

    gstalk serve obama_ws &                     # prints http://127.0.0.1:8000/
    python examples/serve_client.py http://127.0.0.1:8000/ speech.wav out/
    ffmpeg -framerate 25 -i out/%05d.jpg -i out/audio.wav -c:v libx264 -pix_fmt yuv420p out.mp4

Needs only `pip install websockets` (no gstalk): an agent framework or a text-to-speech loop
can do the same with its own audio chunks.
"""

import json
import struct
import sys
import threading
import time
import urllib.parse
import wave
from pathlib import Path

from websockets.sync.client import connect


def main(url: str, wav_path: str, out_dir: str, avatar: str = "") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with wave.open(wav_path) as w:
        if w.getsampwidth() != 2:
            sys.exit("this example sends 16-bit PCM: convert with ffmpeg -i IN -c:a pcm_s16le OUT.wav")
        rate, channels, pcm = w.getframerate(), w.getnchannels(), w.readframes(w.getnframes())
    u = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(u.query))  # keeps ?token=... from the printed URL
    query.update(sample_rate=str(rate), channels=str(channels))
    if avatar:
        query["avatar"] = avatar
    ws_url = urllib.parse.urlunsplit(("ws", u.netloc, "/v1/live", urllib.parse.urlencode(query), ""))

    with connect(ws_url, max_size=None) as ws:
        ready = json.loads(ws.recv())
        if ready["type"] != "ready":
            sys.exit(f"refused: {ready}")
        print(f"{ready['avatar']}: {ready['width']}x{ready['height']} at {ready['fps']} fps, "
              f"look-ahead {ready['lookahead_s']:.3f} s")
        chunk = rate // 50 * 2 * channels  # 20 ms of audio per message

        def send() -> None:  # real time: a client must not send faster (the server closes it)
            t0 = time.monotonic()
            for k, a in enumerate(range(0, len(pcm), chunk)):
                time.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
                ws.send(pcm[a:a + chunk])
            ws.send(json.dumps({"type": "end"}))  # no more speech: render the last words now

        threading.Thread(target=send, daemon=True).start()
        duration = len(pcm) / (2 * channels * rate)
        audio = bytearray()
        frames = 0
        while True:
            msg = ws.recv()
            if isinstance(msg, str):  # ready / stats / pong / error
                print(msg)
                continue
            (n,) = struct.unpack_from("<I", msg)
            head = json.loads(msg[4:4 + n])
            jpeg = msg[4 + n:4 + n + head["jpeg_bytes"]]
            audio += msg[4 + n + head["jpeg_bytes"]:]
            if jpeg:
                (out / f"{head['i']:05d}.jpg").write_bytes(jpeg)
                frames += 1
            if head["input_s"] is not None and head["input_s"] >= duration - 0.05:
                break  # the frame that shows the end of the file
    with wave.open(str(out / "audio.wav"), "wb") as w:  # the audio that goes with the frames
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(ready["sample_rate"])
        w.writeframes(bytes(audio))
    print(f"{frames} frames and audio.wav in {out}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:5])
