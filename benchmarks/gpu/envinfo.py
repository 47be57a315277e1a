"""The environment of a GPU check, printed as one JSON line (``ENV_JSON {...}``).

Python, torch and CUDA versions, the GPU (torch and ``nvidia-smi``), the versions of
the packages rlmonitor and its benchmarks need, where ``rlmonitor`` and
``rlmonitor.callbacks`` were imported from (and whether
``rlmonitor.callbacks.geometry`` imports, unless ``--no-geometry``), and the requirements of the carried
wheels (``--wheels DIR``) that the installed packages do not meet. Exit code 1 when
``--device cuda`` was asked for and torch sees no CUDA device, or rlmonitor's
callbacks do not import.

    python benchmarks/gpu/envinfo.py [--device cpu|cuda] [--wheels DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import traceback
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "wandb", "huggingface-hub",
            "tokenizers", "safetensors", "numpy", "scipy", "pyarrow", "pandas", "fsspec", "dill", "multiprocess",
            "pydantic", "protobuf", "typing-extensions", "matplotlib", "pytest", "hypothesis")  # fmt: skip


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def unmet_requirements(wheel_dir: str | None) -> list[str]:
    """``NAME: requirement (found VERSION)`` for every Requires-Dist of the carried
    wheels (no extras, markers evaluated here) that the installed packages miss."""
    if not wheel_dir or not Path(wheel_dir).is_dir():
        return []
    from packaging.requirements import Requirement

    unmet = []
    for whl in sorted(Path(wheel_dir).glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = z.read(meta).decode("utf-8", "replace") if meta else ""
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                found = None
            if found is None or (req.specifier and not req.specifier.contains(found, prereleases=True)):
                unmet.append(f"{whl.name.split('-')[0]}: {req} (found {found})")
    return unmet


def gpu_info() -> dict:
    import torch

    info: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, device_count=torch.cuda.device_count())  # fmt: skip
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return info


def rlmonitor_info(geometry: bool) -> dict:
    """Where rlmonitor and rlmonitor.callbacks come from; with ``geometry``, whether the
    Trainer integration (transformers and all) imports (None: not tried)."""
    info: dict = {"geometry_imports": None}
    try:
        import rlmonitor
        import rlmonitor.callbacks

        info["rlmonitor"] = str(Path(rlmonitor.__file__).parent)
        info["rlmonitor.callbacks"] = str(Path(rlmonitor.callbacks.__file__).parent)
        info["callbacks_resolved"] = os.path.realpath(info["rlmonitor.callbacks"])
        if geometry:
            import rlmonitor.callbacks.geometry

            info["geometry_imports"] = True
    except Exception:
        info["geometry_imports"] = False
        info["import_error"] = traceback.format_exc(limit=3)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--wheels", help="folder of the carried wheels")
    ap.add_argument("--no-geometry", action="store_true",
                    help="skip importing rlmonitor.callbacks.geometry (dry runs: the overhead part imports it)")
    args = ap.parse_args(argv)
    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "packages": versions(), "pythonpath": os.environ.get("PYTHONPATH", "")}  # fmt: skip
    env["gpu"] = gpu_info()
    env.update(rlmonitor_info(geometry=not args.no_geometry))
    env["unmet_requirements"] = unmet_requirements(args.wheels)
    problems = []
    if args.device == "cuda" and not env["gpu"]["cuda_available"]:
        problems.append("--device cuda but torch.cuda.is_available() is False")
    if env["geometry_imports"] is False:
        problems.append("rlmonitor (or rlmonitor.callbacks.geometry) does not import")
    env["problems"] = problems
    print("ENV_JSON " + json.dumps(env), flush=True)
    for p in problems:
        print(f"problem: {p}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
