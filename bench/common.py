"""Shared bench machinery: device, peak memory, and the device's own limits (copy bandwidth, matmul time) measured in the same run."""

import contextlib
import os
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def sync():
    if CUDA:
        torch.cuda.synchronize()


def device_name():
    if CUDA:
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def forced_backend(name):
    """A context that sets DISTILLZOO_BACKEND for a provider's calls."""

    @contextlib.contextmanager
    def ctx():
        old = os.environ.get("DISTILLZOO_BACKEND")
        os.environ["DISTILLZOO_BACKEND"] = name
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("DISTILLZOO_BACKEND", None)
            else:
                os.environ["DISTILLZOO_BACKEND"] = old

    return ctx


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory above the start of a measurement, in MiB.

    CUDA: ``max_memory_allocated`` (reset at start). CPU: the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) above its RSS at start; RSS counts
    pages the allocator keeps, so it is an upper bound on the live tensors.
    """

    def start(self):
        if CUDA:
            sync()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _rss_kib("VmRSS:") * 1024

    def peak_mib(self):
        if CUDA:
            sync()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_rss_kib("VmHWM:") * 1024 - self.base) / 2**20


def timed(fn, reps):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


_cache = {}


def copy_bandwidth():
    """Bytes/s of a large device copy (read + write counted), measured once per run."""
    if "copy" not in _cache:
        n = (1 << 30) // 4 if CUDA else (1 << 27) // 4
        src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
        dst = torch.empty_like(src)
        seconds = timed(lambda: dst.copy_(src), 20 if CUDA else 5)
        _cache["copy"] = 2 * src.numel() * 4 / seconds
        del src, dst
    return _cache["copy"]


def matmul_bound(n, hs, ht, v, dtype=DTYPE):
    """Seconds for the four lm_head matmuls of fused distillation at full size (cuBLAS / MKL alone).

    student logits h_s W_s^T, teacher logits h_t W_t^T, dX = dZ W_s, dW = dZ^T h_s:
    the lower bound of SPEC section 4 for a fused linear kernel, measured now.
    """
    key = ("mm", n, hs, ht, v, dtype)
    if key not in _cache:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        h_s = torch.randn(n, hs, device=DEVICE, generator=g).to(dtype)
        w_s = torch.randn(v, hs, device=DEVICE, generator=g).to(dtype)
        h_t = torch.randn(n, ht, device=DEVICE, generator=g).to(dtype)
        w_t = torch.randn(v, ht, device=DEVICE, generator=g).to(dtype)
        # at full N the logits alone are [n, v]; the bound is the sum of the four matmul times
        z = h_s @ w_s.T
        total = 0.0
        for fn in (lambda: h_s @ w_s.T, lambda: h_t @ w_t.T, lambda: z @ w_s, lambda: z.T @ h_s):
            total += timed(fn, 5 if CUDA else 1)
        _cache[key] = total
        del h_s, w_s, h_t, w_t, z
    return _cache[key]


def start_server(model_dir, name):
    """``distillzoo serve MODEL_DIR`` in a child process on a free port of 127.0.0.1, one torch thread, answering:
    ``(process, url)``. Terminate the process when done."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "distillzoo", "serve", str(model_dir), "--port", str(port),
                               "--served-model-name", name], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1).read()
            return server, url
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"distillzoo serve exited: {server.stderr.read()}") from None
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"distillzoo serve did not answer at {url} within a minute")
