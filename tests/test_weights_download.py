"""Weights by URL against a real HTTP server on 127.0.0.1: cache, retries, errors, one download per machine."""

import http.server
import logging
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import paddle
import pytest

from ppdet_retina.io import download_cache as weights
from ppdet_retina.io.download_cache import WeightsDownloadError, cache_path, resolve_weights

from conftest import REPO, run_tool, tool_env, write_tiny_config

_WAIT_S = 60  # upper bound for any wait in these tests; none should come near it


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; each GET takes the next mode from ``server.plan`` (then 'full')."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        with server.lock:
            server.requests.append(self.path)
            mode = server.plan.pop(0) if server.plan else "full"
        if mode == "block":
            server.got_request.set()
            server.release.wait(_WAIT_S)
            mode = "full"
        body = server.files.get(self.path.split("?")[0])
        if body is None or mode == "404":
            self.send_error(404)
            return
        if mode == "garbage":
            body = b"\x80\x04 not a pickle" + bytes(len(body) - 15)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # 'drop' announces the full length, sends half and hangs up: a partial upload or a reset.
        self.wfile.write(body[:len(body) // 2] if mode == "drop" else body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.plan, srv.requests = {}, [], []
    srv.lock, srv.got_request, srv.release = threading.Lock(), threading.Event(), threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    srv.stop = lambda: (srv.release.set(), srv.shutdown(), srv.server_close())
    yield srv
    srv.release.set()
    if thread.is_alive():
        srv.shutdown()
        srv.server_close()
    thread.join(_WAIT_S)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "weights_cache"
    monkeypatch.setenv(weights.WEIGHTS_HOME_ENV, str(folder))
    return folder


def _state_bytes(tmp_path, n=60000, seed=0):
    """A real .pdparams (about n * 4 bytes) and its bytes."""
    rng = np.random.default_rng(seed)
    state = {"conv.weight": paddle.to_tensor(rng.standard_normal(n).astype("float32"))}
    path = str(tmp_path / f"src_{seed}.pdparams")
    paddle.save(state, path)
    with open(path, "rb") as f:
        return f.read()


class _Log:
    """Messages of the weights logger (the package's root logger does not propagate to caplog)."""

    def __enter__(self):
        self.records = []
        self.handler = logging.Handler(level=logging.INFO)
        self.handler.emit = self.records.append
        self.log = logging.getLogger("ppdet_retina.io.download_cache")
        self.old = self.log.level
        self.log.addHandler(self.handler)
        self.log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.log.removeHandler(self.handler)
        self.log.setLevel(self.old)

    def text(self):
        return "\n".join(r.getMessage() for r in self.records)


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_lands_in_the_cache_and_is_reused_without_the_network(server, cache, tmp_path):
    body = _state_bytes(tmp_path)
    server.files["/models/R50_pretrained.pdparams"] = body
    url = server.url("/models/R50_pretrained.pdparams") + "?token=abc"  # the query is not part of the name
    with _Log() as log:
        path = resolve_weights(url, "pretrain_weights")
    assert path == str(cache / "R50_pretrained.pdparams") == cache_path(url)
    with open(path, "rb") as f:
        assert f.read() == body
    assert server.requests == ["/models/R50_pretrained.pdparams?token=abc"]
    assert sorted(os.listdir(cache)) == ["R50_pretrained.pdparams", "R50_pretrained.pdparams.lock"]
    size = f"{len(body) / 1e6:.1f} MB"
    assert f"downloading R50_pretrained.pdparams: {size} / {size} (100%) at " in log.text()

    server.stop()  # a cached file never touches the network again
    assert resolve_weights(url, "pretrain_weights") == path
    assert resolve_weights(str(tmp_path / "local.pdparams")) == str(tmp_path / "local.pdparams")


def test_a_connection_dropped_part_way_is_retried(server, cache, tmp_path):
    body = _state_bytes(tmp_path)
    server.files["/w.pdparams"] = body
    server.plan = ["drop"]
    with _Log() as log:
        path = resolve_weights(server.url("/w.pdparams"), retry_wait=0)
    with open(path, "rb") as f:
        assert f.read() == body
    assert len(server.requests) == 2
    assert f"attempt 1/3 of {server.url('/w.pdparams')} failed: short download: {len(body) // 2} of " \
           f"{len(body)} bytes" in log.text()
    assert sorted(os.listdir(cache)) == ["w.pdparams", "w.pdparams.lock"]  # no .part file left


@pytest.mark.parametrize("mode, reason", [("drop", "short download"),
                                          ("garbage", "downloaded file does not load")])
def test_a_persistently_broken_download_is_a_clear_error(server, cache, tmp_path, mode, reason):
    server.files["/w.pdparams"] = _state_bytes(tmp_path)
    server.plan = [mode] * 5
    url = server.url("/w.pdparams")
    with pytest.raises(WeightsDownloadError) as err:
        resolve_weights(url, "weights", retries=3, retry_wait=0)
    msg = str(err.value)
    assert f"cannot download weights from '{url}' ({reason}" in msg and "3 attempt(s)" in msg
    assert "train from scratch" not in msg  # only pretrain_weights can be left empty
    assert len(server.requests) == 3 and sorted(os.listdir(cache)) == ["w.pdparams.lock"]


def test_unreachable_url_and_missing_file_messages(server, cache):
    url = f"http://127.0.0.1:{_closed_port()}/pretrained/ResNet50_cos_pretrained.pdparams"
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights(url, "pretrain_weights", retries=2, retry_wait=0)
    target = str(cache / "ResNet50_cos_pretrained.pdparams")
    msg = str(err.value)
    assert msg.startswith(f"cannot download pretrain_weights from '{url}' (cannot reach the server (")
    assert "Connection refused" in msg and msg.endswith(
        f"; 2 attempt(s)). Download the file on a machine with internet and place it at '{target}' "
        f"(the cache; PPDET_WEIGHTS_HOME moves it), or pass a local file with -o pretrain_weights=<path>, "
        f"or train from scratch with -o pretrain_weights=.")
    # A 404 is not retried: the file is not there.
    with pytest.raises(WeightsDownloadError, match=r"\(HTTP 404 .*1 attempt\(s\)"):
        resolve_weights(server.url("/absent.pdparams"), retry_wait=0)
    assert server.requests == ["/absent.pdparams"]


def test_two_processes_download_once(server, cache, tmp_path):
    """The first process holds the lock while the server keeps its answer back; the second waits and
    then takes the finished file: one request in all."""
    body = _state_bytes(tmp_path)
    server.files["/shared.pdparams"] = body
    server.plan = ["block"]
    url = server.url("/shared.pdparams")
    env = tool_env({"PYTHONWARNINGS": "ignore", "PYTHONPATH": REPO})
    # Progress lines to stderr, the cached path alone to stdout.
    cmd = [sys.executable, "-c", "import logging, sys; from ppdet_retina.io import download_cache as weights; "
           "weights.logger.addHandler(logging.StreamHandler(sys.stderr)); weights.logger.propagate = False; "
           "weights.logger.setLevel(logging.INFO); print(weights.resolve_weights(sys.argv[1]))", url]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert server.got_request.wait(_WAIT_S), "the first process never asked the server"
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=REPO)
        try:
            seen = []
            for line in second.stderr:  # the second one says it waits before the answer is released
                seen.append(line)
                if "waiting for another process downloading" in line:
                    break
            assert seen and "waiting for another process" in seen[-1], "".join(seen)
            server.release.set()
            out2, err2 = second.communicate(timeout=_WAIT_S)
        finally:
            second.kill() if second.poll() is None else None
        out1, err1 = first.communicate(timeout=_WAIT_S)
    finally:
        first.kill() if first.poll() is None else None
    target = str(cache / "shared.pdparams")
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert out1.strip() == out2.strip() == target
    assert "downloaded by another process" in err2 and "downloading shared.pdparams" in err1
    assert server.requests == ["/shared.pdparams"]
    with open(target, "rb") as f:
        assert f.read() == body


def test_train_tool_fine_tunes_from_a_url_with_another_class_count(server, cache, tmp_path, tiny_coco):
    """tools/train.py with pretrain_weights=<url>: a 5-class model's file into the 3-class tiny dataset
    downloads once, loads everything but the class-dependent head, and says so."""
    from ppdet_retina.core.workspace import create, load_config

    config = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    model = create("RetinaNet", load_config(config, ["num_classes=5"]))
    source = str(tmp_path / "five_classes.pdparams")
    paddle.save(model.state_dict(), source)
    with open(source, "rb") as f:
        server.files["/five_classes.pdparams"] = f.read()
    url = server.url("/five_classes.pdparams")
    proc = run_tool("train.py", "-c", config, "-o", f"pretrain_weights={url}", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = len(model.state_dict())
    cached = str(cache / "five_classes.pdparams")
    assert f"pretrain_weights: loaded {total - 2} of the model's {total} tensors from {cached}" in proc.stdout
    assert "2 class-dependent head tensor(s) re-initialised" in proc.stdout
    assert "head.cls_logits.weight file [45, 16, 3, 3] vs model [27, 16, 3, 3]" in proc.stdout
    assert server.requests == ["/five_classes.pdparams"]
    assert os.path.isfile(os.path.join(str(tmp_path), "output", "tiny_retina", "model_final.pdparams"))


def test_a_broken_file_placed_in_the_cache_is_named_with_how_to_refetch(cache):
    """A file already in the cache is trusted without the network; when it does not load, the error
    says where it is and that deleting it fetches it again."""
    from ppdet_retina.io.checkpoint import load_pretrain_weights

    cache.mkdir()
    (cache / "R18.pdparams").write_bytes(b"half a file")
    url = f"http://127.0.0.1:{_closed_port()}/R18.pdparams"  # never contacted
    with pytest.raises(ValueError) as err:
        load_pretrain_weights(paddle.nn.Linear(2, 2), url)
    assert f"cannot read weights file '{cache / 'R18.pdparams'}'" in str(err.value)
    assert str(err.value).endswith("it is in the download cache: delete it to download it again")
