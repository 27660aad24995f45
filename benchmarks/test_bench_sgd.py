"""SGD kernel: momentum and Nesterov momentum (5 element sizes per param)."""

#: Cases of this module; see conftest.py for lists, dtypes and sizes.
OPTIMIZERS = ("sgd", "sgd-nesterov")


def test_step(bench_step):
    bench_step()
