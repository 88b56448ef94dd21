"""Video through lmms-eval's real pipeline (`python -m lmms_eval`): a tiny random Video-LLaVA checkpoint and a
small video QA set in Video-LLaVA's evaluation layout, both written here (frames drawn by the test, encoded into
short videos that lmms-eval's reader decodes), built into tasks by `vtprune.lmms.video_qa` and judged by a
stand-in for the GPT judge served on localhost. Videos are pruned (the records show the tokens kept); keep-all
answers as the unpruned model does.

Needs the README's evaluation install (lmms-eval and its video reader, `av`): skipped where lmms-eval's CLI cannot
be imported, unless VTPRUNE_REQUIRE_LMMS_PIPELINE=1 (CI's evaluation stage sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

try:
    import av
    import lmms_eval.__main__  # noqa: F401  (the CLI's imports: datasets, sacrebleu, ...)
except ImportError as error:  # pragma: no cover - depends on the environment
    if os.environ.get("VTPRUNE_REQUIRE_LMMS_PIPELINE") == "1":
        raise
    pytest.skip(f"lmms-eval's CLI or its video reader cannot be imported ({error}): pip install -e '.[eval]' && "
                "pip install --no-deps lmms-eval==0.7.3", allow_module_level=True)

import numpy as np

from vtprune.lmms import video_qa

ROOT = Path(__file__).resolve().parents[1]
TASK = "videollava_msvd_qa"
QUESTIONS = 3
FRAMES = 8  # Video-LLaVA's frames per video; the tiny tower gives 4x4 patches + [CLS] per frame
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def write_video(path: Path, seed: int, frames: int = 10) -> None:
    """A short lossless video (PNG frames in an AVI) of random 48x64 frames that drift over time."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(48, 64, 3))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for index in range(frames):
            frame = ((base + 25 * index) % 256).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from families import save_video_llava_checkpoint

    path = tmp_path_factory.mktemp("video-llava")
    save_video_llava_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """MSVD-QA's layout (test_q.json, test_a.json, videos/) with QUESTIONS questions, one missing video, built."""
    root = tmp_path_factory.mktemp("GPT_Zero_Shot_QA")
    folder = root / "MSVD_Zero_Shot_QA"
    (folder / "videos").mkdir(parents=True)
    questions = [{"video_name": f"clip{i}", "question_id": f"q{i}", "question": f"what is shown in clip {i}"}
                 for i in range(QUESTIONS + 1)]
    answers = [{"answer": word, "question_id": f"q{i}"} for i, word in enumerate(["dog", "car", "man", "cat"])]
    for i in range(QUESTIONS):
        write_video(folder / "videos" / f"clip{i}.avi", seed=i)
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers))
    out = tmp_path_factory.mktemp("tasks")
    video_qa.build(root, out, [TASK], max_new_tokens=4)
    return out


class Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint standing in for the GPT judge: 'yes' when the prediction
    has an even number of characters, score = its length mod 6 (deterministic, varied)."""

    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        prediction = user.split("Predicted Answer: ", 1)[1].split("\n\n", 1)[0]
        Judge.seen.append({"auth": self.headers["Authorization"], "model": body["model"], "prompt": user})
        reply = {"pred": "yes" if len(prediction) % 2 == 0 else "no", "score": len(prediction) % 6}
        data = json.dumps({"choices": [{"message": {"content": str(reply)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    server.shutdown()
    thread.join()


def run_lmms_eval(checkpoint: Path, tasks: Path, out: Path, model_args: str, env: dict) -> tuple[dict | None, list[dict], str]:
    """lmms-eval's CLI on the video task: its results JSON (None when it wrote none), logged samples by doc_id, and
    its output."""
    command = [sys.executable, "-m", "lmms_eval", "--model", "vtprune_video_llava", "--model_args",
               f"pretrained={checkpoint},{model_args}", "--tasks", TASK, "--include_path", str(tasks),
               "--device", "cpu", "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    results = list(out.rglob("*_results.json"))
    samples = list(out.rglob(f"*_samples_{TASK}.jsonl"))
    logged = [json.loads(line) for s in samples for line in s.read_text().splitlines() if line.strip()]
    return (json.loads(results[0].read_text()) if results else None, sorted(logged, key=lambda s: s["doc_id"]),
            run.stdout + run.stderr)


def answer(sample: dict) -> str:
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


@pytest.fixture(scope="module")
def runs(checkpoint, tasks, judge_url, tmp_path_factory):
    env = {**ENV, "OPENAI_API_KEY": "test-key", "OPENAI_API_URL": judge_url}
    settings = {"none": "method=none", "fastv": "method=fastv,budget=0.25,debias=both",
                "keep-all": "method=fastv,keep=1.0,debias=none"}
    return {name: run_lmms_eval(checkpoint, tasks, tmp_path_factory.mktemp(name), args, env)
            for name, args in settings.items()}


def test_videos_are_pruned_through_the_plugin(runs):
    results, samples, output = runs["fastv"]
    assert [s["doc_id"] for s in samples] == list(range(QUESTIONS))  # the question without its video left out
    for sample in samples:
        record = sample["token_counts"][0]["vtprune"]
        assert record["pruned"] and record["videos"] == 1 and record["images"] == 0
        assert record["visual_tokens"] == FRAMES * 16  # the frames' patches; their [CLS] tokens are never pruned
        assert record["kept"] == [FRAMES * 16 // 4] and record["layers"] == [2]
        assert record["method"] == "fastv" and record["debias"] == "both" and record["profile"]
    banner = next(line for line in output.splitlines() if line.startswith("vtprune_video_llava: "))
    assert "keep 0.25 of the visual tokens" in banner and "None" not in banner
    unpruned = runs["none"][1]
    assert all(s["token_counts"][0]["vtprune"] == {"method": "none", "pruned": False, "images": 0, "videos": 1}
               for s in unpruned)


def test_keep_all_answers_as_the_unpruned_model(runs):
    unpruned, keep_all = runs["none"][1], runs["keep-all"][1]
    assert [answer(s) for s in keep_all] == [answer(s) for s in unpruned]
    assert all(s["token_counts"][0]["vtprune"]["kept"] == [FRAMES * 16] for s in keep_all)


def test_the_judge_scores_every_answer(runs):
    results, samples, _ = runs["fastv"]
    verdicts = [s["gpt_eval_accuracy"] for s in samples]
    for sample, verdict in zip(samples, verdicts):
        prediction = answer(sample).strip()
        assert verdict["pred"] == prediction and verdict["answer"] == sample["target"]
        assert verdict["judge"] == ("yes" if len(prediction) % 2 == 0 else "no") and verdict["score"] == len(prediction) % 6
    scores = results["results"][TASK]
    assert scores["gpt_eval_accuracy,none"] == pytest.approx(100 * sum(v["judge"] == "yes" for v in verdicts) / QUESTIONS)
    assert scores["gpt_eval_score,none"] == pytest.approx(sum(v["score"] for v in verdicts) / QUESTIONS)
    asked = [s for s in Judge.seen if "what is shown in clip" in s["prompt"]]
    assert len(asked) == 3 * QUESTIONS and all(s["auth"] == "Bearer test-key" and s["model"] == "gpt-3.5-turbo" for s in asked)


def test_without_a_key_the_run_fails_before_answering(checkpoint, tasks, tmp_path):
    env = {key: value for key, value in ENV.items() if key != "OPENAI_API_KEY"}
    results, samples, output = run_lmms_eval(checkpoint, tasks, tmp_path, "method=none", env)
    assert results is None and samples == []  # nothing scored, no 0 written
    assert "JudgeError: the video QA tasks are judged by a GPT model" in output and "set OPENAI_API_KEY" in output
