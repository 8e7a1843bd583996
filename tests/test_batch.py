"""``gstalk batch``: jobs files, the local and Ray engines (outputs equal serial renders),
bad rows failing alone, skipping on re-run, and a batch killed with kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gstalk.errors import InputError


def _decoded(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _tones(folder: Path, n: int, seconds: float = 0.4) -> list[Path]:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    sr = 16000
    out = []
    for i in range(n):
        t = np.arange(int((seconds + 0.04 * i) * sr)) / sr
        p = folder / f"speech{i}.wav"
        sf.write(p, 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) * (np.sin(2 * np.pi * 3 * t) > 0), sr)
        out.append(p)
    return out


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bundle_file(trained_ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gstalk.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "mannequin.gstalk"
    export_bundle(trained_ws, out)
    return out


def test_jobs_files_are_read_row_by_row(tmp_path):
    from gstalk.batch.jobs import read_jobs, results_path

    a = _tones(tmp_path, 1)[0]
    (tmp_path / "ws").mkdir()
    (tmp_path / "jobs.csv").write_text(
        "avatar,audio,output,size,alpha,colour\n"
        f"ws,{a.name},out/one.mp4,256,no,\n"
        f"ws,{a.name},out/one.mp4,,,\n"  # the same output as row 1
        f"ws,{a.name},,big,,\n"
        f"ws,{a.name},,,,red\n"
        f"ws,nowhere.wav,,,,\n"
        f"ws,{a.name},x.mp4,,,,too many\n")
    jobs = read_jobs(tmp_path / "jobs.csv", "render")
    assert [j.row for j in jobs] == [1, 2, 3, 4, 5, 6] and [j.line for j in jobs] == [2, 3, 4, 5, 6, 7]
    ok = jobs[0]
    assert ok.error is None and ok.spec["size"] == 256 and ok.spec["alpha"] is False
    assert ok.spec["output"] == str(tmp_path / "out" / "one.mp4") and ok.spec["audio"] == str(a)
    assert ok.spec["pose"] == "loop" and len(ok.key) == 64
    assert "also written by row 1" in jobs[1].error
    assert "size: 'big' is not an integer" in jobs[2].error
    assert "unknown option 'colour'" in jobs[3].error
    assert "nowhere.wav does not exist" in jobs[4].error
    assert "7 values for 6 columns" in jobs[5].error
    assert results_path(tmp_path / "jobs.csv") == tmp_path / "jobs.results.jsonl"

    (tmp_path / "jobs.jsonl").write_text(
        json.dumps({"avatar": "ws", "audio": a.name, "blink": "auto", "alpha": True}) + "\n\n# a comment\n"
        "{not json\n" + json.dumps(["a", "list"]) + "\n")
    jobs = read_jobs(tmp_path / "jobs.jsonl", "render")
    assert jobs[0].error is None and jobs[0].spec["output"].endswith("jobs_renders/ws_speech0_rgba")
    assert "line 4 is not valid JSON" in jobs[1].error and "not an object" in jobs[2].error
    # the key changes when an input changes
    key = jobs[0].key
    os.utime(a, ns=(1, 1))
    assert read_jobs(tmp_path / "jobs.jsonl", "render")[0].key != key

    (tmp_path / "nocol.csv").write_text("avatar,output\nws,x.mp4\n")
    with pytest.raises(InputError, match="no 'audio' column"):
        read_jobs(tmp_path / "nocol.csv", "render")
    with pytest.raises(InputError, match="does not exist"):
        read_jobs(tmp_path / "missing.csv", "render")
    (tmp_path / "empty.csv").write_text("avatar,audio\n")
    with pytest.raises(InputError, match="holds no jobs"):
        read_jobs(tmp_path / "empty.csv", "render")


def test_train_rows_take_a_speech_column(tmp_path):
    """``speech`` (a separate file with the speaker's voice, ``extract --speech``) is a train
    column: resolved from the jobs file's folder, a missing file fails the row alone, left out
    it is not in the spec (older results files keep their keys), and it is part of the key."""
    from gstalk.batch.jobs import read_jobs

    a = _tones(tmp_path, 2)
    (tmp_path / "v.mp4").write_bytes(b"a video")
    (tmp_path / "jobs.csv").write_text("video,workspace,speech\n"
                                       f"v.mp4,w1,{a[0].name}\n"
                                       "v.mp4,w2,nowhere.wav\n"
                                       "v.mp4,w3,\n"
                                       f"v.mp4,w4,{a[1].name}\n")
    jobs = read_jobs(tmp_path / "jobs.csv", "train")
    assert jobs[0].error is None and jobs[0].spec["speech"] == str(a[0])
    assert "speech" in jobs[1].error and "nowhere.wav does not exist" in jobs[1].error
    assert jobs[2].error is None and "speech" not in jobs[2].spec
    key = jobs[0].key
    os.utime(a[0], ns=(1, 1))
    assert read_jobs(tmp_path / "jobs.csv", "train")[0].key != key


def test_articulation_gain_column_is_checked_when_the_file_is_read(tmp_path):
    """``articulation_gain`` is a render column like the flag: a number in (0, 5]; a row with
    anything else fails alone, by its row number, before any worker runs; left out, it is not
    in the spec (older results files keep their keys)."""
    from gstalk.batch.jobs import read_jobs

    a = _tones(tmp_path, 1)[0]
    (tmp_path / "ws").mkdir()
    (tmp_path / "jobs.csv").write_text(
        "avatar,audio,output,articulation_gain\n"
        f"ws,{a.name},one.mp4,1.5\n"
        f"ws,{a.name},two.mp4,loud\n"
        f"ws,{a.name},three.mp4,0\n"
        f"ws,{a.name},four.mp4,9\n"
        f"ws,{a.name},five.mp4,\n"
        f"ws,{a.name},six.mp4,nan\n")
    jobs = read_jobs(tmp_path / "jobs.csv", "render")
    assert jobs[0].error is None and jobs[0].spec["articulation_gain"] == 1.5
    bad = {j.row: j.error for j in jobs if j.error is not None}
    assert sorted(bad) == [2, 3, 4, 6]
    assert "articulation_gain: 'loud' is not a number" in bad[2]
    for row in (3, 4, 6):
        assert "--articulation-gain" in bad[row] and "out of range" in bad[row], bad[row]
    assert jobs[4].error is None and "articulation_gain" not in jobs[4].spec
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"avatar": "ws", "audio": a.name, "articulation_gain": 2}) + "\n"
                                         + json.dumps({"avatar": "ws", "audio": a.name, "output": "b.mp4",
                                                       "articulation_gain": True}) + "\n")
    j1, j2 = read_jobs(tmp_path / "jobs.jsonl", "render")
    assert j1.spec["articulation_gain"] == 2.0 and "is not a number" in j2.error


def test_articulation_gain_column_reaches_the_render(trained_ws, tmp_path):
    """A batch row's ``articulation_gain`` renders what ``gstalk render --articulation-gain``
    renders, unlike the default gain; a bad one fails alone with its row in the results file."""
    from gstalk.batch.runner import run_batch
    from gstalk.stages.render import run_render

    a0 = _tones(tmp_path / "audio", 1)[0]
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("avatar,audio,output,articulation_gain\n"
                    f"{trained_ws},audio/speech0.wav,out/g3.mp4,3\n"
                    f"{trained_ws},audio/speech0.wav,out/bad.mp4,-1\n")
    s = run_batch("render", jobs, workers=1)
    assert (s["ok"], s["failed"]) == (1, 1), s
    assert [f["row"] for f in s["failures"]] == [2] and "--articulation-gain" in s["failures"][0]["error"]
    run_render(trained_ws, a0, tmp_path / "g3.mp4", articulation_gain=3.0)
    run_render(trained_ws, a0, tmp_path / "g1.mp4")
    got = _decoded(tmp_path / "out" / "g3.mp4")
    np.testing.assert_array_equal(got, _decoded(tmp_path / "g3.mp4"))
    assert not np.array_equal(got, _decoded(tmp_path / "g1.mp4"))  # the gain changed the render


def test_local_engine_renders_what_serial_render_does_and_bad_rows_fail_alone(trained_ws, bundle_file, tmp_path):
    from typer.testing import CliRunner

    from gstalk.cli import app
    from gstalk.stages.render import run_render

    a0, a1 = _tones(tmp_path / "audio", 2)
    (tmp_path / "audio" / "noise.wav").write_text("this is not audio")
    rows = [
        {"avatar": str(trained_ws), "audio": "audio/speech0.wav", "output": "out/ws0.mp4"},
        {"avatar": str(bundle_file), "audio": "audio/speech1.wav", "output": "out/b1.mp4", "pose": "still",
         "size": 160},
        {"avatar": str(trained_ws), "audio": "audio/missing.wav", "output": "out/missing.mp4"},
        {"avatar": str(trained_ws), "audio": "audio/speech0.wav", "output": "out/u.mp4", "speed": 2},
        {"avatar": str(trained_ws), "audio": "audio/noise.wav", "output": "out/noise.mp4"},
        {"avatar": str(trained_ws), "audio": "audio/speech1.wav", "output": "out/bigger.mp4", "size": 161},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(app, ["batch", "render", str(jobs), "--workers", "2", "--quiet"])
    assert r.exit_code == 11, r.output
    assert r.stdout.strip() == str(tmp_path / "jobs.results.jsonl")
    res = {x["row"]: x for x in _results(tmp_path / "jobs.results.jsonl")}
    assert sorted(res) == [1, 2, 3, 4, 5, 6]
    assert res[1]["status"] == res[2]["status"] == "ok"
    assert res[1]["frames"] == 10 and res[2]["frames"] == 11 and res[1]["seconds"] > 0
    assert "missing.wav does not exist" in res[3]["error"]
    assert "unknown option 'speed'" in res[4]["error"]
    assert res[5]["status"] == "failed" and "noise.wav" in res[5]["error"] and res[5]["exit_code"] == 3
    assert "even number" in res[6]["error"] and res[6]["exit_code"] == 2
    assert not (tmp_path / "out" / "noise.mp4").exists() and not (tmp_path / "out" / "bigger.mp4").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]

    run_render(trained_ws, a0, tmp_path / "serial0.mp4")
    run_render(bundle_file, a1, tmp_path / "serial1.mp4", pose="still", size=160)
    np.testing.assert_array_equal(_decoded(tmp_path / "out" / "ws0.mp4"), _decoded(tmp_path / "serial0.mp4"))
    np.testing.assert_array_equal(_decoded(tmp_path / "out" / "b1.mp4"), _decoded(tmp_path / "serial1.mp4"))

    # the same command again: the finished jobs are skipped, the failed ones run (and fail) again;
    # a changed output is rendered again
    (tmp_path / "out" / "b1.mp4").write_bytes(b"overwritten")
    r = CliRunner().invoke(app, ["batch", "render", str(jobs), "--json", "--quiet"])
    assert r.exit_code == 11, r.output
    s = json.loads(r.stdout)
    assert (s["skipped"], s["ok"], s["failed"]) == (1, 1, 4)
    last = {x["row"]: x for x in _results(tmp_path / "jobs.results.jsonl")[6:]}
    assert last[1]["status"] == "skipped" and last[2]["status"] == "ok"
    np.testing.assert_array_equal(_decoded(tmp_path / "out" / "b1.mp4"), _decoded(tmp_path / "serial1.mp4"))


def test_ray_engine_renders_what_serial_render_does(trained_ws, bundle_file, tmp_path, monkeypatch):
    """A local Ray cluster started by the test itself (2 CPUs): each avatar goes into the
    object store once (the driver's ``ray.put`` calls are counted: one per distinct avatar,
    not one per row); outputs equal serial `gstalk render`; a bad row fails alone."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'gstalk[ray]')")
    from gstalk.batch.runner import run_batch
    from gstalk.bundle import read_bundle_bytes
    from gstalk.stages.render import run_render

    puts: list[tuple[str, Any]] = []
    real_put = ray.put

    def counting_put(value, *a, **kw):  # type: ignore[no-untyped-def]
        puts.append(value)
        return real_put(value, *a, **kw)

    monkeypatch.setattr(ray, "put", counting_put)

    a0, a1, a2 = _tones(tmp_path / "audio", 3)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("avatar,audio,output,blink\n"
                    f"{trained_ws},audio/speech0.wav,out/r0.mp4,\n"
                    f"{bundle_file},audio/speech1.wav,out/r1.mp4,auto\n"
                    f"{bundle_file},audio/speech2.wav,out/r2.mp4,\n"
                    f"{bundle_file},audio/speech2.wav,out/r3.mp4,sometimes\n")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        s = run_batch("render", jobs, engine="ray")
    finally:
        ray.shutdown()
    assert (s["ok"], s["failed"]) == (3, 1), s
    # 4 rows, 2 avatars (the workspace, packed in memory, and the bundle of 3 rows): 2 puts
    assert [kind for kind, _ in puts] == ["bundle", "bundle"]
    want = read_bundle_bytes(bundle_file.read_bytes()).sha256
    assert sum(read_bundle_bytes(data).sha256 == want for _, data in puts) == 1
    res = {x["row"]: x for x in _results(tmp_path / "jobs.results.jsonl")}
    assert res[4]["status"] == "failed" and "--blink" in res[4]["error"]
    assert all(res[i]["engine"] == "ray" for i in (1, 2, 3))
    run_render(trained_ws, a0, tmp_path / "s0.mp4")
    run_render(bundle_file, a1, tmp_path / "s1.mp4", blink="auto")
    run_render(trained_ws, a2, tmp_path / "s2.mp4")
    for i in range(3):
        np.testing.assert_array_equal(_decoded(tmp_path / "out" / f"r{i}.mp4"), _decoded(tmp_path / f"s{i}.mp4"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def test_a_batch_killed_with_kill_9_loses_at_most_the_running_jobs(trained_ws, tmp_path):
    from gstalk.media import probe

    n = 8
    _tones(tmp_path / "audio", n, seconds=1.6)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("avatar,audio,output\n" + "".join(f"{trained_ws},audio/speech{i}.wav,out/o{i}.mp4\n"
                                                      for i in range(n)))
    results = tmp_path / "jobs.results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "gstalk", "batch", "render", str(jobs), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            if results.exists() and sum(r["status"] == "ok" for r in _results(results)) >= 2:
                break
            assert proc.poll() is None, "the batch ended before it was killed"
            time.sleep(0.05)
        else:
            pytest.fail("no job finished in 180 s")
        time.sleep(0.3)  # into the next job
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = [r for r in _results(results) if r["status"] == "ok"]
    assert 2 <= len(before) < n
    worker = int(before[0]["worker"].rsplit(":", 1)[1])
    end = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < end:  # the worker dies with the driver
        time.sleep(0.05)
    assert not _alive(worker)
    for r in before:  # what the results file says is done, is: complete and valid
        assert probe(r["output"]).video.n_frames == r["frames"]
    # every output at its final path is complete (written atomically); partial work is in .tmp-* only
    for p in (tmp_path / "out").glob("*.mp4"):
        assert probe(p).video.n_frames > 0

    r = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["skipped"] == len(before) and s["ok"] == n - len(before) and s["failed"] == 0
    for i in range(n):
        info = probe(tmp_path / "out" / f"o{i}.mp4").video
        assert info.n_frames == round((1.6 + 0.04 * i) * 25)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]  # the killed job's scratch


@pytest.mark.slow
def test_batch_train_trains_exports_and_skips_on_rerun(mannequin_clip, tmp_path):
    from gstalk.batch.runner import run_batch
    from gstalk.bundle import read_bundle
    from gstalk.workspace import Workspace

    jobs = tmp_path / "videos.csv"
    jobs.write_text("video,workspace,preset,seed,eval,bundle\n"
                    f"{mannequin_clip.path},ws_a,test,3,no,avatars/a.gstalk\n"
                    "missing.mp4,ws_b,test,0,no,\n")
    s = run_batch("train", jobs)
    assert (s["ok"], s["failed"]) == (1, 1), s
    res = _results(tmp_path / "videos.results.jsonl")
    ok = next(r for r in res if r["status"] == "ok")
    assert ok["stages_run"] == ["extract", "track", "coarse", "fine"]
    ws = Workspace.open(tmp_path / "ws_a")
    assert ws.seed == 3 and ws.stage("fine").status == "done" and ok["fine_run_id"] == ws.stage("fine").run_id
    assert read_bundle(tmp_path / "avatars" / "a.gstalk").info["provenance"]["seed"] == 3
    s = run_batch("train", jobs)
    assert (s["skipped"], s["ok"], s["failed"]) == (1, 0, 1)
    other = tmp_path / "other.jsonl"  # never trains over another video's (or seed's) workspace
    other.write_text(json.dumps({"video": str(mannequin_clip.path), "workspace": "ws_a", "preset": "test",
                                 "seed": 4}) + "\n")
    s = run_batch("train", other)
    assert s["failed"] == 1 and "made from another seed" in s["failures"][0]["error"]
    # nor over a workspace whose audio came from another file (or from the video itself)
    speech = _tones(tmp_path, 1)[0]
    other.write_text(json.dumps({"video": str(mannequin_clip.path), "workspace": "ws_a", "preset": "test",
                                 "seed": 3, "speech": str(speech)}) + "\n")
    s = run_batch("train", other)
    assert s["failed"] == 1 and "made from another speech" in s["failures"][0]["error"]
    assert Workspace.open(tmp_path / "ws_a").stage("fine").run_id == ok["fine_run_id"]


def test_engine_options_and_a_missing_ray_read_as_one_sentence(monkeypatch, tmp_path):
    from gstalk.batch.engines import make_engine, plan_workers
    from gstalk.errors import DependencyError, UsageError

    assert plan_workers(None, None, cores=4) == (4, 1)
    assert plan_workers(2, None, cores=4) == (2, 2)
    assert plan_workers(None, 2, cores=4) == (2, 2)
    assert plan_workers(None, 8, cores=4) == (1, 8)
    with pytest.raises(UsageError, match="--workers 0"):
        plan_workers(0, None)
    with pytest.raises(UsageError, match="--address is for --engine ray"):
        make_engine("local", address="auto")
    with pytest.raises(UsageError, match="Unknown --engine"):
        make_engine("spark")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(DependencyError, match="needs Ray") as e:
        make_engine("ray")
    assert "gstalk[ray]" in (e.value.hint or "")
