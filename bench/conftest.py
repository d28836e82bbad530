"""What a results file records beyond pytest-benchmark's own: the command line and the software it ran on.

bench/summarize.py prints both above every table of bench/README.md.
"""

import os
import shlex
from importlib import metadata

import pytest

# the settings that change what a run measures, as the command line was given them
SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")
_settings = {k: v for k, v in os.environ.items() if k in SETTINGS or k.startswith("DISTILLZOO_")}

os.environ.setdefault("DISTILLZOO_PLUGINS", "")

PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "trl")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    machine_info["packages"] = packages


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(_settings.items())]
    output_json["command"] = " ".join([*env, shlex.join(["pytest", *config.invocation_params.args])])
