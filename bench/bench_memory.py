"""Server memory over many uploads: is the Streamlit app's memory bounded?

Starts the app (streamlit run app/main.py) on a free local port, opens it in Chromium (Playwright,
Debian's /usr/bin/chromium: never `playwright install`), and uploads COUNT different photos of
several megapixels one after another in one session, waiting for each caption. The photos are
the sample photos shipped with installed packages (captioning/samples.py), each scaled to a
random 3-8 megapixel size and aspect, cropped, mirrored, colour-shifted and noised, so no two
share a cache key. The server's resident memory (VmRSS of the process and its children) is
sampled every 0.25 s throughout.

    python bench/bench_memory.py --count 100 --out test-artifacts/bench_memory.json

Reports RSS before any page is open, after the first caption (model loaded), after every 10th
upload, the peak while uploading, and after the page is closed. With --malloc-trim the server
also gets a SIGUSR1 handler (a sitecustomize.py on its PYTHONPATH) that runs gc.collect() and
glibc's malloc_trim(0), sent once the page is closed: how much of its memory is already free
but kept by the allocator. The figures in docs/reliability.md come from this script.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import tempfile
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
CAPTION_JS = "() => { const e = document.querySelector('.best-caption'); return e && e.textContent.trim().length > 0 }"


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.time(), rss_mb(self.pid)))
            self.stop.wait(self.every)


def photos(count: int, seed: int, min_mp: float, max_mp: float):
    """(name, JPEG bytes, (w, h)) for ``count`` different photos of min_mp..max_mp megapixels."""
    from captioning.samples import load_sample, sample_names

    bases = [np.asarray(load_sample(n).convert("RGB")) for n in sample_names()]
    rng = np.random.default_rng(seed)
    for i in range(count):
        a = bases[i % len(bases)]
        h0, w0 = a.shape[:2]
        # A random crop of 60-100% of each side, mirrored half the time, colours shifted.
        ch, cw = int(h0 * rng.uniform(0.6, 1.0)), int(w0 * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h0 - ch + 1), rng.integers(0, w0 - cw + 1)
        crop = a[y:y + ch, x:x + cw].astype(np.float32) * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        mp = rng.uniform(min_mp, max_mp) * 1e6
        aspect = rng.uniform(0.6, 1.8)
        w, h = int((mp * aspect) ** 0.5), int((mp / aspect) ** 0.5)
        im = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        big = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, (h, w, 1), dtype=np.int16)  # sensor-like noise
        buf = io.BytesIO()
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
        yield f"photo_{i:03d}.jpg", buf.getvalue(), (w, h)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRIM_HOOK = """
import ctypes, gc, os, signal
def _rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
def _trim(*_):
    before = _rss()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(os.environ["BENCH_TRIM_LOG"], "a") as f:
        f.write(f"{before:.1f} {_rss():.1f}\\n")
if os.environ.get("BENCH_TRIM_LOG"):
    signal.signal(signal.SIGUSR1, _trim)
"""


def start_server(port: int, log_path: Path, hook_dir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    if hook_dir is not None:
        (hook_dir / "sitecustomize.py").write_text(TRIM_HOOK)
        env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["BENCH_TRIM_LOG"] = str(hook_dir / "trim.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py"),
                             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"streamlit did not start; see {log_path}")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--min-mp", type=float, default=3.0)
    ap.add_argument("--max-mp", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--idle", type=float, default=15.0, help="seconds to wait after closing the page")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="after closing the page, make the server run gc.collect() and malloc_trim(0) and report RSS")
    ap.add_argument("--out", default=str(REPO / "test-artifacts" / "bench_memory.json"))
    a = ap.parse_args()
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    hook_dir = Path(tempfile.mkdtemp(prefix="bench-memory-")) if a.malloc_trim else None
    server = start_server(port, out.with_suffix(".server.log"), hook_dir)
    url = f"http://127.0.0.1:{port}"
    sampler = Sampler(server.pid)
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "count": a.count,
                 "megapixels": [a.min_mp, a.max_mp], "cpus": os.cpu_count(), "machine": platform.platform(),
                 "python": platform.python_version()}
    try:
        time.sleep(2)
        res["rss_before_mb"] = rss_mb(server.pid)
        sampler.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            page.goto(url)
            page.wait_for_function(CAPTION_JS, timeout=300_000)  # the default photo: loads the model
            res["rss_after_first_caption_mb"] = rss_mb(server.pid)
            side = page.locator('[data-testid="stSidebar"]')
            side.locator("label").filter(has_text="Upload").first.click()
            side.locator("input[type=file]").wait_for(state="attached")
            every, times, captions, sizes = [], [], [], []
            t_start = time.time()
            for i, (name, data, (w, h)) in enumerate(photos(a.count, a.seed, a.min_mp, a.max_mp)):
                t0 = time.perf_counter()
                side.locator("input[type=file]").set_input_files({"name": name, "mimeType": "image/jpeg", "buffer": data})
                # This photo's own line under the image (name and size), then the run has finished.
                page.get_by_text(f"{name} · JPEG RGB {w}x{h}").first.wait_for(timeout=180_000)
                page.wait_for_function(CAPTION_JS, timeout=180_000)
                page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                       timeout=180_000)
                times.append(time.perf_counter() - t0)
                for bad in ('[data-testid="stException"]', '[data-testid="stAlert"]'):
                    if page.locator(bad).filter(has_text="Cannot use").count() or \
                            (bad.endswith('stException"]') and page.locator(bad).count()):
                        raise SystemExit(f"{name}: the app showed an error")
                captions.append(page.locator(".best-caption").first.inner_text().strip())
                sizes.append(len(data))
                if (i + 1) % 10 == 0 or i == 0:
                    every.append({"uploads": i + 1, "rss_mb": round(rss_mb(server.pid), 1)})
                    print(f"{i + 1:4d} uploads  rss {every[-1]['rss_mb']:7.1f} MiB  last {times[-1]:.2f} s  "
                          f"{w}x{h}  {captions[-1]!r}", flush=True)
            res["upload_seconds_total"] = round(time.time() - t_start, 1)
            page.close()
            browser.close()
        t_closed = time.time()
        res["rss_right_after_close_mb"] = rss_mb(server.pid)
        time.sleep(a.idle)
        res["rss_after_idle_mb"] = rss_mb(server.pid)
        if hook_dir is not None:
            os.kill(server.pid, signal.SIGUSR1)
            log = hook_dir / "trim.log"
            for _ in range(100):
                if log.is_file() and log.read_text().strip():
                    break
                time.sleep(0.2)
            time.sleep(1)
            res["rss_after_malloc_trim_mb"] = round(rss_mb(server.pid), 1)
        sampler.stop.set()
        sampler.join()
        during = [r for t, r in sampler.samples if t_start <= t <= t_closed]
        res.update(rss_every_10_uploads=every, rss_peak_during_mb=round(max(during), 1),
                   seconds_per_upload={"median": round(float(np.median(times)), 2), "max": round(max(times), 2)},
                   upload_mb={"median": round(float(np.median(sizes)) / 2 ** 20, 2), "max": round(max(sizes) / 2 ** 20, 2)},
                   distinct_captions=len(set(captions)))
        later = [e["rss_mb"] for e in every if e["uploads"] >= max(10, a.count // 2)]
        res["rss_range_second_half_mb"] = round(max(later) - min(later), 1) if len(later) > 1 else None
    finally:
        sampler.stop.set()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    for k in ("rss_before_mb", "rss_after_first_caption_mb", "rss_peak_during_mb", "rss_right_after_close_mb",
              "rss_after_idle_mb"):
        res[k] = round(res[k], 1)
    if hook_dir is not None:
        import shutil

        shutil.rmtree(hook_dir, ignore_errors=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "rss_every_10_uploads"}, indent=2))


if __name__ == "__main__":
    main()
