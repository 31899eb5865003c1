"""The SGLang HTTP teacher's client against a local stand-in that answers in sglang 0.5.x's /generate format
(the real server is GPU-only, see the gpu-marked test). Issue 24: the stand-in can also drop the connection,
answer 500 or 400, answer late, answer with the wrong number of log-probs, or with a missing log-prob."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_gopd.config import ConfigError, load_config
from megatron_gopd.teachers import sglang_http
from megatron_gopd.teachers.sglang_http import SGLangHTTPModel, backoff_delays, build_request, parse_response
from tests.runs import minimal_config
from tests.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def stand_in_server():
    """(url, model, requests seen, faults): each request takes the next fault from `faults` (none: a good answer)."""
    model = tiny_hf_model("qwen3", seed=1)
    requests, faults = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            fault = faults.pop(0) if faults else None
            if fault == "drop":  # the connection closes with no answer
                self.close_connection = True
                return
            if fault in ("500", "400"):
                self.send_error(int(fault))
                return
            if fault == "late":
                time.sleep(2.5)
            outputs = []
            for ids in body["input_ids"]:
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
                values = lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()
                entries = [[None, ids[0], None]] + [[v, t, None] for v, t in zip(values, ids[1:])]
                if fault == "short":
                    entries = entries[:-1]
                if fault == "null":
                    entries[2][0] = None
                outputs.append({"meta_info": {"input_token_logprobs": entries, "finish_reason": {"type": "length"}}})
            payload = json.dumps(outputs).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model, requests, faults
    server.shutdown()


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(sglang_http, "BACKOFF_FIRST_S", 0.01)


def expected_logprobs(model, rows):
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([r])).logits[0, :-1], -1).gather(
            -1, torch.tensor(r[1:])[:, None]).squeeze(-1) for r in rows]


def test_remote_logprobs_match_the_model(stand_in_server):
    url, model, requests, _ = stand_in_server
    client = SGLangHTTPModel("big", url, timeout_s=30)
    rows = [[5, 9, 11, 13], [7, 8, 9, 10, 11, 12]]
    got = client.score_async(rows).result(timeout=60)
    assert requests[-1]["input_ids"] == rows
    assert requests[-1]["sampling_params"]["max_new_tokens"] == 0 and requests[-1]["return_logprob"]
    for row, lp, expected in zip(rows, got, expected_logprobs(model, rows)):
        assert len(lp) == len(row) and lp[0] == 0 and torch.allclose(lp[1:], expected, atol=1e-6)
    client.shutdown()


def test_errors_name_the_server():
    client = SGLangHTTPModel("big", "http://127.0.0.1:9", timeout_s=5, retries=0)  # nothing listens on port 9
    with pytest.raises(RuntimeError, match=r"sglang model 'big' at http://127.0.0.1:9 failed after 1 attempt\(s\); "
                                           r"last status: URLError"):
        client.score_async([[1, 2]]).result(timeout=30)
    with pytest.raises(ValueError, match="2 input log-probs for a sequence of 3"):
        parse_response([{"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 2, None]]}}], [3])
    with pytest.raises(ValueError, match="1 results for 2 sequences"):
        parse_response([{"meta_info": {"input_token_logprobs": []}}], [1, 1])
    with pytest.raises(ValueError, match="result 0 has no meta_info.input_token_logprobs"):
        parse_response([{"error": "out of memory"}], [1])
    assert build_request([[1, 2]])["logprob_start_len"] == 0


def test_dropped_connections_5xx_and_wrong_lengths_are_retried(stand_in_server, quick_backoff):
    url, model, requests, faults = stand_in_server
    rows = [[5, 9, 11, 13], [7, 8, 9, 10, 11]]
    faults[:] = ["drop", "500", "short"]
    before = len(requests)
    got = SGLangHTTPModel("big", url, timeout_s=30, retries=3).score_async(rows).result(timeout=60)
    assert len(requests) - before == 4 and not faults  # three failures, then the good answer
    for lp, expected in zip(got, expected_logprobs(model, rows)):
        assert torch.allclose(lp[1:], expected, atol=1e-6)


def test_a_late_answer_times_out_and_is_asked_again(stand_in_server, quick_backoff):
    url, model, requests, faults = stand_in_server
    faults[:] = ["late"]  # 2.5 s, past the attempt's share of the 4 s budget (1 s)
    before = len(requests)
    rows = [[5, 9, 11, 13]]
    got = SGLangHTTPModel("big", url, timeout_s=4, retries=2).score_async(rows).result(timeout=60)
    assert len(requests) - before == 2
    assert torch.allclose(got[0][1:], expected_logprobs(model, rows)[0], atol=1e-6)


def test_retries_end_with_the_server_and_last_status_and_4xx_is_not_retried(stand_in_server, quick_backoff):
    url, _, requests, faults = stand_in_server
    faults[:] = ["500"] * 3
    before = len(requests)
    with pytest.raises(RuntimeError, match=rf"sglang model 'big' at {url} failed after 3 attempt\(s\); "
                                           r"last status: HTTP 500"):
        SGLangHTTPModel("big", url, timeout_s=30, retries=2).score_async([[5, 9]]).result(60)
    assert len(requests) - before == 3
    faults[:] = ["short"] * 2
    with pytest.raises(RuntimeError, match="last status: bad reply: sglang returned 1 input log-probs for a "
                                           "sequence of 2 tokens"):
        SGLangHTTPModel("big", url, timeout_s=30, retries=1).score_async([[5, 9]]).result(60)
    faults[:] = ["400", "400"]
    before = len(requests)
    with pytest.raises(RuntimeError, match=r"failed after 1 attempt\(s\); last status: HTTP 400"):
        SGLangHTTPModel("big", url, timeout_s=30, retries=3).score_async([[5, 9]]).result(60)
    assert len(requests) - before == 1  # our request is wrong: asking again would not help
    faults.clear()


def test_retries_end_within_the_timeout(stand_in_server):
    """README: the retries all end within faults.exchange_timeout_s. With the real backoff, 3 retries pause 0.5 +
    1 + 2 s, more than a 3 s budget: the client retries while a pause and a 1 s attempt still fit, then fails with
    its last status, by the deadline (a quarter second allowed for the threads' scheduling)."""
    url, _, requests, faults = stand_in_server
    # 500 at once: attempts at 0, 0.5 and 1.5 s, the third pause (to 3.5 s) does not fit; an answer late by 2.5 s:
    # attempts give up after 1 s, at 0 and 1.5 s, the second pause (to 3.5 s) does not fit
    for fault, attempts, status in (("500", 3, "HTTP 500"), ("late", 2, "TimeoutError")):
        faults[:] = [fault] * 4
        before, start = len(requests), time.monotonic()
        with pytest.raises(RuntimeError, match=rf"failed after {attempts} attempt\(s\); last status: {status}.*; "
                                               r"no time left to retry within 3s"):
            SGLangHTTPModel("big", url, timeout_s=3, retries=3).score_async([[5, 9]]).result(60)
        elapsed = time.monotonic() - start
        assert len(requests) - before == attempts
        assert elapsed < 3 + 0.25
        faults.clear()


def test_a_missing_logprob_becomes_nan_so_that_the_sample_is_dropped_and_counted(stand_in_server):
    url, _, _, faults = stand_in_server
    faults[:] = ["null"]
    [got] = SGLangHTTPModel("big", url, timeout_s=30).score_async([[5, 9, 11, 13]]).result(60)
    assert got[0] == 0 and math.isnan(got[2]) and torch.isfinite(got[[1, 3]]).all()


def test_backoff_is_bounded_and_retries_are_configured(tmp_path):
    assert backoff_delays(6) == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    config = minimal_config(tmp_path)
    assert load_config(config).faults.http_retries == 3
    assert load_config(config, ["faults.http_retries=0"]).faults.http_retries == 0
    with pytest.raises(ConfigError, match="faults.http_retries: must be >= 0"):
        load_config(config, ["faults.http_retries=-1"])


@pytest.mark.gpu
def test_against_a_real_sglang_server(tmp_path):
    pytest.importorskip("sglang", reason="needs the gpu extra (SGLang)")
    import subprocess
    import sys
    import time
    import urllib.request

    model = tiny_hf_model("qwen3", seed=1)
    model.save_pretrained(tmp_path)
    from tests.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    server = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                               "--port", "31917", "--mem-fraction-static", "0.2", "--skip-tokenizer-init"])
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen("http://127.0.0.1:31917/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        got = SGLangHTTPModel("t", "http://127.0.0.1:31917", timeout_s=60).score_async(
            torch.tensor([[5, 9, 11, 13]]), [4]).result(timeout=120)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([[5, 9, 11, 13]])).logits[0, :-1].float(), -1)
        expected = lp.gather(-1, torch.tensor([9, 11, 13])[:, None]).squeeze(-1)
        assert torch.allclose(got[0, 1:4], expected, atol=2e-2)  # bf16 server against the fp32 model
    finally:
        server.terminate()
