"""fused_optim: drop-in fused optimizers for torch.optim (Numba CPU, Triton GPU)."""

from setuptools import setup

setup(
    name="fused_optim",
    version="0.1.0",
    description="Drop-in fused multi-tensor SGD, Adam, AdamW, Adagrad and RMSprop for torch.optim "
    "(Numba kernels on CPU, Triton kernels on GPU)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository but installs as
    # fused_optim.kernels, so nothing called "kernels" lands in site-packages.
    packages=[
        "fused_optim",
        "fused_optim.bench",
        "fused_optim.kernels",
        "fused_optim.kernels.numba",
        "fused_optim.kernels.reference",
        "fused_optim.kernels.triton",
    ],
    package_dir={"fused_optim": "fused_optim", "fused_optim.kernels": "kernels"},
    # the oldest triton whose code for our kernels passes the offline checks
    # (benchmarks/triton_floor.py; README "Supported versions"), and the
    # first torch that pins it
    install_requires=["torch>=2.10", "numba>=0.59", "numpy"],
    extras_require={
        "gpu": ["triton>=3.6"],
        "test": ["pytest", "pytest-xdist>=3.8", "hypothesis", "pytest-benchmark"],  # 3.8: --no-loadscope-reorder
        # tqdm: the progress bar; matplotlib: the chart (fused_optim/bench/report.py)
        "bench": ["tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["fused-optim=fused_optim.__main__:main"]},
)
