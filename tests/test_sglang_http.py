"""The SGLang HTTP teacher's client against a local stand-in that answers in sglang 0.5.x's /generate format
(the real server is GPU-only, see the gpu-marked test)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from megatron_gopd.teachers.sglang_http import SGLangHTTPModel, build_request, parse_response
from tests.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def stand_in_server():
    model = tiny_hf_model("qwen3", seed=1)
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            outputs = []
            for ids in body["input_ids"]:
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
                values = lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()
                entries = [[None, ids[0], None]] + [[v, t, None] for v, t in zip(values, ids[1:])]
                outputs.append({"meta_info": {"input_token_logprobs": entries, "finish_reason": {"type": "length"}}})
            payload = json.dumps(outputs).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model, requests
    server.shutdown()


def test_remote_logprobs_match_the_model_and_skip_padding(stand_in_server):
    url, model, requests = stand_in_server
    client = SGLangHTTPModel("big", url, timeout_s=30)
    tokens = torch.tensor([[5, 9, 11, 13, 0, 0], [7, 8, 9, 10, 11, 12]])
    got = client.score_async(tokens, [4, 6]).result(timeout=60)
    assert requests[-1]["input_ids"] == [[5, 9, 11, 13], [7, 8, 9, 10, 11, 12]]  # padding never sent
    assert requests[-1]["sampling_params"]["max_new_tokens"] == 0 and requests[-1]["return_logprob"]
    with torch.no_grad():
        for i, n in enumerate([4, 6]):
            lp = torch.log_softmax(model(tokens[i:i + 1, :n]).logits[0, :-1], -1)
            expected = lp.gather(-1, tokens[i, 1:n, None]).squeeze(-1)
            assert torch.allclose(got[i, 1:n], expected, atol=1e-6)
            assert got[i, 0] == 0 and (got[i, n:] == 0).all()
    client.shutdown()


def test_errors_name_the_server():
    client = SGLangHTTPModel("big", "http://127.0.0.1:9", timeout_s=5)  # nothing listens on port 9
    with pytest.raises(RuntimeError, match=r"sglang model 'big' at http://127.0.0.1:9 failed"):
        client.score_async(torch.tensor([[1, 2]]), [2]).result(timeout=30)
    with pytest.raises(ValueError, match="2 input log-probs for a sequence of 3"):
        parse_response([{"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 2, None]]}}], [3], 3)
    with pytest.raises(ValueError, match="1 results for 2 sequences"):
        parse_response([{"meta_info": {"input_token_logprobs": []}}], [1, 1], 1)
    assert build_request([[1, 2]])["logprob_start_len"] == 0


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
