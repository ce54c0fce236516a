"""A faithful-enough GCS server on localhost for tests: gcp-storage-emulator plus generations and preconditions.

gcp-storage-emulator (2026.7.19) implements the JSON API but (a) sends no `x-goog-generation` /
`x-goog-metageneration` headers on downloads and (b) ignores `ifGenerationMatch`,
`ifGenerationNotMatch`, `ifMetagenerationMatch` and `ifMetagenerationNotMatch`. Real GCS does
both, and tensorstore (Orbax's array writer, OCDBT manifests) and our workdir lock depend on them.
This wrapper adds them, serves requests on threads under one lock (so a precondition check and
the write it guards are atomic, as on GCS), and can inject transient errors for tests:
`GET /_inject?status=503&count=N&match=SUBSTRING` makes the next N requests whose path contains
SUBSTRING answer `status`.

    python tests/gcs_emulator.py --bucket NAME      # prints the port it listens on, then serves
    with emulator(bucket="b") as host: ...          # in a test: host is "localhost:PORT"
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from http import HTTPStatus, server as http_server
from urllib.parse import parse_qs, urlparse


def _patch(lock: threading.Lock) -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    faults: list[dict] = []  # {"status", "count", "match"}
    resumable_preconditions: dict[str, dict] = {}

    def current(storage, bucket, name):
        try:
            return storage.get_file_obj(bucket, name)
        except NotFound:
            return None

    def failed(request, response, obj) -> bool:
        """Apply the request's preconditions to `obj` (None: no live object, generation 0)."""
        q = {k: v[0] for k, v in request.query.items()}
        for header, key in (("x-goog-if-generation-match", "ifGenerationMatch"),
                            ("x-goog-if-metageneration-match", "ifMetagenerationMatch")):  # fmt: skip
            if request.get_header(header) is not None:
                q[key] = request.get_header(header)
        gen = int(obj["generation"]) if obj else 0
        meta = int(obj["metageneration"]) if obj else 0
        is_read = request.method == "GET"
        if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != gen:
            response.status = HTTPStatus.PRECONDITION_FAILED
        elif "ifMetagenerationMatch" in q and int(q["ifMetagenerationMatch"]) != meta:
            response.status = HTTPStatus.PRECONDITION_FAILED
        elif "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == gen:
            response.status = HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
        elif "ifMetagenerationNotMatch" in q and int(q["ifMetagenerationNotMatch"]) == meta:
            response.status = HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
        else:
            return False
        if obj is None and is_read and response.status == HTTPStatus.PRECONDITION_FAILED:
            response.status = HTTPStatus.NOT_FOUND  # GCS: reading a missing object is a 404 first
        if response.status == HTTPStatus.PRECONDITION_FAILED:
            message = "At least one of the pre-conditions you specified did not hold."
            response.json({"error": {"code": 412, "message": message}})
        return True

    def object_name(request):
        params = request.params or {}
        if params.get("object_id"):
            return params["object_id"]
        if "name" in request.query:
            return request.query["name"][0]
        data = request.data
        if isinstance(data, dict):
            return (data.get("meta") or {}).get("name") or data.get("name")
        return None

    def guarded(fn, *, upload_finish: bool = False, upload_start: bool = False):
        def handler(request, response, storage, *args, **kwargs):
            with lock:
                for f in faults:
                    if f["count"] > 0 and f["match"] in request.path + "?" + str(request.query):
                        f["count"] -= 1
                        response.status = HTTPStatus(f["status"])
                        response.json({"error": {"code": f["status"], "message": "injected"}})
                        return None
                bucket = (request.params or {}).get("bucket_name")
                upload_id = request.query.get("upload_id", [None])[0]
                if upload_finish and upload_id in resumable_preconditions:
                    saved = resumable_preconditions[upload_id]
                    request.query.update({k: [v] for k, v in saved["q"].items()})
                    bucket, name = saved["bucket"], saved["name"]
                else:
                    name = object_name(request)
                if bucket and name and failed(request, response, current(storage, bucket, name)):
                    return None
                if upload_start and request.query.get("uploadType", [""])[0] == "resumable":
                    q = {k: v[0] for k, v in request.query.items() if k.startswith("if")}
                    fn(request, response, storage, *args, **kwargs)
                    location = response._headers.get("Location", "")
                    uid = parse_qs(urlparse(location).query).get("upload_id", [None])[0]
                    if uid and q:
                        resumable_preconditions[uid] = {"q": q, "bucket": bucket, "name": name}
                    return None
                out = fn(request, response, storage, *args, **kwargs)
                obj = current(storage, bucket, name) if bucket and name else None
                if obj is not None and request.method == "GET":
                    response["x-goog-generation"] = obj["generation"]
                    response["x-goog-metageneration"] = obj["metageneration"]
                    response["x-goog-stored-content-length"] = str(obj.get("size", ""))
                return out

        return handler

    def inject(request, response, storage, *args, **kwargs):
        q = {k: v[0] for k, v in request.query.items()}
        with lock:
            faults.append({"status": int(q.get("status", 503)), "count": int(q.get("count", 1)),
                           "match": q.get("match", "")})  # fmt: skip
        response.write("OK")

    wrapped = {
        objects.get: guarded(objects.get),
        objects.download: guarded(objects.download),
        objects.delete: guarded(objects.delete),
        objects.patch: guarded(objects.patch),
        objects.insert: guarded(objects.insert, upload_start=True),
        objects.upload_partial: guarded(objects.upload_partial, upload_finish=True),
        objects.xml_upload: guarded(objects.xml_upload),
        objects.compose: guarded(objects.compose),
        objects.copy: guarded(objects.copy),
        objects.rewrite: guarded(objects.rewrite),
    }
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            handlers[method] = wrapped.get(fn, fn)
    server.HANDLERS = ((r"^/_inject$", {"GET": inject}),) + tuple(server.HANDLERS)
    objects_insert = wrapped[objects.insert]
    server.objects = type("objects", (), {"insert": staticmethod(objects_insert)})  # the router's POST fallback

    class Threading(http_server.ThreadingHTTPServer):
        daemon_threads = True

    server.server.HTTPServer = Threading  # many clients at once (tensorstore opens several connections)


def serve(bucket: str, port: int = 0, plain: bool = False) -> None:
    from gcp_storage_emulator.handlers.buckets import create_bucket
    from gcp_storage_emulator.server import create_server

    if not plain:
        _patch(threading.Lock())
    if port == 0:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
    srv = create_server("localhost", port, in_memory=True)
    for name in bucket.split(","):
        create_bucket(name, srv._storage)
    srv.start()
    print(port, flush=True)
    while True:
        time.sleep(3600)


def client_env(host: str) -> dict:
    """Environment for a process that talks to the emulator at `host` ("localhost:PORT"). Only
    the standard variable: gpt2_jax maps it onto tensorstore's own settings."""
    return {"STORAGE_EMULATOR_HOST": f"http://{host}"}


@contextlib.contextmanager
def emulator(bucket: str = "bucket", plain: bool = False):
    """Start the emulator in a subprocess on a free localhost port; yields "localhost:PORT"."""
    proc = subprocess.Popen([sys.executable, __file__, "--bucket", bucket, *(["--plain"] if plain else [])],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        yield f"localhost:{port}"
    finally:
        proc.kill()
        proc.wait()


def inject(host: str, *, status: int = 503, count: int = 1, match: str = "") -> None:
    """The next `count` requests whose path contains `match` answer HTTP `status`."""
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"status": status, "count": count, "match": match})
    urllib.request.urlopen(f"http://{host}/_inject?{query}").read()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bucket", default="bucket", help="bucket(s) to create, comma-separated")
    ap.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    ap.add_argument("--plain", action="store_true", help="the emulator as shipped (no generations): to compare")
    args = ap.parse_args()
    serve(args.bucket, args.port, args.plain)
