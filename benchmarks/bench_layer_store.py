"""The layer store on and off, side by side: a visitor's kernel holding the default SmolLM2 layer.

    python benchmarks/bench_layer_store.py [--repeats 2]

Each run starts a real ipykernel (jupyter_client), as Voila's pool does, and runs the app's notebook in
it: first its import cell (what a preheated kernel does before its visitor comes), then, timed from the
client, `explorer_app("")` and the Layer Lab's wait until it shows the default model's block-0 q_proj
with its GPTQ run done: the kernel's side of "a second page -> its model layer" (the page's own loading
comes on top: benchmarks/bench_ui_browser.py). Then the kernel's memory (VmRSS, and its anonymous and
file-backed parts, from /proc) and whether torch was imported. Two paths, alternating:

  * off: the layer store off (GPTQ_EXPLORER_LAYER_STORE_GB=0), the path before the store: the lab shows
    the synthetic layer, then loads torch and the model and captures the layer in a background job;
  * on: the layer read from the store (NumPy, memory-mapped), shown at once.

The store's entry for the default layer is made first if it is missing (`gptq-explorer prepare`). No
preload (GPTQ_EXPLORER_PRELOAD=0), one thread per kernel (as ./run.sh app).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUP = "from gptq_explorer.ui.app import explorer_app"  # the notebook's first cell
VISIT = """
app = explorer_app("")
_first = app.layer_lab.data.name
app.layer_lab.wait(600)
assert app.layer_lab.errors == [], app.layer_lab.errors
"""
REPORT = """
import sys
print(repr((_first, app.layer_lab.data.name, "torch" in sys.modules)))
"""


def rss(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of a process, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def execute(client, code: str, timeout: float = 900) -> str:
    """Run code in the kernel; its stdout (an error raises)."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = client.execute_interactive(code, timeout=timeout, output_hook=hook)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content'].get('evalue')}")
    return "".join(out)


def one_kernel(store: bool) -> dict:
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQ_EXPLORER_THREADS": "1", "GPTQ_EXPLORER_PRELOAD": "0"}
    env.pop("GPTQ_EXPLORER_LAYER_STORE_GB", None)
    if not store:
        env["GPTQ_EXPLORER_LAYER_STORE_GB"] = "0"
    km, client = start_new_kernel(kernel_name="python3", env=env, cwd=str(ROOT / "notebooks"))
    try:
        pid = km.provisioner.process.pid
        execute(client, SETUP)
        preheated = rss(pid)
        t0 = time.perf_counter()
        execute(client, VISIT)
        seconds = time.perf_counter() - t0
        first, shown, torch = eval(execute(client, REPORT))  # noqa: S307 - our own repr
        return {"seconds": seconds, "first": first, "shown": shown, "torch": torch,
                "preheated_mb": preheated["VmRSS"], **{k + "_mb": v for k, v in rss(pid).items()}}
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def ensure_stored() -> None:
    from gptq_explorer.services import layer_store
    from gptq_explorer.services.layer_source import ModelSource

    key = ModelSource().store_key()
    if key is None or layer_store.read(key) is None:
        print("the default layer is not stored: gptq-explorer prepare", flush=True)
        subprocess.run([sys.executable, "-m", "gptq_explorer.cli", "prepare"], check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="kernels per path (alternating)")
    a = p.parse_args(argv)
    ensure_stored()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f} at the start")
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(a.repeats):
        for path in ("off", "on"):
            r = one_kernel(store=path == "on")
            runs[path].append(r)
            print(f"  store {path:3s} run {i + 1}: first view {r['first']!r}, then {r['shown']!r} after "
                  f"{r['seconds']:.2f} s; RSS {r['VmRSS_mb']:.0f} MB (anonymous {r['RssAnon_mb']:.0f}, "
                  f"file-backed {r['RssFile_mb']:.0f}; preheated {r['preheated_mb']:.0f}); "
                  f"torch imported: {r['torch']}", flush=True)

    def span(path: str, key: str, fmt: str) -> str:
        values = [r[key] for r in runs[path]]
        return f"{min(values):{fmt}}-{max(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"

    def median(path: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[path])

    print(f"\n{'kernel holding the default layer':44s} {'off':>13s} {'on':>13s} {'on/off':>12s}")
    rows = [("visit -> model layer shown, GPTQ run done (s)", "seconds", ".2f"),
            ("RSS (MB)", "VmRSS_mb", ".0f"), ("  anonymous (MB)", "RssAnon_mb", ".0f"),
            ("  file-backed (MB)", "RssFile_mb", ".0f"),
            ("preheated kernel before it (MB)", "preheated_mb", ".0f")]
    for label, key, fmt in rows:
        print(f"{label:44s} {span('off', key, fmt):>13s} {span('on', key, fmt):>13s} "
              f"{median('on', key) / median('off', key):12.2f}")
    torch = [str(runs[path][0]["torch"]) for path in ("off", "on")]
    print(f"{'torch imported':44s} {torch[0]:>13s} {torch[1]:>13s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
