"""`vtprune.lmms.video_qa`: Video-LLaVA's video QA sets built into lmms-eval tasks, and their GPT judge (against a
stand-in endpoint on localhost). Needs no lmms-eval: the end-to-end run is tests/test_lmms_video.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from vtprune.lmms import video_qa


def layout(root, names=("a", "b", "c"), present=("a", "v_b")):
    folder = root / "TGIF_Zero_Shot_QA"
    (folder / "mp4").mkdir(parents=True)
    for name in present:
        (folder / "mp4" / f"{name}.mp4").write_bytes(b"")
    (folder / "test_q.json").write_text(json.dumps([{"video_name": n, "question_id": f"q{i}", "question": f"what {n}"}
                                                    for i, n in enumerate(names)]))
    (folder / "test_a.json").write_text(json.dumps([{"answer": n.upper(), "question_id": f"q{i}"}
                                                    for i, n in enumerate(names)]))
    return folder


def test_build_writes_the_task_and_leaves_out_missing_videos(tmp_path, capsys):
    folder = layout(tmp_path / "data")
    [path] = video_qa.build(tmp_path / "data", tmp_path / "tasks", ["videollava_tgif_qa"], max_new_tokens=7)
    assert "1 of 3 questions left out" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "videollava_tgif_qa.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["answer"], r["video"]) for r in rows] == [
        ("q0", "A", str((folder / "mp4" / "a.mp4").resolve())), ("q1", "B", str((folder / "mp4" / "v_b.mp4").resolve()))]
    text = path.read_text().replace("!function ", "")  # lmms-eval's tag, not plain YAML
    config = yaml.safe_load(text)
    assert config["task"] == "videollava_tgif_qa" and config["generation_kwargs"]["max_new_tokens"] == 7
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "tasks" / "videollava_tgif_qa.jsonl").resolve())
    assert [m["metric"] for m in config["metric_list"]] == ["gpt_eval_accuracy", "gpt_eval_score"]
    assert "from vtprune.lmms.video_qa import" in (tmp_path / "tasks" / "utils.py").read_text()


def test_build_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown video QA task nope"):
        video_qa.build(tmp_path, tmp_path / "out", ["nope"])
    with pytest.raises(ValueError, match="cannot read .*MSVD_Zero_Shot_QA/test_q.json"):
        video_qa.build(tmp_path, tmp_path / "out", ["videollava_msvd_qa"])
    folder = layout(tmp_path / "data")
    answers = json.loads((folder / "test_a.json").read_text())
    (folder / "test_a.json").write_text(json.dumps(answers[::-1]))
    with pytest.raises(ValueError, match="question q0 is paired with the answer of q2"):
        video_qa.build(tmp_path / "data", tmp_path / "out", ["videollava_tgif_qa"])
    layout(tmp_path / "empty", present=())
    with pytest.raises(ValueError, match="no question has its video"):
        video_qa.build(tmp_path / "empty", tmp_path / "out", ["videollava_tgif_qa"])


@pytest.mark.parametrize("reply, expected", [
    ("{'pred': 'yes', 'score': 4}", ("yes", 4)), ("Sure: {'pred': 'No', 'score': 1.8}", ("no", 1)),
    ("{'pred': 'maybe', 'score': 3}", None), ("yes, 5", None), ("{'score': 2}", None),
])
def test_parse_verdict(reply, expected):
    assert video_qa.parse_verdict(reply) == expected


class Endpoint(BaseHTTPRequestHandler):
    replies: list = []  # (status, content) per request, in order
    bodies: list = []

    def do_POST(self):  # noqa: N802
        Endpoint.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, content = Endpoint.replies.pop(0)
        data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setattr(video_qa, "JUDGE_ATTEMPTS", 3)
    monkeypatch.setattr(video_qa, "JUDGE_WAIT", 0.0)
    monkeypatch.setenv("OPENAI_API_URL", f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions")
    Endpoint.replies, Endpoint.bodies = [], []
    yield Endpoint
    server.shutdown()
    thread.join()


def test_the_judge_retries_then_scores(endpoint, monkeypatch):
    monkeypatch.setenv("VTPRUNE_JUDGE_MODEL", "judge-x")
    endpoint.replies = [(500, ""), (200, "I think so"), (200, "{'pred': 'yes', 'score': 5}")]
    assert video_qa.judge("what is it", "a dog", "dog") == ("yes", 5)
    body = endpoint.bodies[-1]
    assert len(endpoint.bodies) == 3 and body["model"] == "judge-x" and body["temperature"] == 0
    assert "Question: what is it\nCorrect Answer: a dog\nPredicted Answer: dog\n" in body["messages"][1]["content"]
    doc = {"question_id": "q", "question": "what is it", "answer": "a dog"}
    endpoint.replies = [(200, "{'pred': 'no', 'score': 1}"), (200, "{'pred': 'yes', 'score': 4}")]
    records = [video_qa.process_results(doc, [p])["gpt_eval_accuracy"] for p in (" cat ", "dog")]
    assert records[0]["pred"] == "cat" and records[0]["judge"] == "no"
    assert video_qa.aggregate_accuracy(records) == 50.0 and video_qa.aggregate_score(records) == 2.5


@pytest.mark.parametrize("replies, message", [
    ([(200, "no idea")] * 3, "failed after 3 tries (unreadable reply 'no idea')"),
    ([(401, "")], "failed after 1 tries (HTTP 401"),
])
def test_a_failing_judge_is_an_error_not_a_zero(endpoint, replies, message):
    endpoint.replies = list(replies)
    with pytest.raises(video_qa.JudgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        video_qa.process_results({"question_id": "q", "question": "q", "answer": "a"}, ["b"])


def test_without_a_key_the_task_stops_before_the_model_answers(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(video_qa.JudgeError, match="judged by a GPT model, as Video-LLaVA's evaluation is: set OPENAI_API_KEY"):
        video_qa.doc_to_text({"question": "what"})
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert video_qa.doc_to_text({"question": "what"}, {"pre_prompt": "<", "post_prompt": ">"}) == "<what>"
