"""Adam kernel: Adam and AdamW (7 element sizes per param)."""

#: Cases of this module; see conftest.py for lists, dtypes and sizes.
OPTIMIZERS = ("adam", "adamw")


def test_step(bench_step):
    bench_step()
