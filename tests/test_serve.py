"""The completions server as users run it (marked `serve`): `python -m gpt2_jax.serve` in a
subprocess on a free 127.0.0.1 port, spoken to with the real `openai` client: transformers' greedy
tokens, batching that changes nothing, streaming, stop strings, 400s, disconnects, SIGTERM. And
its text layer on its own: tokens to text pieces, stop strings."""

import concurrent.futures
import itertools
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from hf_reference import hf_model, save_folder

from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer

openai = pytest.importorskip("openai")

START_S = 180  # bounded waits: a server that does not come up fails the test, it never hangs it
LIMIT = 400  # --max_tokens_limit of the test server
WORDS = "the cat sat on a mat and then it ran off into the cold dark night while a dog watched".split()


@pytest.fixture(scope="module")
def reference():
    return hf_model(n_positions=512, scale=0.5)


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory):
    return save_folder(reference, tmp_path_factory.mktemp("hf") / "model")


def start(hf_dir, log_dir, *extra) -> tuple[subprocess.Popen, str]:
    """A server on a free port (--port 0; it prints which): the process and its base URL."""
    out, err = open(log_dir / "stdout.txt", "w"), open(log_dir / "stderr.txt", "w")  # files: a pipe could fill
    proc = subprocess.Popen([sys.executable, "-m", "gpt2_jax.serve", "--hf", hf_dir, "--port", "0",
                             "--max_tokens_limit", str(LIMIT), *extra], stdout=out, stderr=err)  # fmt: skip
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, (log_dir / "stderr.txt").read_text()
        line = (log_dir / "stdout.txt").read_text().split("\n")[0]
        if line.endswith("/v1"):
            url = line.split(" at ")[-1]
            try:
                with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                pass
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"the server did not come up in {START_S} s")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    proc, url = start(hf_dir, tmp_path_factory.mktemp("server"))
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.loads(r.read())


def greedy(client, prompt, max_tokens, **kw):
    out = client.completions.create(model="gpt2", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return [(c.text, c.finish_reason) for c in out.choices]


def hf_greedy(reference, prompt: str, max_tokens: int) -> str:
    ids = torch.tensor([get_tokenizer().encode(prompt)])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=EOT_ID)
    return get_tokenizer().decode([t for t in out[0, ids.shape[1] :].tolist() if t != EOT_ID])


@pytest.mark.serve
def test_greedy_completions_equal_transformers_generate(client, server, reference):
    prompts = ["Hello there", "The meaning of life is", " ".join(WORDS)]
    for prompt in prompts:
        [(text, reason)] = greedy(client, prompt, 40)
        assert text == hf_greedy(reference, prompt, 40)
        assert reason == "length" and len(set(text.split())) > 5  # a varied continuation, run to max_tokens
    # a list of prompts of different lengths: one choice each, in order, the same texts
    assert [t for t, _ in greedy(client, prompts, 40)] == [hf_greedy(reference, p, 40) for p in prompts]
    assert [m.id for m in client.models.list().data] == [health(server)["model"]]


@pytest.mark.serve
def test_16_concurrent_requests_return_what_each_returns_alone(client, server):
    requests = [(" ".join(WORDS[: 1 + i]), 4 + (7 * i) % 29, {}) for i in range(16)]
    # two seeded samplers among them (18 > --max_batch 16: some wait, then join between chunks)
    requests += [(WORDS[3], 30, dict(temperature=0.9, top_p=0.9, seed=5)),
                 (WORDS[5], 12, dict(temperature=1.2, seed=6))]  # fmt: skip

    def complete(request):
        prompt, max_tokens, kw = request
        out = client.completions.create(model="gpt2", prompt=prompt, max_tokens=max_tokens,
                                        **{"temperature": 0, **kw})  # fmt: skip
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens

    alone = [complete(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(complete, requests))
    assert together == alone
    assert [tokens for *_, tokens in alone] == [m for _, m, _ in requests]  # each ran to its own max_tokens
    assert health(server)["peak_active"] >= 8  # they did share batches (other tests send at most 4 at once)


@pytest.mark.serve
def test_streamed_chunks_concatenate_to_the_completion(client):
    prompt = "Once upon a time"  # its 48 greedy tokens hold no <|endoftext|> (see the last asserts)
    full = client.completions.create(model="m", prompt=prompt, max_tokens=48, temperature=0)
    [(text, _)] = greedy(client, prompt, 48)
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string inside the text, maybe across tokens
    for kw in ({}, {"stop": [stop, "\u2603never"]}):
        plain = client.completions.create(model="m", prompt=prompt, max_tokens=48, temperature=0, **kw)
        chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=48, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **kw))  # fmt: skip
        pieces = [c.choices[0] for c in chunks if c.choices]
        assert len(pieces) > (1 if not kw else 0)  # it did stream (48 tokens take at least 2 chunks)
        assert "".join(p.text for p in pieces) == plain.choices[0].text
        assert [p.finish_reason for p in pieces][-1] == plain.choices[0].finish_reason
        assert all(p.finish_reason is None for p in pieces[:-1])
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert full.choices[0].text == text and full.choices[0].finish_reason == "length"
    assert plain.choices[0].text == text[: text.index(stop)] and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 48


def _raw_post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.serve
@pytest.mark.parametrize("bad, message", [
    (dict(prompt="hello " * 500, max_tokens=16), "more than the model's context of 512 tokens"),
    (dict(prompt="hello", max_tokens=LIMIT + 1), f"above this server's limit of {LIMIT}"),
    (dict(prompt="hello", max_tokens=4, temperature=-0.5), "temperature"),
    (dict(prompt=[15496, 995], max_tokens=4), "must be a string or a list of strings"),
    (dict(prompt="hello", max_tokens=4, top_p=1.5), "top_p"),
    (dict(prompt="hello", max_tokens=4, n=0), "n: "),
    (dict(prompt="hello", max_tokens=4, stop=["a", "b", "c", "d", "e"]), "at most 4 stop strings"),
    (dict(prompt="hello", max_tokens=4, logprobs=2), "logprobs is not supported"),
])  # fmt: skip
def test_bad_requests_get_400_and_the_server_keeps_serving(bad, message, client, server):
    good = greedy(client, "hello", 6)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", **bad)
    assert e.value.status_code == 400 and message in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
    assert greedy(client, "hello", 6) == good


@pytest.mark.serve
def test_malformed_bodies_get_400_and_unknown_fields_are_ignored(client, server):
    for body, message in ((b"{not json", "not JSON"), (b"[1, 2]", "JSON object"), (b'{"prompt": 7}', "string"),
                          (b'{"max_tokens": 3}', "prompt: Field required")):  # fmt: skip
        status, reply = _raw_post(server, body)
        assert status == 400 and message in reply["error"]["message"]
    good = greedy(client, "hello", 6)
    assert greedy(client, "hello", 6, extra_body={"frobnicate": True, "user": "me"}) == good
    status, reply = _raw_post(server, json.dumps({"prompt": "hello", "max_tokens": 6, "temperature": 0}).encode())
    assert status == 200 and reply["choices"][0]["text"] == good[0][0]


@pytest.mark.serve
def test_a_client_that_disconnects_mid_stream_frees_its_row_and_stalls_nobody(client, server):
    others = [(" ".join(WORDS[: 2 + i]), 20) for i in range(4)]
    alone = [greedy(client, p, n) for p, n in others]
    cancelled = health(server)["finished"].get("cancelled", 0)
    stream = client.completions.create(model="m", prompt="A long story", max_tokens=LIMIT, temperature=0, stream=True)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(greedy, client, p, n) for p, n in others]
        first = next(iter(stream))
        stream.close()  # the client goes away after one chunk of a 400-token completion
        assert first.choices[0].finish_reason is None
        assert [f.result(timeout=120) for f in running] == alone
    deadline = time.monotonic() + 60
    while health(server)["finished"].get("cancelled", 0) == cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    state = health(server)
    assert state["finished"].get("cancelled", 0) == cancelled + 1  # ended by the disconnect, not by finishing
    assert state["active"] == 0 and state["waiting"] == 0


@pytest.mark.serve
def test_sigterm_drains_the_requests_in_flight_then_exits_0(hf_dir, tmp_path):
    proc, url = start(hf_dir, tmp_path)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(model="m", prompt="A long story", max_tokens=300, temperature=0,
                                           stream=True, stream_options={"include_usage": True})  # fmt: skip
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)  # the stream runs to its end
        assert rest[-1].usage.completion_tokens == 300
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)) > 300
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # and it is gone: nothing listens there any more
            health(url)
    finally:
        stop(proc)


@pytest.mark.serve
def test_bad_command_lines_are_one_line_errors(hf_dir):
    for argv, message in ((["--port", "0"], "give a model"),
                          (["--hf", hf_dir, "--max_tokens_limit", "512"], "between 1 and 511"),
                          (["--hf", "/nonexistent", "--port", "0"], "does not exist")):  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "gpt2_jax.serve", *argv], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr
        assert out.stderr.count("\n") == 1, out.stderr


# --- tokens to text: whole characters, stop strings (no server) ---------------------------------


def _pieces(stream, tokens):
    out = []
    for t in tokens:
        piece, used = stream.push([t])
        out.append(piece)
        assert used == 1
        if stream.stopped:
            return out
    return out + [stream.finish()]


def test_text_pieces_are_whole_characters_that_join_to_the_decoded_text():
    from gpt2_jax.infer.text import TextStream

    enc = get_tokenizer()
    text = "Robots 🤖🧠 read 日本語 text."
    tokens = enc.encode(text) + [EOT_ID]
    assert any("\ufffd" in enc.decode([t]) for t in tokens)  # some tokens end inside a character
    pieces = _pieces(TextStream(), tokens)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[-2:] == ["", ""]  # <|endoftext|> adds no text


def test_stop_strings_cut_the_text_and_text_that_may_begin_one_waits():
    from gpt2_jax.infer.text import TextStream

    enc = get_tokenizer()
    text = "It was the best of times, it was the worst of times."
    tokens = enc.encode(text)
    pieces = _pieces(TextStream(["worst", "times!"]), tokens)
    assert "".join(pieces) == "It was the best of times, it was the "
    # ' times' might begin 'times!' : it waits for the next token, and is sent once ',' rules that out
    sent = list(itertools.accumulate(pieces))
    at = [enc.decode(tokens[: i + 1]) for i in range(len(pieces))]
    assert at[5].endswith(" times") and not sent[5].endswith("times") and sent[6].endswith("times,")
    # several tokens at once: `used` says how many, up to the one that completes the stop string
    stream = TextStream(["best of"])
    piece, used = stream.push(tokens)
    assert piece == "It was the " and enc.decode(tokens[:used]) == "It was the best of" and stream.stopped
    assert TextStream(["never"]).push(tokens) == (text, len(tokens))
