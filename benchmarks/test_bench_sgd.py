"""SGD kernel: momentum and Nesterov momentum (5 element sizes per param)."""

#: Cases of this module: the bench settings of this kernel's records ("sgd",
#: "sgd-nesterov"); see conftest.py for lists, dtypes and sizes.
KERNEL = "sgd"


def test_step(bench_step):
    bench_step()
