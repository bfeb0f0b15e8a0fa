"""The GPU check in one command, for a machine with one NVIDIA GPU, its own CUDA build of torch and
no network (README, "On a GPU machine"):

    python3 bench/gpu_check.py [OUT_DIR]            # default bench/out/gpu; `make gpu-check`
    python3 bench/gpu_check.py OUT_DIR --cpu-smoke  # the same steps at toy sizes on a CPU: the plumbing

Installs the wheels `make gpu-wheels` put in .gpu-wheels/ (no index, no dependencies) into
.gpu-site/, ahead of the machine's own packages on PYTHONPATH, then runs, each under its own time
limit and all within --budget seconds (440), a failure not stopping the next:
  pytest      pytest -m gpu (bf16 training with both engines, grouped GEMM, NCCL all-to-all)
  moe_layer   bench.moe_layer: ours beside megatron-core's MoELayer at the Mixtral, DBRX and
              DeepSeekMoE shapes (and the dense ceiling)
  train_e2e   bench.train_e2e moe_1b, eager then compiled, with where a step's time goes
OUT_DIR gets every table as JSON, pytest's junit XML, the whole log (gpu_check.log) and a summary
(gpu_check-gpu.json): five files. Exits 0 when every step passed, 1 naming those that did
not, 2 when there is no GPU (without --cpu-smoke). Standard library only: it runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# moe_1b as in bench/reference/train_e2e-moe_1b-h100.json
MOE_1B = [
    "model=moe_1b",
    "data.seq_len=2048",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "logging.progress_bar=false",
]
# a model of a few seconds on a CPU, for --cpu-smoke: the tests' own (the repository is the cwd)
sys.path.insert(0, str(ROOT))
from tests.conftest import TINY as TOY  # noqa: E402


def steps(out: Path, smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, its own time limit in seconds), in order."""
    moe_layer = ["--shapes", "mixtral", "dbrx", "deepseekmoe", "--contenders", "ours", "megatron"]
    if smoke:
        moe_layer += ["--width-divisor", "64", "--tokens", "256", "--repeat", "2"]
    e2e = ["--compare", "compile", "--profile"] + (
        ["--steps", "2", "--warmup", "1", *TOY] if smoke else MOE_1B
    )
    pytest = ["-m", "pytest", "-m", "gpu", "-q", "--continue-on-collection-errors"]
    return [
        ("pytest", [*pytest, f"--junitxml={out / 'pytest-gpu.xml'}"], 120),
        ("moe_layer", ["-m", "bench.moe_layer", "--out-dir", str(out), *moe_layer], 100),
        ("train_e2e", ["-m", "bench.train_e2e", "--out-dir", str(out), *e2e], 440),  # what is left
    ]


class Log:
    """Everything printed, also into OUT_DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = path.open("w")

    def __call__(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()


def run(command: list[str], limit: float, log: Log, env: dict) -> tuple[int | None, float]:
    """The command's exit status (None: stopped at its time limit) and its seconds; its output
    streamed into the log. Run in a session of its own, so that stopping it stops its children
    (compile workers) too."""
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass

    timer = threading.Timer(limit, stop)
    timer.start()
    try:
        for line in proc.stdout:
            log(line)
        proc.wait()
    finally:
        timer.cancel()
    return (None if stopped.is_set() else proc.returncode), time.monotonic() - start


def has_gpu() -> tuple[bool, str]:
    """Whether this Python's torch sees a CUDA GPU, and what it says about the machine."""
    probe = "import torch; print(torch.__version__, torch.cuda.is_available(), " + (
        "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    )
    result = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return False, f"{PYTHON} cannot import torch: {result.stderr.strip().splitlines()[-1:]}"
    version, available, name = result.stdout.strip().split(" ", 2)
    return available == "True", f"torch {version}, {name}"


def install_wheels(wheels: Path, site: Path, log: Log) -> tuple[str, bool]:
    """The carried wheels into `site` (no index, no dependencies): what was done, in a line, and
    whether it went well."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return f"no wheels in {wheels}: using the packages {PYTHON} has", True
    command = [PYTHON, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    result = subprocess.run(command, capture_output=True, text=True)
    log(result.stdout + result.stderr)
    if result.returncode != 0:
        return f"pip install of {len(found)} wheels from {wheels} failed (exit {result.returncode})", False
    names = ", ".join(p.name for p in found)
    return f"installed {len(found)} wheels from {wheels} into {site}: {names}", True


def pytest_counts(xml: Path) -> dict | None:
    if not xml.is_file():
        return None
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="bench/out/gpu", help="where the JSON and the log go")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: the same steps at toy sizes")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for all the steps together")
    parser.add_argument("--wheels", default=os.environ.get("GPU_WHEELS", ".gpu-wheels"))
    parser.add_argument("--site", default=os.environ.get("GPU_SITE", ".gpu-site"), help="installed there")
    parser.add_argument("--only", nargs="+", choices=["pytest", "moe_layer", "train_e2e"], default=None)
    args = parser.parse_args()
    start = time.monotonic()

    gpu, about = has_gpu()
    if not gpu and not args.cpu_smoke:
        print(
            f"gpu_check: no CUDA GPU here ({about}); run it on a GPU machine, or add --cpu-smoke", flush=True
        )
        return 2
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    log(f"gpu_check on {platform.node()}: Python {platform.python_version()}, {about}\n")
    smi = nvidia_smi()
    if smi:
        log(f"nvidia-smi: {smi}\n")
    site = (ROOT / args.site).resolve()
    installed, ok = install_wheels(ROOT / args.wheels, site, log)
    log(installed + "\n")
    results = [] if ok else [{"step": "install", "status": installed, "seconds": 0.0}]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(site), env.get("PYTHONPATH")) if p)

    deadline = start + args.budget
    for name, command, limit in steps(out, args.cpu_smoke):
        if args.only and name not in args.only:
            continue
        left = deadline - time.monotonic()
        if left < 20:
            results.append({"step": name, "status": "skipped: the budget was spent", "seconds": 0.0})
            log(f"\n=== {name}: skipped, {left:.0f} s of the budget left\n")
            continue
        limit = min(limit, left)
        log(f"\n=== {name} (at most {limit:.0f} s): {' '.join(command)}\n")
        rc, seconds = run([PYTHON, *command], limit, log, env)
        status = (
            "passed" if rc == 0 else (f"stopped at its {limit:.0f} s limit" if rc is None else f"exit {rc}")
        )
        results.append({"step": name, "status": status, "seconds": seconds, "command": " ".join(command)})
        log(f"=== {name}: {status} in {seconds:.0f} s\n")

    failed = [r["step"] for r in results if r["status"] != "passed"]
    summary = {
        "device": about,
        "nvidia_smi": smi,
        "python": platform.python_version(),
        "wheels": installed,
        "steps": results,
        "pytest": pytest_counts(out / "pytest-gpu.xml"),
        "failed": failed,
        "seconds": time.monotonic() - start,
    }
    path = out / f"gpu_check-{'gpu' if gpu else 'cpu'}.json"
    path.write_text(json.dumps(summary, indent=2))
    log(f"\nwrote {path}; files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}\n")
    if failed:
        log(f"gpu_check: FAILED: {', '.join(failed)} (in {summary['seconds']:.0f} s)\n")
        return 1
    log(f"gpu_check: every step passed in {summary['seconds']:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
