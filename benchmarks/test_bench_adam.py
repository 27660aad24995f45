"""Adam kernel: Adam and AdamW (7 element sizes per param)."""

#: Cases of this module: the bench settings of this kernel's records ("adam",
#: "adamw"); see conftest.py for lists, dtypes and sizes.
KERNEL = "adam"


def test_step(bench_step):
    bench_step()
