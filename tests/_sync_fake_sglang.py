"""A FAKE SGLang server (ours, tests only) for the engine-restart test: SGLang's generate/health protocol, no model,
no torch. Its bodies follow sglang 0.5.23's ``http_server``: ``/health`` an empty 200, ``/flush_cache`` plain text.

    python tests/_sync_fake_sglang.py --port P [--host H] [--generate-delay-s S] [--vocab-size V]

``/generate`` answers a batch GenerateReqInput (token ids) with SGLang-shaped outputs whose tokens are a fixed
function of the prompt (token k = (sum(prompt) + 7 k) mod V, log-prob -0.1 (k + 1)), so a test can tell which prompt an
answer belongs to. It logs ``received rids=...`` on arrival and ``served rid=...`` per answered prompt, after
sleeping ``--generate-delay-s`` (the window in which a test kills it). Starts in well under a second.
"""
import argparse
import json
import logging
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("fake_sglang")


def answer(prompt, sampling, rid, vocab):
    n = int(sampling.get("max_new_tokens", 16))
    stops = set(sampling.get("stop_token_ids") or ())
    tokens = []
    for k in range(n):
        tokens.append((sum(prompt) + 7 * k) % vocab)
        if tokens[-1] in stops:
            break
    finish = {"type": "stop", "matched": tokens[-1]} if tokens[-1] in stops else {"type": "length", "length": n}
    return {"text": "", "output_ids": tokens,
            "meta_info": {"id": rid, "finish_reason": finish, "weight_version": "0", "prompt_tokens": len(prompt),
                          "completion_tokens": len(tokens),
                          "output_token_logprobs": [[-0.1 * (k + 1), t, None] for k, t in enumerate(tokens)]}}


def make_handler(args):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, payload, status=200):
            text = isinstance(payload, str)
            data = payload.encode() if text else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path in ("/health", "/health_generate"):
                self.reply(None)
            elif self.path == "/flush_cache":
                self.reply("Cache flushed.\n")
            elif self.path in ("/model_info", "/server_info"):
                self.reply({"weight_version": "0", "tp_size": 1})
            else:
                self.reply({"message": "no route"}, 404)

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path == "/generate":
                rids = body["rid"]
                log.info("received rids=%s", ",".join(rids))
                time.sleep(args.generate_delay_s)
                sampling = body["sampling_params"]
                outs = [answer(p, s, r, args.vocab_size) for p, s, r in zip(body["input_ids"], sampling, rids)]
                for r in rids:
                    log.info("served rid=%s", r)
                self.reply(outs)
            elif self.path == "/abort_request":
                self.reply(None)
            elif self.path == "/flush_cache":
                self.reply("Cache flushed.\n")
            else:
                self.reply({"message": "no route"}, 404)

        def log_message(self, *a):
            pass

    return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--generate-delay-s", type=float, default=0.0)
    parser.add_argument("--vocab-size", type=int, default=32)
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    server = ThreadingHTTPServer((cli.host, cli.port), make_handler(cli))
    server.daemon_threads = True
    log.info("ready")
    sys.stdout.flush()
    server.serve_forever()
