"""What the GPU sees (issue 10): a DataLoader-style pipeline over JPEGs, per storage setup.

    .venv/bin/python bench/train.py            # 1,500 JPEGs of ~110 KB, 2 epochs; bench/RESULTS.md + train.png
    .venv/bin/python bench/train.py --smoke --out /tmp/r.md   # tiny: local disk, HDF5, cachefs only (CI)

Needs root (FUSE mounts, dropping the page cache), Pillow and h5py (``./install.sh --test``),
s3fs and rclone for those setups. SeaweedFS on loopback behind the latency proxy
(``--rtt-ms``, default +20 ms per round trip).

Dataset: an ImageFolder-style tree of real JPEGs made with Pillow (``--images`` in
``--classes`` folders, ~``--side`` x 3/4 pixels, ~110 KB at the default size), uploaded to the
store; the local copy it is made in is the "local disk" setup, and the same JPEGs repacked into
one HDF5 file (h5py, one variable-length byte array per image) on the local disk is the
workaround of the IBM COS small-file study.

Pipeline, as torch's DataLoader does it (torch is not needed): ``--workers`` worker processes
each load a batch of ``--batch`` images (open, read, decode, random-resized-crop to 224x224,
convert to bytes); at most ``2 x workers`` batches are loading ahead (prefetch_factor 2). The
consumer is a simulated GPU that spends ``batch / --gpu-rate`` seconds on each batch. Per epoch
(each in a new shuffled order): loader images/s, and GPU busy % = time computing / epoch time
(the rest it waited for a batch). The GPU rate defaults to 0.9x what the pipeline delivers from
the local disk with a warm page cache (measured first): the disk can just keep up.

Setups, each on a fresh mount with an empty cache, page cache dropped first: local disk, HDF5
repack on local disk, s3fs, rclone, cachefs (no help), cachefs ``--prefetch`` (started with the
mount), cachefs with the order announced (``cachefs.client.announce``: this epoch's order and
the next one's, at the start of each epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.rss_listing import replace_section  # noqa: E402
from bench.run import drop_caches, latency_proxy, mount_rclone, mount_s3fs, stop_pid  # noqa: E402
from cachefs import client  # noqa: E402
from cachefs.testing.servers import Server, seaweed_server  # noqa: E402

HEADING = "## What the GPU sees (bench/train.py)"
SETUPS = ("local disk", "HDF5 repack (local disk)", "s3fs", "rclone", "cachefs", "cachefs --prefetch",
          "cachefs, order announced")
SMOKE_SETUPS = ("local disk", "HDF5 repack (local disk)", "cachefs", "cachefs, order announced")
CROP = 224

# -- dataset ----------------------------------------------------------------------------------


def make_jpeg(rng: random.Random, side: int) -> bytes:
    from PIL import Image, ImageFilter

    w, h = side + rng.randint(-side // 5, side // 5), side * 3 // 4 + rng.randint(-side // 6, side // 6)
    red = Image.effect_noise((w, h), rng.uniform(40, 80)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    green = Image.linear_gradient("L").rotate(rng.uniform(0, 360)).resize((w, h))
    blue = Image.effect_noise((w, h), rng.uniform(20, 50))
    buf = io.BytesIO()
    Image.merge("RGB", (red, green, blue)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def make_dataset(root: Path, n: int, classes: int, side: int) -> list[str]:
    def one(i: int) -> str:
        rel = f"train/n{i % classes:05d}/img{i:06d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_jpeg(random.Random(i), side))
        return rel

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def repack_hdf5(root: Path, paths: list[str], out: Path) -> None:
    import h5py
    import numpy as np

    with h5py.File(out, "w") as f:
        data = f.create_dataset("images", (len(paths),), dtype=h5py.vlen_dtype(np.uint8))
        for i, rel in enumerate(paths):
            data[i] = np.frombuffer((root / rel).read_bytes(), dtype=np.uint8)


# -- the loader's workers (processes) ------------------------------------------------------------

_SOURCE: dict[str, Any] = {}


def _worker_init(kind: str, where: str) -> None:
    _SOURCE.update(kind=kind, where=where, h5=None)


def _read(index: int, rel: str) -> bytes:
    if _SOURCE["kind"] == "hdf5":
        if _SOURCE["h5"] is None:
            import h5py

            _SOURCE["h5"] = h5py.File(_SOURCE["where"], "r")
        return bytes(_SOURCE["h5"]["images"][index])
    with open(os.path.join(_SOURCE["where"], rel), "rb") as f:
        return f.read()


def _load_batch(batch: list[tuple[int, str]], seed: int) -> tuple[int, int]:
    """Open, read, decode, random-resized-crop to 224, to bytes: (images, bytes of the batch)."""
    from PIL import Image

    rng = random.Random(seed)
    out = 0
    for index, rel in batch:
        img = Image.open(io.BytesIO(_read(index, rel))).convert("RGB")
        w, h = img.size
        area = w * h * rng.uniform(0.08, 1.0)
        ratio = rng.uniform(3 / 4, 4 / 3)
        cw, ch = min(w, int((area * ratio) ** 0.5)), min(h, int((area / ratio) ** 0.5))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out += len(img.resize((CROP, CROP), Image.BILINEAR, box=(x, y, x + cw, y + ch)).tobytes())
    return len(batch), out


def run_epoch(pool: Any, order: list[tuple[int, str]], batch: int, workers: int, gpu_rate: float | None,
              seed: int) -> tuple[float, float]:
    """One epoch through the pipeline: (loader images/s, GPU busy fraction)."""
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    ahead = 2 * workers
    pending: list[Any] = []
    busy = 0.0
    start = time.monotonic()
    nxt = 0
    for _ in range(len(batches)):
        while nxt < len(batches) and len(pending) < ahead:
            pending.append(pool.apply_async(_load_batch, (batches[nxt], seed * 100_003 + nxt)))
            nxt += 1
        n, _ = pending.pop(0).get()
        if gpu_rate:
            compute = n / gpu_rate
            time.sleep(compute)  # the GPU works on the batch
            busy += compute
    elapsed = time.monotonic() - start
    return len(order) / elapsed, busy / elapsed


# -- setups -----------------------------------------------------------------------------------


@contextlib.contextmanager
def mount_cachefs(work: Path, endpoint: str, env: dict[str, str], bucket: str, *extra: str) -> Iterator[Path]:
    mnt = work / "mnt"
    mnt.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "cachefs.cli", "mount", f"s3://{bucket}", str(mnt), "--endpoint-url",
                    endpoint, "--cache-dir", str(work / "cache"), "--cache-size", "100G", *extra],
                   env=env, check=True, capture_output=True)
    pid = client.status(mnt)["pid"]
    try:
        yield mnt
    finally:
        subprocess.run([sys.executable, "-m", "cachefs.cli", "unmount", str(mnt)], env=env, check=False,
                       capture_output=True)
        stop_pid(int(pid))


@contextlib.contextmanager
def setup(name: str, work: Path, root: Path, h5: Path, server: Server, proxy_url: str,
          bucket: str) -> Iterator[tuple[str, str]]:
    """(kind of source, where) for the workers."""
    env = dict(os.environ, **server.env)
    if name == "local disk":
        yield "files", str(root)
    elif name == "HDF5 repack (local disk)":
        yield "hdf5", str(h5)
    elif name == "s3fs":
        with mount_s3fs(work, proxy_url, env, bucket=bucket) as m:
            yield "files", str(m.path)
    elif name == "rclone":
        with mount_rclone(work, proxy_url, env, bucket=bucket) as m:
            yield "files", str(m.path)
    else:
        extra = ["--prefetch"] if name == "cachefs --prefetch" else []
        with mount_cachefs(work, proxy_url, env, bucket, *extra) as mnt:
            yield "files", str(mnt)


def plot(results: dict[str, list[dict[str, float]]], out: Path) -> None:
    """GPU busy % per epoch, one line per setup (drawn with Pillow)."""
    from PIL import Image, ImageDraw

    width, height, left, top, bottom, right = 900, 480, 60, 30, 50, 260
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    epochs = max(len(v) for v in results.values())
    px = lambda e: left + (width - left - right) * (e / max(1, epochs - 1))  # noqa: E731
    py = lambda pct: top + (height - top - bottom) * (1 - pct / 100)  # noqa: E731
    for pct in range(0, 101, 20):
        d.line([(left, py(pct)), (width - right, py(pct))], fill=(225, 225, 225))
        d.text((left - 35, py(pct) - 6), f"{pct}%", fill="black")
    for e in range(epochs):
        d.text((px(e) - 20, height - bottom + 10), f"epoch {e + 1}", fill="black")
    d.text((left, 8), "GPU busy % per epoch", fill="black")
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (227, 119, 194)]
    for i, (name, rows) in enumerate(results.items()):
        c = colors[i % len(colors)]
        pts = [(px(e), py(r["busy"] * 100)) for e, r in enumerate(rows)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        d.line([(width - right + 15, top + 20 * i + 6), (width - right + 40, top + 20 * i + 6)], fill=c, width=3)
        d.text((width - right + 45, top + 20 * i), name, fill="black")
    img.save(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--side", type=int, default=500, help="image width in pixels (height 3/4 of it)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--gpu-rate", type=float, default=None,
                    help="images/s the simulated GPU consumes (default: 0.9x the local disk's warm loader rate)")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--only", help="comma-separated setups (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = ap.parse_args()
    setups = list(SETUPS)
    if args.smoke:
        args.images, args.classes, args.side, args.batch, args.workers, args.rtt_ms = 48, 4, 96, 8, 2, 2.0
        setups = list(SMOKE_SETUPS)
    if args.only:
        setups = [s for s in SETUPS if s in args.only.split(",")]
    png = args.out.with_name("train.png")

    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cachefs-bench-train-") as tmp, seaweed_server() as server:
        work = Path(tmp)
        root = work / "local"
        paths = make_dataset(root, args.images, args.classes, args.side)
        sizes = [(root / p).stat().st_size for p in paths]
        h5 = work / "images.h5"
        repack_hdf5(root, paths, h5)
        bucket = f"train-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        server.upload(bucket, {p: (root / p).read_bytes() for p in paths})
        orders = []
        for e in range(args.epochs):
            idx = list(range(len(paths)))
            random.Random(e).shuffle(idx)
            orders.append([(i, paths[i]) for i in idx])
        ctx = multiprocessing.get_context("fork")
        gpu_rate = args.gpu_rate
        if gpu_rate is None:  # calibrate: the local disk, warm, GPU infinitely fast
            with ctx.Pool(args.workers, _worker_init, ("files", str(root))) as pool:
                run_epoch(pool, orders[0], args.batch, args.workers, None, 0)
                rate, _ = run_epoch(pool, orders[0], args.batch, args.workers, None, 0)
            gpu_rate = 0.9 * rate
        print(f"GPU rate: {gpu_rate:.0f} images/s", flush=True)
        with latency_proxy(server.address, args.rtt_ms, work / "proxy.log") as (proxy_url, _):
            for name in setups:
                sub = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                sub.mkdir()
                drop_caches()
                with setup(name, sub, root, h5, server, proxy_url, bucket) as (kind, where), \
                        ctx.Pool(args.workers, _worker_init, (kind, where)) as pool:
                    rows = results[name] = []
                    for e, order in enumerate(orders):
                        if name == "cachefs, order announced":
                            client.announce(where, *[[p for _, p in o] for o in orders[e:e + 2]])
                        rate, busy = run_epoch(pool, order, args.batch, args.workers, gpu_rate, e + 1)
                        rows.append({"images_s": rate, "busy": busy})
                        print(name, e + 1, json.dumps(rows[-1]), flush=True)
    plot(results, png)
    mean_kb = sum(sizes) / len(sizes) / 1000
    cmd = "bench/train.py" + (" --smoke" if args.smoke else
                              f" --images {args.images} --classes {args.classes} --side {args.side} "
                              f"--epochs {args.epochs} --batch {args.batch} --workers {args.workers} "
                              f"--rtt-ms {args.rtt_ms:g}")
    head = "| setup | " + " | ".join(f"epoch {e + 1}: images/s, GPU busy" for e in range(args.epochs)) + " |\n"
    text = (f"{HEADING}\n\n`{cmd}`: {len(paths)} JPEGs ({mean_kb:.0f} KB mean) in {args.classes} folders; "
            f"{args.workers} loader processes, batches of {args.batch}, 2 batches per worker ahead; simulated GPU "
            f"at {gpu_rate:.0f} images/s (0.9x the local disk's warm loader rate unless given); SeaweedFS behind "
            f"the latency proxy (+{args.rtt_ms:g} ms per round trip); page cache dropped and a fresh mount per "
            f"setup. Plot: `{png.name}`.\n\n"
            + head + "|---|" + "---|" * args.epochs + "\n"
            + "".join(f"| {name} | " + " | ".join(f"{r['images_s']:.0f}, {r['busy'] * 100:.0f}%" for r in rows)
                      + " |\n" for name, rows in results.items()))
    ref = results.get("HDF5 repack (local disk)")
    ann = results.get("cachefs, order announced")
    if ref and ann:
        ratios = [a["busy"] / max(r["busy"], 1e-9) for a, r in zip(ann, ref, strict=True)]
        text += ("\nGPU busy, cachefs with the order announced / the HDF5 repack on local disk: "
                 + ", ".join(f"epoch {e + 1} **{x:.2f}x**" for e, x in enumerate(ratios)) + " (target >= 0.9x).\n")
    replace_section(args.out, text, HEADING)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
